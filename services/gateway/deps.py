"""Typed FastAPI dependencies so routes read as prose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.catalog.models import Catalog
from services.gateway.chat.service import ChatService
from services.gateway.completions.service import CompletionService
from services.gateway.models.service import ModelsService
from services.gateway.pools import PoolRouter


@dataclass(frozen=True)
class GatewayServices:
    catalog: Catalog
    router: PoolRouter
    chat: ChatService
    completions: CompletionService
    models: ModelsService


def _services(request: Request) -> GatewayServices:
    services: GatewayServices = request.app.state.services
    return services


def _request_id(request: Request) -> str:
    return str(request.state.request_id)


Services = Annotated[GatewayServices, Depends(_services)]
RequestId = Annotated[str, Depends(_request_id)]

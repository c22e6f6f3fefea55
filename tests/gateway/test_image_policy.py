"""A tenant's model permission and image limits are checked before any image is fetched
(issue 9, item 4). The real ChatService, tenant gate and ImageLoader on real Redis; the
image origin is a real local HTTP server that records every hit. The cluster serves with
remote image URLs off, so the loader here is built in-process with them on (and loopback
allowed through its test-only option).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from services.catalog.loader import load_catalog
from services.errors import InvalidRequest, PermissionDenied
from services.inference.adapter_models import ModelResolver
from services.inference.chat import ChatService
from services.inference.generation import Caller, GenerationRunner
from services.inference.images import ImageLoader
from services.inference.metrics import GatewayMetrics
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.router import PoolRouter
from services.redis_store import RedisStore
from services.tenancy.models import ImagePolicy, Tenant
from tests.helpers import real_gate


@pytest.fixture
async def origin() -> AsyncIterator[tuple[str, list[str]]]:
    hits: list[str] = []

    async def image(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"\x89PNG\r\n\x1a\n", content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", image)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/cat.png", hits
    finally:
        await runner.cleanup()


def _chat_service(state: RedisStore) -> ChatService:
    catalog = load_catalog("local")
    router = PoolRouter(catalog, {}, assign_timeout_s=1.0)
    metrics = GatewayMetrics()
    capacity = {p.name: p.capacity for p in catalog.enabled_pools}
    gate = real_gate(state, capacity, metrics, lease_ttl_s=10, queue_timeout_s=1.0)
    images = ImageLoader(allow_remote=True, max_bytes=1 << 20, timeout_s=2.0, allow_loopback=True)
    runner = GenerationRunner(router, gate, metrics)
    return ChatService(ModelResolver(router), runner, images, platform=catalog.platform)


def _body(url: str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "phi-3.5-vision",
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        }
    )


async def test_tenant_not_allowed_the_vision_model_gets_403_without_a_fetch(
    state: RedisStore, origin: tuple[str, list[str]]
) -> None:
    url, hits = origin
    tenant = Tenant(id="text-only", allowed_models=["phi-3.5-mini"])
    with pytest.raises(PermissionDenied) as info:
        await _chat_service(state).create(Caller(tenant=tenant), _body(url), "req-1")
    assert info.value.code == "model_not_allowed"
    assert hits == []


async def test_tenant_over_its_image_limit_gets_400_without_a_fetch(
    state: RedisStore, origin: tuple[str, list[str]]
) -> None:
    url, hits = origin
    tenant = Tenant(id="no-images", images=ImagePolicy(max_images_per_request=0))
    with pytest.raises(InvalidRequest) as info:
        await _chat_service(state).create(Caller(tenant=tenant), _body(url), "req-2")
    assert info.value.code == "too_many_images"
    assert hits == []

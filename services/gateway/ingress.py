"""The gateway as a Ray Serve ingress deployment.

The FastAPI app is built inside the replica (`__serve_build_asgi_app__`), from the
pool handles Serve injects, so nothing is built at import and nothing is pickled
but the catalog, the settings and the handles.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from services.catalog.models import Catalog
from services.gateway.app import build_services, create_app
from services.settings import Settings


@serve.ingress()
class GatewayIngress:
    def __init__(
        self, catalog: Catalog, settings: Settings, pool_handles: dict[str, Any], batch_worker: Any = None
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self._services, self._state = build_services(catalog, pool_handles, settings, batch_worker=batch_worker)
        self._settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._services, self._state, self._settings)

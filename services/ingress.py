"""The gateway replica as a Ray Serve ingress deployment: where the adapters meet.

It builds the core (`build_core`) and the Files and Batches APIs on it, then hands them to
the two transports: the FastAPI app (services/gateway/) and the gRPC server
(services/grpc/). Neither transport imports the other.

The FastAPI app is built inside the replica (`__serve_build_asgi_app__`), from the
pool handles Serve injects, so nothing is built at import and nothing is pickled
but the catalog, the settings and the handles.

The replica also serves the gRPC API (issue 5, docs/grpc.md) on `settings.grpc_port`
from the same core: started in the constructor (Serve awaits async
constructors), stopped before the app's lifespan closes Redis, so calls still running
can settle.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ray import serve

from services.batch.api import build_batch_api
from services.catalog.models import Catalog
from services.gateway.app import create_app
from services.grpc.server import GrpcServer, start_grpc_server
from services.inference.core import build_core
from services.inference.ports import BatchApis
from services.settings import Settings


@serve.ingress()
class GatewayIngress:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, catalog: Catalog, settings: Settings, pool_handles: dict[str, Any], batch_worker: Any = None
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self._core = build_core(settings, catalog, pool_handles, batch_worker=batch_worker)
        files, batches = build_batch_api(self._core, settings)
        self._batch_apis = BatchApis(files=files, batches=batches)
        self._settings = settings
        self._grpc: GrpcServer | None = None
        if settings.grpc_port is not None:
            self._grpc = await start_grpc_server(self._core, self._batch_apis, settings)

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self._core, self._batch_apis, self._settings)
        app.router.lifespan_context = _stopping_first(app.router.lifespan_context, self._stop_grpc)
        return app

    async def _stop_grpc(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop()

    async def __del__(self) -> None:
        # Serve's graceful shutdown; a no-op when the lifespan already stopped it.
        await self._stop_grpc()


def _stopping_first(
    lifespan: Callable[[Any], AbstractAsyncContextManager[Any]], stop: Callable[[], Any]
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """The app's lifespan, with `stop()` run before its shutdown (which closes Redis)."""

    @asynccontextmanager
    async def wrapped(app: Any) -> AsyncIterator[Any]:
        async with lifespan(app) as state:
            try:
                yield state
            finally:
                await stop()

    return wrapped

"""The gRPC server each gateway replica runs beside its FastAPI app (issue 5).

It serves `phiserve.v1.InferenceService`, the standard `grpc.health.v1.Health` and server
reflection on `settings.grpc_port`. gRPC sets SO_REUSEPORT on Linux, so every gateway
replica on a node binds the same port and the kernel spreads connections between them.
Why here and not through Ray Serve's gRPC proxy: docs/grpc.md.

Health: the empty service name ("") is SERVING while the replica runs (like GET /health);
`phiserve.v1.InferenceService` is SERVING while every pool has a live replica (like
GET /ready), checked every `READINESS_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc
from services.grpc.servicer import SERVICE_NAME, InferenceServicer
from services.inference.core import Core
from services.inference.ports import BatchApis
from services.inference.readiness import Readiness
from services.settings import Settings

logger = logging.getLogger(__name__)

READINESS_INTERVAL_S = 5.0
DEFAULT_GRACE_S = 10.0


class _Malformed:
    """What a request that does not parse as its message becomes (instead of UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001  # DecodeError, or invalid UTF-8 in a string
            return _Malformed(exc)

    return deserialize


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, _Malformed):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request message does not parse as its type: {type(request.error).__name__}",
        )


def _unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return await behavior(request, context)

    return checked


def _server_streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await _refuse_malformed(request, context)
        result = behavior(request, context)
        if hasattr(result, "__aiter__"):  # an async-generator handler
            async for message in result:
                await context.write(message)
        else:  # a coroutine that writes with context.write (ours, health's Watch)
            await result

    return checked


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Refuse a request that does not parse as its message with INVALID_ARGUMENT, before
    any servicer code runs (gRPC itself would answer UNKNOWN)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:  # reflection: a client stream
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        if handler.response_streaming:
            assert handler.unary_stream is not None  # a unary-request, streaming-response method
            return grpc.unary_stream_rpc_method_handler(
                _server_streaming(handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        assert handler.unary_unary is not None  # neither side streams
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        # A request message over the REST generation body limit is refused by gRPC itself
        # (RESOURCE_EXHAUSTED) before it is parsed; file uploads share it (REST takes up to
        # max_batch_file_bytes through multipart, gRPC one message).
        ("grpc.max_receive_message_length", settings.max_request_body_bytes),
        # Replicas on one node share the port (gRPC's default on Linux; stated here).
        ("grpc.so_reuseport", 1),
    ]


class GrpcServer:
    """A started server, its health service and the readiness task; `stop()` drains it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health.aio.HealthServicer,
        readiness: Readiness,
    ) -> None:
        self.server = server
        self.port = port
        self._health = health_servicer
        self._readiness = readiness
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start_readiness(self, interval_s: float = READINESS_INTERVAL_S) -> None:
        self._task = asyncio.get_running_loop().create_task(self._report_readiness(interval_s))

    async def _report_readiness(self, interval_s: float) -> None:
        while True:
            try:
                # The same cached probe as GET /ready: the pools see one round trip for both.
                answer = await self._readiness.check()
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if answer.ready
                    else (health_pb2.HealthCheckResponse.NOT_SERVING)
                )
                await self._health.set(SERVICE_NAME, status)
            except Exception as exc:  # noqa: BLE001  # keep probing; the next round decides
                logger.warning("gRPC readiness probe failed: %s", exc)
            await asyncio.sleep(interval_s)

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Report NOT_SERVING, refuse new calls, give running calls `grace_s` to finish."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        logger.info("gRPC server on port %d stopped", self.port)


def create_server(
    core: Core, batch_apis: BatchApis, settings: Settings, *, address: str | None = None
) -> GrpcServer:
    """Build the server and bind it (not started). `address` defaults to
    `settings.host:settings.grpc_port`; port 0 picks a free one (see `GrpcServer.port`)."""
    if address is None:
        if settings.grpc_port is None:
            raise ValueError("gRPC is off (grpc_port is null); pass an address to serve it anyway")
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
    server = grpc.aio.server(
        interceptors=[MalformedRequestInterceptor()],
        options=server_options(settings),
        # Beyond this many RPCs in progress, gRPC refuses a new one with RESOURCE_EXHAUSTED
        # before reading its message (issue 9, item 4): a flood of calls cannot queue
        # unbounded work and memory on the replica.
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(core, batch_apis), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"gRPC could not bind {address}")
    return GrpcServer(server, port, health_servicer, core.readiness)


async def start_grpc_server(
    core: Core, batch_apis: BatchApis, settings: Settings, *, address: str | None = None
) -> GrpcServer:
    """Create, bind and start the server on the running event loop (the replica's)."""
    grpc_server = create_server(core, batch_apis, settings, address=address)
    await grpc_server.server.start()
    await grpc_server._health.set("", health_pb2.HealthCheckResponse.SERVING)
    await grpc_server._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    grpc_server.start_readiness()
    logger.info("gRPC server listening on port %d", grpc_server.port)
    return grpc_server

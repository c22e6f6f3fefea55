"""`phiserve.v1.InferenceService`: the REST API's code path behind gRPC methods.

Each method authenticates from metadata, converts the proto request into the REST model
(`services.grpc.convert`), and calls the same services as the REST routes: the chat and
completion services' `prepare`, the `GenerationRunner` (tenant gate: admission, fair
queue, settlement) and the pool router. Errors map through the core's one error table
(`services.inference.errors`, as gRPC status by `services.grpc.errors.grpc_status`); the
API key and request-id rules are REST's (`services.inference.identity`).

The Batch API's methods (files and batches) call the same `FileService` and `BatchService`
objects as REST's /v1/files and /v1/batches routes, scoped to the caller's tenant.

Unary calls run on the runner's stream and are assembled here: closing that stream on
cancellation (deadline passed, client gone) aborts the engine request and settles the
tenant's tokens, which an awaited unary handle call does not do outside a Serve request
(see docs/grpc.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.catalog.models import PoolConfig
from services.errors import ClientClosedRequest, GenerationFailed, PhiserveError
from services.grpc import convert
from services.grpc.errors import grpc_status
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc
from services.inference.core import Core
from services.inference.errors import error_row
from services.inference.generation import Caller, ResponseShape
from services.inference.identity import presented_key, request_id
from services.inference.metrics import tenant_label
from services.inference.ports import BatchApis
from services.pools.engine import GenerationRequest, GenerationResult
from services.tenancy.models import Tenant

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
CLIENT_CLOSED_REQUEST = error_row(ClientClosedRequest).http_status  # recorded for a cancelled RPC
# GetFileContent sends a file in chunks of this many bytes (under any client's default
# 4 MiB receive limit, whatever the file's size).
FILE_CHUNK_BYTES = 1024 * 1024
T = TypeVar("T")


def metadata_dict(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


class _Call:
    """One RPC's request id, labels and metadata."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str) -> None:
        self.context = context
        self.method = method
        self.metadata = metadata_dict(context)
        self.request_id = request_id(self.metadata)
        self.started = time.perf_counter()
        self.labels = {"model": "none", "tenant": "none"}

    async def send_headers(self, headers: dict[str, str]) -> None:
        await self.context.send_initial_metadata(
            (("x-request-id", self.request_id), *((k.lower(), str(v)) for k, v in headers.items()))
        )


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, core: Core, batch_apis: BatchApis) -> None:
        self._core = core
        self._files = batch_apis.files
        self._batches = batch_apis.batches
        self._metrics = core.metrics

    # -- RPCs ---------------------------------------------------------------------------

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        async def run(call: _Call) -> pb.ChatResponse:
            caller = await self._caller(call)
            body = convert.chat_body(request, stream=False)
            pool, generation = await self._core.chat.prepare(body, call.request_id, tenant=caller.tenant)
            response: pb.ChatResponse = await self._unary(
                call, caller, pool, generation, convert.ChatShape(call.request_id, body.model)
            )
            return response

        return await self._run(context, "Chat", run)

    async def ChatStream(self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext) -> None:
        async def run(call: _Call) -> None:
            caller = await self._caller(call)
            body = convert.chat_body(request, stream=True)
            pool, generation = await self._core.chat.prepare(body, call.request_id, tenant=caller.tenant)
            shape = convert.ChatShape(call.request_id, body.model)
            await self._stream(call, caller, pool, generation, shape, include_usage=body.include_usage())

        await self._run(context, "ChatStream", run)

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteResponse:
        async def run(call: _Call) -> pb.CompleteResponse:
            caller = await self._caller(call)
            body = convert.completion_body(request, stream=False)
            pool, generation, _ = self._core.completions.prepare(body, call.request_id)
            shape = convert.CompletionShape(
                call.request_id, body.model, echo_prefix=request.prompt if body.echo else ""
            )
            response: pb.CompleteResponse = await self._unary(call, caller, pool, generation, shape)
            return response

        return await self._run(context, "Complete", run)

    async def CompleteStream(
        self, request: pb.CompleteStreamRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def run(call: _Call) -> None:
            caller = await self._caller(call)
            body = convert.completion_body(request, stream=True)
            pool, generation, _ = self._core.completions.prepare(body, call.request_id)
            shape = convert.CompletionShape(
                call.request_id, body.model, echo_prefix=request.prompt if body.echo else ""
            )
            await self._stream(call, caller, pool, generation, shape, include_usage=body.include_usage())

        await self._run(context, "CompleteStream", run)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def run(call: _Call) -> pb.ListModelsResponse:
            # As GET /v1/models: no key needed.
            await call.send_headers({})
            return convert.models_response(self._core.models.list())

        return await self._run(context, "ListModels", run)

    # -- Batch API: the services of REST's /v1/files and /v1/batches --------------------

    async def UploadFile(
        self, request: pb.UploadFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.UploadFileResponse:
        async def run(call: _Call) -> pb.UploadFileResponse:
            tenant = await self._limited_tenant(call)
            file = await self._files.upload(
                tenant.id, filename=request.filename, purpose=request.purpose or "batch", data=request.data
            )
            await call.send_headers({})
            return pb.UploadFileResponse(file=convert.file_message(file))

        return await self._run(context, "UploadFile", run, renames=convert.BATCH_FIELDS)

    async def GetFile(
        self, request: pb.GetFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFileResponse:
        async def run(call: _Call) -> pb.GetFileResponse:
            tenant = await self._limited_tenant(call)
            file = await self._files.get(tenant.id, request.file_id)
            await call.send_headers({})
            return pb.GetFileResponse(file=convert.file_message(file))

        return await self._run(context, "GetFile", run)

    async def GetFileContent(
        self, request: pb.GetFileContentRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def run(call: _Call) -> None:
            tenant = await self._limited_tenant(call)
            data = await self._files.content(tenant.id, request.file_id)
            await call.send_headers({})
            for start in range(0, len(data), FILE_CHUNK_BYTES):
                await context.write(pb.GetFileContentResponse(data=data[start : start + FILE_CHUNK_BYTES]))

        await self._run(context, "GetFileContent", run)

    async def CreateBatch(
        self, request: pb.CreateBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateBatchResponse:
        async def run(call: _Call) -> pb.CreateBatchResponse:
            tenant = await self._limited_tenant(call)
            batch = await self._batches.create(tenant.id, convert.create_batch_body(request))
            await call.send_headers({})
            return pb.CreateBatchResponse(batch=convert.batch_message(batch))

        return await self._run(context, "CreateBatch", run)

    async def GetBatch(
        self, request: pb.GetBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBatchResponse:
        async def run(call: _Call) -> pb.GetBatchResponse:
            tenant = await self._limited_tenant(call)
            batch = await self._batches.get(tenant.id, request.batch_id)
            await call.send_headers({})
            return pb.GetBatchResponse(batch=convert.batch_message(batch))

        return await self._run(context, "GetBatch", run)

    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBatchesResponse:
        async def run(call: _Call) -> pb.ListBatchesResponse:
            tenant = await self._limited_tenant(call)
            batches, has_more = await self._batches.list(
                tenant.id, after=request.after or None, limit=request.limit or convert.DEFAULT_BATCH_PAGE
            )
            await call.send_headers({})
            return convert.list_batches_response(batches, has_more)

        return await self._run(context, "ListBatches", run)

    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelBatchResponse:
        async def run(call: _Call) -> pb.CancelBatchResponse:
            tenant = await self._limited_tenant(call)
            batch = await self._batches.cancel(tenant.id, request.batch_id)
            await call.send_headers({})
            return pb.CancelBatchResponse(batch=convert.batch_message(batch))

        return await self._run(context, "CancelBatch", run)

    # -- the shared path ----------------------------------------------------------------

    async def _tenant(self, call: _Call) -> Tenant:
        tenant, _ = await self._core.tenants.authenticate(presented_key(call.metadata))
        call.labels["tenant"] = tenant_label(tenant.id, tenant.metrics_label)
        return tenant

    async def _limited_tenant(self, call: _Call) -> Tenant:
        """Files and batches count against the tenant's RPM, as on REST (issue 9, item 4)."""
        tenant = await self._tenant(call)
        await self._core.api_limiter.count(tenant)
        return tenant

    async def _caller(self, call: _Call) -> Caller:
        tenant = await self._tenant(call)
        # The client's deadline bounds the wait in the fair queue, as x-stainless-timeout does.
        return Caller(
            tenant=tenant, deadline_s=call.context.time_remaining(), started=call.started, labels=call.labels
        )

    async def _unary(
        self, call: _Call, caller: Caller, pool: PoolConfig, request: GenerationRequest, shape: ResponseShape
    ) -> Any:
        chunks, headers = await self._core.runner.open_stream(
            caller, pool, request, convert.Collector(), include_usage=True
        )
        texts: list[str] = []
        finish_reason: str | None = None
        totals: dict[str, Any] = {}
        try:
            async for item in chunks:
                if isinstance(item, dict):
                    totals = item
                else:
                    texts.append(item[0])
                    finish_reason = item[1] or finish_reason
        finally:
            # Cancelled (deadline, client gone) or failed: abort the engine request, settle.
            await chunks.aclose()  # type: ignore[attr-defined]
        result = GenerationResult(
            text="".join(texts),
            prompt_tokens=totals.get("prompt_tokens", 0),
            completion_tokens=totals.get("completion_tokens", 0),
            finish_reason=finish_reason or "stop",
            cached_tokens=totals.get("prompt_tokens_details", {}).get("cached_tokens", 0),
        )
        await call.send_headers(headers)
        return shape.response(result)

    async def _stream(
        self,
        call: _Call,
        caller: Caller,
        pool: PoolConfig,
        request: GenerationRequest,
        shape: ResponseShape,
        *,
        include_usage: bool,
    ) -> None:
        chunks, headers = await self._core.runner.open_stream(
            caller, pool, request, shape, include_usage=include_usage
        )
        try:
            await call.send_headers(headers)
            async for message in chunks:
                await call.context.write(message)
        finally:
            # However the RPC ends (done, failed, deadline, cancelled): close the stream so
            # the engine request is aborted and the tenant settled now, not at GC time.
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        handler: Callable[[_Call], Awaitable[T]],
        *,
        renames: dict[str, str] | None = None,
    ) -> T:
        call = _Call(context, method)
        status = 500
        failure: PhiserveError
        try:
            result = await handler(call)
            status = 200
            return result
        except PhiserveError as exc:
            status = error_row(exc).http_status
            failure = exc
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        except Exception:
            logger.exception("request %s: unhandled error in gRPC %s", call.request_id, method)
            failure = GenerationFailed("internal server error", code="internal_error")
        finally:
            self._observe(call, status)
        code, rich = grpc_status(failure, field=convert.proto_field(failure.param, renames))
        trailers: list[tuple[str, str | bytes]] = [
            ("grpc-status-details-bin", rich.SerializeToString()),
            ("x-request-id", call.request_id),
            *((k.lower(), str(v)) for k, v in failure.headers.items()),
        ]
        if failure.retry_after_s is not None:
            trailers.append(("retry-after", str(failure.retry_after_s)))
        logger.info("request %s: gRPC %s -> %s (%s)", call.request_id, method, code.name, failure.code)
        await context.abort(code, failure.message, trailing_metadata=tuple(trailers))
        raise AssertionError("unreachable: abort raises")

    def _observe(self, call: _Call, status: int) -> None:
        # Same series as REST, the gRPC method path as the endpoint and the error table's
        # HTTP status as the status, so dashboards and alerts cover both APIs.
        self._metrics.requests.inc(tags={**call.labels, "status": str(status)})
        self._metrics.request_duration.observe(
            time.perf_counter() - call.started,
            tags={"model": call.labels["model"], "endpoint": f"/{SERVICE_NAME}/{call.method}"},
        )

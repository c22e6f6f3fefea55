"""`phiserve.v1.InferenceService`: the REST API's code path behind gRPC methods.

Each method authenticates from metadata, converts the proto request into the REST model
(`services.grpc.convert`), and calls the same services as the REST routes: the chat and
completion services (the `GenerationRunner`: tenant gate, fair queue, settlement, pool
router), whose typed bodies `services.grpc.responses` converts to proto. Errors map through
the core's one error table (`services.inference.errors`, as gRPC status by
`services.grpc.errors.grpc_status`); the API key and request-id rules are REST's
(`services.inference.identity`).

The Batch API's methods (files and batches) call the same `FileService` and `BatchService`
objects as REST's /v1/files and /v1/batches routes, scoped to the caller's tenant.

Unary calls run on the runner's stream, assembled by the core (`GenerationRunner.collect`):
closing that stream on cancellation (deadline passed, client gone) aborts the engine
request and settles the tenant's tokens, which an awaited unary handle call does not do
outside a Serve request (see docs/grpc.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.errors import ClientClosedRequest, GenerationFailed, PhiserveError
from services.grpc import batch_messages, convert, responses
from services.grpc.errors import grpc_status
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc
from services.inference.core import Core
from services.inference.errors import error_row
from services.inference.generation import Caller
from services.inference.identity import presented_key, request_id
from services.inference.metrics import tenant_label
from services.inference.ports import BatchApis
from services.tenancy.models import Tenant

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
CLIENT_CLOSED_REQUEST = error_row(ClientClosedRequest).http_status  # recorded for a cancelled RPC
# GetFileContent sends a file in chunks of this many bytes (under any client's default
# 4 MiB receive limit, whatever the file's size).
FILE_CHUNK_BYTES = 1024 * 1024
T = TypeVar("T")
C = TypeVar("C")  # a stream chunk of the core (services/inference/protocol/responses.py)
StreamMessage = pb.ChatStreamResponse | pb.CompleteStreamResponse


def metadata_dict(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


class _Call:
    """One RPC's request id, labels and metadata."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
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

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ChatResponse:
        async def run(call: _Call) -> pb.ChatResponse:
            caller = await self._caller(call)
            body = convert.chat_body(request, stream=False)
            # Assembled from the pool's stream, so a deadline aborts the engine request at
            # once and bills what was generated (docs/grpc.md).
            answer, headers = await self._core.chat.create(caller, body, call.request_id, from_stream=True)
            await call.send_headers(headers)
            return responses.chat_response(answer, call.request_id)

        return await self._run(context, "Chat", run)

    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        async def run(call: _Call) -> None:
            caller = await self._caller(call)
            body = convert.chat_body(request, stream=True)
            chunks, headers = await self._core.chat.create_stream(caller, body, call.request_id)
            await self._send_stream(call, chunks, headers, responses.chat_chunk)

        await self._run(context, "ChatStream", run)

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompleteResponse:
        async def run(call: _Call) -> pb.CompleteResponse:
            caller = await self._caller(call)
            body = convert.completion_body(request, stream=False)
            answer, headers = await self._core.completions.create(
                caller, body, call.request_id, from_stream=True
            )
            await call.send_headers(headers)
            return responses.completion_response(answer, call.request_id)

        return await self._run(context, "Complete", run, renames=convert.prompt_renames(request))

    async def CompleteStream(
        self, request: pb.CompleteStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        async def run(call: _Call) -> None:
            caller = await self._caller(call)
            body = convert.completion_body(request, stream=True)
            chunks, headers = await self._core.completions.create_stream(caller, body, call.request_id)
            await self._send_stream(call, chunks, headers, responses.completion_chunk)

        await self._run(context, "CompleteStream", run, renames=convert.prompt_renames(request))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        async def run(call: _Call) -> pb.ListModelsResponse:
            # As GET /v1/models: no key needed; with one, the models its tenant may use (an
            # unknown key is UNAUTHENTICATED, as on any tenant call).
            tenant = await self._tenant(call) if presented_key(call.metadata) else None
            await call.send_headers({})
            return responses.models_response(await self._core.models.list(tenant))

        return await self._run(context, "ListModels", run)

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelResponse:
        async def run(call: _Call) -> pb.GetModelResponse:
            # Needs a key, unlike ListModels: the answer is the tenant's (a model it may not
            # use is NOT_FOUND, as an unknown one).
            tenant = await self._tenant(call)
            model = await self._core.models.retrieve(tenant, request.model)
            await call.send_headers({})
            return pb.GetModelResponse(model=responses.model_message(model))

        return await self._run(context, "GetModel", run)

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteModelResponse:
        async def run(call: _Call) -> pb.DeleteModelResponse:
            # The tenant's own adapter only (REST's DELETE /v1/models/{model}).
            tenant = await self._limited_tenant(call)
            deleted = await self._core.models.delete(tenant, request.model)
            await call.send_headers({})
            return pb.DeleteModelResponse(id=deleted["id"], deleted=deleted["deleted"])

        return await self._run(context, "DeleteModel", run)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        async def run(call: _Call) -> pb.TokenizeResponse:
            tenant = await self._limited_tenant(call)
            answer = await self._core.tokenize.tokenize(tenant, convert.tokenize_body(request))
            await call.send_headers({})
            return responses.tokenize_response(answer)

        return await self._run(context, "Tokenize", run)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DetokenizeResponse:
        async def run(call: _Call) -> pb.DetokenizeResponse:
            tenant = await self._limited_tenant(call)
            answer = await self._core.tokenize.detokenize(tenant, convert.detokenize_body(request))
            await call.send_headers({})
            return pb.DetokenizeResponse(prompt=answer.prompt)

        return await self._run(context, "Detokenize", run)

    # -- Batch API: the services of REST's /v1/files and /v1/batches --------------------

    async def UploadFile(
        self, request: pb.UploadFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UploadFileResponse:
        async def run(call: _Call) -> pb.UploadFileResponse:
            tenant = await self._limited_tenant(call)
            file = await self._files.upload(
                tenant.id, filename=request.filename, purpose=request.purpose or "batch", data=request.data
            )
            await call.send_headers({})
            return pb.UploadFileResponse(file=batch_messages.file_message(file))

        return await self._run(context, "UploadFile", run, renames=convert.BATCH_FIELDS)

    async def GetFile(
        self, request: pb.GetFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetFileResponse:
        async def run(call: _Call) -> pb.GetFileResponse:
            tenant = await self._limited_tenant(call)
            file = await self._files.get(tenant.id, request.file_id)
            await call.send_headers({})
            return pb.GetFileResponse(file=batch_messages.file_message(file))

        return await self._run(context, "GetFile", run)

    async def GetFileContent(
        self, request: pb.GetFileContentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        async def run(call: _Call) -> None:
            tenant = await self._limited_tenant(call)
            data = await self._files.content(tenant.id, request.file_id)
            await call.send_headers({})
            for start in range(0, len(data), FILE_CHUNK_BYTES):
                await context.write(pb.GetFileContentResponse(data=data[start : start + FILE_CHUNK_BYTES]))

        await self._run(context, "GetFileContent", run)

    async def ListFiles(
        self, request: pb.ListFilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListFilesResponse:
        async def run(call: _Call) -> pb.ListFilesResponse:
            tenant = await self._limited_tenant(call)
            files, has_more = await self._files.list(tenant.id, **convert.list_files_options(request))
            await call.send_headers({})
            return batch_messages.list_files_response(files, has_more)

        return await self._run(context, "ListFiles", run)

    async def DeleteFile(
        self, request: pb.DeleteFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteFileResponse:
        async def run(call: _Call) -> pb.DeleteFileResponse:
            tenant = await self._limited_tenant(call)
            file = await self._files.delete(tenant.id, request.file_id)
            await call.send_headers({})
            return pb.DeleteFileResponse(id=file.id, deleted=True)

        return await self._run(context, "DeleteFile", run)

    async def CreateBatch(
        self, request: pb.CreateBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateBatchResponse:
        async def run(call: _Call) -> pb.CreateBatchResponse:
            tenant = await self._limited_tenant(call)
            batch = await self._batches.create(tenant.id, convert.create_batch_body(request))
            await call.send_headers({})
            return pb.CreateBatchResponse(batch=batch_messages.batch_message(batch))

        return await self._run(context, "CreateBatch", run)

    async def GetBatch(
        self, request: pb.GetBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetBatchResponse:
        async def run(call: _Call) -> pb.GetBatchResponse:
            tenant = await self._limited_tenant(call)
            batch = await self._batches.get(tenant.id, request.batch_id)
            await call.send_headers({})
            return pb.GetBatchResponse(batch=batch_messages.batch_message(batch))

        return await self._run(context, "GetBatch", run)

    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListBatchesResponse:
        async def run(call: _Call) -> pb.ListBatchesResponse:
            tenant = await self._limited_tenant(call)
            batches, has_more = await self._batches.list(
                tenant.id, after=request.after or None, limit=request.limit or convert.DEFAULT_BATCH_PAGE
            )
            await call.send_headers({})
            return batch_messages.list_batches_response(batches, has_more)

        return await self._run(context, "ListBatches", run)

    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelBatchResponse:
        async def run(call: _Call) -> pb.CancelBatchResponse:
            tenant = await self._limited_tenant(call)
            batch = await self._batches.cancel(tenant.id, request.batch_id)
            await call.send_headers({})
            return pb.CancelBatchResponse(batch=batch_messages.batch_message(batch))

        return await self._run(context, "CancelBatch", run)

    # -- the shared path ----------------------------------------------------------------

    async def _tenant(self, call: _Call, *, generation: bool = False) -> Tenant:
        # A generation's admission checks a cached key's auth version (enter.lua).
        tenant, _ = await self._core.tenants.authenticate(
            presented_key(call.metadata), checked_at_admission=generation
        )
        call.labels["tenant"] = tenant_label(tenant.id, tenant.metrics_label)
        return tenant

    async def _limited_tenant(self, call: _Call) -> Tenant:
        """Files and batches count against the tenant's RPM, as on REST (issue 9, item 4)."""
        tenant = await self._tenant(call)
        await self._core.api_limiter.count(tenant)
        return tenant

    async def _caller(self, call: _Call) -> Caller:
        tenant = await self._tenant(call, generation=True)
        # The client's deadline bounds the wait in the fair queue, as x-stainless-timeout does.
        return Caller(
            tenant=tenant, deadline_s=call.context.time_remaining(), started=call.started, labels=call.labels
        )

    async def _send_stream(
        self,
        call: _Call,
        chunks: AsyncIterator[C],
        headers: dict[str, str],
        to_message: Callable[[C, str], StreamMessage],
    ) -> None:
        """Write the core's chunks as proto messages (`to_message(chunk, request_id)`)."""
        try:
            await call.send_headers(headers)
            async for chunk in chunks:
                await call.context.write(to_message(chunk, call.request_id))
        finally:
            # However the RPC ends (done, failed, deadline, cancelled): close the stream so
            # the engine request is aborted and the tenant settled now, not at GC time.
            await chunks.aclose()  # type: ignore[attr-defined]  # a GenerationStream: it closes

    async def _run(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
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

"""The asyncio client for phiserve's gRPC API (grpc.aio): the calls of the sync `Client`,
awaited or async-iterated. Also importable as `services.grpc.client.AsyncClient`.

    async with AsyncClient("127.0.0.1:9000", api_key=key) as client:
        async for chunk in client.chat_stream("phi-3.5-vision", [user("Describe it", image(png))]):
            ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import grpc

from services.grpc.client_common import (
    ClientBase,
    PhiserveRpcError,
    Prompt,
    batch_deadline,
    batch_pending,
    chat_request,
    chat_stream_request,
    complete_request,
    complete_stream_request,
    create_batch_request,
    list_batches_request,
    list_files_request,
    tokenize_request,
)
from services.grpc.gen.phiserve.v1 import batch_pb2, chat_pb2, models_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc

__all__ = ["AsyncClient"]


class _AsyncRpcErrors:
    """`async with`: turn an aio RpcError into PhiserveRpcError."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            raise PhiserveRpcError.from_call(exc) from None


class AsyncClient(ClientBase):
    """asyncio client (grpc.aio); the same calls as `Client`, awaited or async-iterated."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        super().__init__(api_key, timeout_s)
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    async def chat(
        self,
        model: str,
        messages: Iterable[chat_pb2.ChatMessage],
        *,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> pb.ChatResponse:
        request = chat_request(model, messages, user, fields)
        response: pb.ChatResponse = await self._call(self._stub.Chat, request, timeout_s, request_id)
        return response

    async def chat_stream(
        self,
        model: str,
        messages: Iterable[chat_pb2.ChatMessage],
        *,
        include_usage: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        request = chat_stream_request(model, messages, user, include_usage, fields)
        call = self._stub.ChatStream(request, **self._options(timeout_s, request_id))
        async for chunk in self._iterate(call):
            yield chunk

    async def complete(
        self,
        model: str,
        prompt: Prompt,
        *,
        echo: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> pb.CompleteResponse:
        request = complete_request(model, prompt, echo, user, fields)
        response: pb.CompleteResponse = await self._call(self._stub.Complete, request, timeout_s, request_id)
        return response

    async def complete_stream(
        self,
        model: str,
        prompt: Prompt,
        *,
        echo: bool = False,
        include_usage: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> AsyncIterator[pb.CompleteStreamResponse]:
        request = complete_stream_request(model, prompt, echo, user, include_usage, fields)
        call = self._stub.CompleteStream(request, **self._options(timeout_s, request_id))
        async for chunk in self._iterate(call):
            yield chunk

    async def list_models(self, *, timeout_s: float | None = None) -> list[models_pb2.Model]:
        response: pb.ListModelsResponse = await self._call(
            self._stub.ListModels, pb.ListModelsRequest(), timeout_s, None
        )
        return list(response.models)

    async def get_model(self, model: str, *, timeout_s: float | None = None) -> models_pb2.Model:
        """One model the caller's tenant may use (NOT_FOUND otherwise, as an unknown one)."""
        response: pb.GetModelResponse = await self._call(
            self._stub.GetModel, pb.GetModelRequest(model=model), timeout_s, None
        )
        return response.model

    async def delete_model(self, model: str, *, timeout_s: float | None = None) -> pb.DeleteModelResponse:
        """Deletes one of the tenant's own adapters (NOT_FOUND for any other id)."""
        response: pb.DeleteModelResponse = await self._call(
            self._stub.DeleteModel, pb.DeleteModelRequest(model=model), timeout_s, None
        )
        return response

    async def tokenize(
        self,
        model: str,
        prompt: str = "",
        *,
        messages: Iterable[chat_pb2.ChatMessage] = (),
        timeout_s: float | None = None,
        **fields: Any,
    ) -> pb.TokenizeResponse:
        """A prompt's (or messages') token ids as the engine counts them; keyword arguments
        are TokenizeRequest fields (add_special_tokens, return_token_strs, tools, ...)."""
        request = tokenize_request(model, prompt, messages, fields)
        response: pb.TokenizeResponse = await self._call(self._stub.Tokenize, request, timeout_s, None)
        return response

    async def detokenize(self, model: str, tokens: Iterable[int], *, timeout_s: float | None = None) -> str:
        request = pb.DetokenizeRequest(model=model, tokens=list(tokens))
        response: pb.DetokenizeResponse = await self._call(self._stub.Detokenize, request, timeout_s, None)
        return response.prompt

    # -- Batch API ------------------------------------------------------------------

    async def upload_file(
        self,
        data: bytes,
        *,
        filename: str = "batch.jsonl",
        purpose: str = "batch",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> batch_pb2.File:
        """Store a batch input file (JSONL); a bad line is INVALID_ARGUMENT naming it."""
        request = pb.UploadFileRequest(filename=filename, data=data, purpose=purpose)
        response: pb.UploadFileResponse = await self._call(
            self._stub.UploadFile, request, timeout_s, request_id
        )
        return response.file

    async def get_file(self, file_id: str, *, timeout_s: float | None = None) -> batch_pb2.File:
        response: pb.GetFileResponse = await self._call(
            self._stub.GetFile, pb.GetFileRequest(file_id=file_id), timeout_s, None
        )
        return response.file

    async def file_content(self, file_id: str, *, timeout_s: float | None = None) -> bytes:
        """A file's whole content (input, output or error file), from its chunks."""
        call = self._stub.GetFileContent(
            pb.GetFileContentRequest(file_id=file_id), **self._options(timeout_s, None)
        )
        return b"".join([chunk.data async for chunk in self._iterate(call)])

    async def list_files(
        self,
        *,
        purpose: str | None = None,
        order: str | None = None,
        after: str | None = None,
        limit: int = 0,
        timeout_s: float | None = None,
    ) -> pb.ListFilesResponse:
        """One page of the tenant's files (newest first unless order="asc"); pass the page's
        `last_id` as `after` while `has_more`. limit 0: the server's 10000."""
        request = list_files_request(purpose, order, after, limit)
        response: pb.ListFilesResponse = await self._call(self._stub.ListFiles, request, timeout_s, None)
        return response

    async def delete_file(self, file_id: str, *, timeout_s: float | None = None) -> pb.DeleteFileResponse:
        response: pb.DeleteFileResponse = await self._call(
            self._stub.DeleteFile, pb.DeleteFileRequest(file_id=file_id), timeout_s, None
        )
        return response

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str = "/v1/chat/completions",
        *,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> batch_pb2.Batch:
        request = create_batch_request(input_file_id, endpoint, completion_window, metadata)
        response: pb.CreateBatchResponse = await self._call(
            self._stub.CreateBatch, request, timeout_s, request_id
        )
        return response.batch

    async def get_batch(self, batch_id: str, *, timeout_s: float | None = None) -> batch_pb2.Batch:
        response: pb.GetBatchResponse = await self._call(
            self._stub.GetBatch, pb.GetBatchRequest(batch_id=batch_id), timeout_s, None
        )
        return response.batch

    async def list_batches(
        self, *, after: str | None = None, limit: int = 20, timeout_s: float | None = None
    ) -> pb.ListBatchesResponse:
        """One page, newest first; pass the page's `last_id` as `after` while `has_more`."""
        response: pb.ListBatchesResponse = await self._call(
            self._stub.ListBatches, list_batches_request(after, limit), timeout_s, None
        )
        return response

    async def cancel_batch(self, batch_id: str, *, timeout_s: float | None = None) -> batch_pb2.Batch:
        response: pb.CancelBatchResponse = await self._call(
            self._stub.CancelBatch, pb.CancelBatchRequest(batch_id=batch_id), timeout_s, None
        )
        return response.batch

    async def wait_batch(
        self, batch_id: str, *, poll_s: float = 1.0, wait_s: float | None = None
    ) -> batch_pb2.Batch:
        """Poll `get_batch` every `poll_s` until the batch is final; TimeoutError after `wait_s`."""
        deadline = batch_deadline(wait_s)
        while batch_pending(batch := await self.get_batch(batch_id), batch_id, deadline):
            await asyncio.sleep(poll_s)
        return batch

    async def _call(self, rpc: Any, request: Any, timeout_s: float | None, request_id: str | None) -> Any:
        async with _AsyncRpcErrors():
            return await rpc(request, **self._options(timeout_s, request_id))

    @staticmethod
    async def _iterate(call: Any) -> AsyncIterator[Any]:
        try:
            async with _AsyncRpcErrors():
                async for chunk in call:
                    yield chunk
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

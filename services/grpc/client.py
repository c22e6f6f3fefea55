"""A small typed Python client for phiserve's gRPC API, synchronous and asyncio.

    from services.grpc.client import AsyncClient, Client, image, user

    with Client("127.0.0.1:9000", api_key=key) as client:
        print(client.chat("phi-3.5-mini", [user("Hi!")], max_tokens=16).choices[0].message.text)
        for chunk in client.chat_stream("phi-3.5-moe", [user("Stream!")], max_tokens=16):
            print(chunk.choices[0].delta.content if chunk.choices else "", end="")

    async with AsyncClient("127.0.0.1:9000", api_key=key) as client:
        async for chunk in client.chat_stream("phi-3.5-vision", [user("Describe it", image(png))]):
            ...

The Batch API (files and batches of the caller's tenant):

    with Client("127.0.0.1:9000", api_key=key) as client:
        file = client.upload_file(jsonl_bytes, filename="in.jsonl")
        batch = client.create_batch(file.id, "/v1/chat/completions", metadata={"job": "nightly"})
        batch = client.wait_batch(batch.id)          # polls get_batch until final
        lines = client.file_content(batch.output_file_id).decode().splitlines()

Keyword arguments of the calls are `SamplingParams` fields (max_tokens, temperature, top_p,
top_k, stop, presence_penalty, frequency_penalty, repetition_penalty, seed, ignore_eos).
`timeout_s` sets the call's deadline: when it passes the server aborts the generation.
Failed calls raise `PhiserveRpcError`, which carries the rich status details.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
from google.rpc import error_details_pb2, status_pb2

from services.grpc.gen.phiserve.v1 import batch_pb2, chat_pb2, common_pb2, models_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc

__all__ = [
    "FINAL_BATCH_STATUSES",
    "AsyncClient",
    "Client",
    "PhiserveRpcError",
    "assistant",
    "image",
    "message",
    "sampling",
    "system",
    "user",
]

_ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_DEVELOPER,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
}


# A batch in one of these states changes no more; its files are written.
FINAL_BATCH_STATUSES = frozenset(
    {
        batch_pb2.BATCH_STATUS_COMPLETED,
        batch_pb2.BATCH_STATUS_FAILED,
        batch_pb2.BATCH_STATUS_CANCELLED,
        batch_pb2.BATCH_STATUS_EXPIRED,
    }
)


# -- building requests -----------------------------------------------------------------


def image(source: bytes | str) -> chat_pb2.ContentPart:
    """An image part: raw PNG/JPEG bytes, or a data: (or allowed http(s)) URL."""
    if isinstance(source, bytes):
        return chat_pb2.ContentPart(image=chat_pb2.Image(data=source))
    return chat_pb2.ContentPart(image=chat_pb2.Image(url=source))


def message(role: str, text: str = "", *images: chat_pb2.ContentPart | bytes) -> chat_pb2.ChatMessage:
    """A chat message; with images, the text and the images become parts."""
    if not images:
        return chat_pb2.ChatMessage(role=_ROLES[role], text=text)
    parts = [chat_pb2.ContentPart(text=text)] if text else []
    parts += [part if isinstance(part, chat_pb2.ContentPart) else image(part) for part in images]
    return chat_pb2.ChatMessage(role=_ROLES[role], parts=parts)


def system(text: str) -> chat_pb2.ChatMessage:
    return message("system", text)


def user(text: str = "", *images: chat_pb2.ContentPart | bytes) -> chat_pb2.ChatMessage:
    return message("user", text, *images)


def assistant(text: str) -> chat_pb2.ChatMessage:
    return message("assistant", text)


def sampling(**fields: Any) -> common_pb2.SamplingParams:
    """`SamplingParams` from keyword arguments; None leaves a field unset (its default)."""
    fields = {name: value for name, value in fields.items() if value is not None}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return common_pb2.SamplingParams(**fields)


# -- errors ------------------------------------------------------------------------------


class PhiserveRpcError(Exception):
    """A failed call: the gRPC code and message, and phiserve's details.

    `error_code` is the REST API's `code` (e.g. "rate_limit_exceeded"), `param` the REST
    field name, `field` the request's proto field path (INVALID_ARGUMENT), and
    `retry_after_s` the server's RetryInfo (RESOURCE_EXHAUSTED, UNAVAILABLE).
    """

    def __init__(self, code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.metadata = {key: value for key, value in trailing if isinstance(value, str)}
        self.request_id = self.metadata.get("x-request-id")
        self.reason: str | None = None
        self.error_code: str | None = None
        self.param: str | None = None
        self.field: str | None = None
        self.retry_after_s: float | None = None
        self.details: list[Any] = []
        for key, value in trailing:
            if key == "grpc-status-details-bin":
                self._read_details(status_pb2.Status.FromString(value))

    def _read_details(self, status: status_pb2.Status) -> None:
        for packed in status.details:
            for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
                if packed.Is(cls.DESCRIPTOR):
                    detail = cls()
                    packed.Unpack(detail)
                    self.details.append(detail)
                    self._note(detail)

    def _note(self, detail: Any) -> None:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            self.reason = detail.reason
            self.error_code = detail.metadata.get("code") or None
            self.param = detail.metadata.get("param") or None
        elif isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
            self.field = detail.field_violations[0].field
        elif isinstance(detail, error_details_pb2.RetryInfo):
            self.retry_after_s = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9

    @classmethod
    def from_call(cls, error: grpc.RpcError) -> PhiserveRpcError:
        trailing = error.trailing_metadata() or ()  # type: ignore[attr-defined]
        return cls(error.code(), error.details() or "", tuple(trailing))  # type: ignore[attr-defined]


class _AsyncRpcErrors:
    """`async with`: turn an aio RpcError into PhiserveRpcError."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            raise PhiserveRpcError(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ())) from None


# -- clients -----------------------------------------------------------------------------


def _metadata(api_key: str | None, request_id: str | None) -> tuple[tuple[str, str], ...]:
    items = []
    if api_key:
        items.append(("authorization", f"Bearer {api_key}"))
    if request_id:
        items.append(("x-request-id", request_id))
    return tuple(items)


def _chat(model: str, messages: Iterable[chat_pb2.ChatMessage], user_id: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": list(messages), "sampling": sampling(**fields), "user": user_id}


def _create_batch(
    input_file_id: str, endpoint: str, completion_window: str, metadata: Mapping[str, str] | None
) -> pb.CreateBatchRequest:
    return pb.CreateBatchRequest(
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=completion_window,
        metadata=dict(metadata or {}),
    )


def _list_batches(after: str | None, limit: int) -> pb.ListBatchesRequest:
    return pb.ListBatchesRequest(after=after or "", limit=limit)


class _Base:
    def __init__(self, api_key: str | None, timeout_s: float | None) -> None:
        self._api_key = api_key
        self._timeout_s = timeout_s

    def _options(self, timeout_s: float | None, request_id: str | None) -> dict[str, Any]:
        return {
            "metadata": _metadata(self._api_key, request_id),
            "timeout": timeout_s if timeout_s is not None else self._timeout_s,
        }


class Client(_Base):
    """Synchronous client. `target` is "host:port"; `channel` overrides it (TLS, options)."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        super().__init__(api_key, timeout_s)
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def chat(
        self,
        model: str,
        messages: Iterable[chat_pb2.ChatMessage],
        *,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> pb.ChatResponse:
        request = pb.ChatRequest(**_chat(model, messages, user, **fields))
        try:
            response: pb.ChatResponse = self._stub.Chat(request, **self._options(timeout_s, request_id))
        except grpc.RpcError as exc:
            raise PhiserveRpcError.from_call(exc) from None
        return response

    def chat_stream(
        self,
        model: str,
        messages: Iterable[chat_pb2.ChatMessage],
        *,
        include_usage: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> Iterator[pb.ChatStreamResponse]:
        """Chunks as they are generated; leaving the loop early cancels the call."""
        request = pb.ChatStreamRequest(**_chat(model, messages, user, **fields), include_usage=include_usage)
        return self._iterate(self._stub.ChatStream(request, **self._options(timeout_s, request_id)))

    def complete(
        self,
        model: str,
        prompt: str,
        *,
        echo: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> pb.CompleteResponse:
        request = pb.CompleteRequest(model=model, prompt=prompt, echo=echo, user=user, sampling=sampling(**fields))
        try:
            response: pb.CompleteResponse = self._stub.Complete(request, **self._options(timeout_s, request_id))
        except grpc.RpcError as exc:
            raise PhiserveRpcError.from_call(exc) from None
        return response

    def complete_stream(
        self,
        model: str,
        prompt: str,
        *,
        echo: bool = False,
        include_usage: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> Iterator[pb.CompleteStreamResponse]:
        request = pb.CompleteStreamRequest(
            model=model, prompt=prompt, echo=echo, user=user, include_usage=include_usage, sampling=sampling(**fields)
        )
        return self._iterate(self._stub.CompleteStream(request, **self._options(timeout_s, request_id)))

    def list_models(self, *, timeout_s: float | None = None) -> list[models_pb2.Model]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), **self._options(timeout_s, None))
        except grpc.RpcError as exc:
            raise PhiserveRpcError.from_call(exc) from None
        return list(response.models)

    # -- Batch API ------------------------------------------------------------------

    def upload_file(
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
        response: pb.UploadFileResponse = self._call(self._stub.UploadFile, request, timeout_s, request_id)
        return response.file

    def get_file(self, file_id: str, *, timeout_s: float | None = None) -> batch_pb2.File:
        response: pb.GetFileResponse = self._call(
            self._stub.GetFile, pb.GetFileRequest(file_id=file_id), timeout_s, None
        )
        return response.file

    def file_content(self, file_id: str, *, timeout_s: float | None = None) -> bytes:
        """A file's whole content (input, output or error file), from its chunks."""
        call = self._stub.GetFileContent(pb.GetFileContentRequest(file_id=file_id), **self._options(timeout_s, None))
        return b"".join(chunk.data for chunk in self._iterate(call))

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str = "/v1/chat/completions",
        *,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> batch_pb2.Batch:
        request = _create_batch(input_file_id, endpoint, completion_window, metadata)
        response: pb.CreateBatchResponse = self._call(self._stub.CreateBatch, request, timeout_s, request_id)
        return response.batch

    def get_batch(self, batch_id: str, *, timeout_s: float | None = None) -> batch_pb2.Batch:
        response: pb.GetBatchResponse = self._call(
            self._stub.GetBatch, pb.GetBatchRequest(batch_id=batch_id), timeout_s, None
        )
        return response.batch

    def list_batches(
        self, *, after: str | None = None, limit: int = 20, timeout_s: float | None = None
    ) -> pb.ListBatchesResponse:
        """One page, newest first; pass the page's `last_id` as `after` while `has_more`."""
        response: pb.ListBatchesResponse = self._call(
            self._stub.ListBatches, _list_batches(after, limit), timeout_s, None
        )
        return response

    def cancel_batch(self, batch_id: str, *, timeout_s: float | None = None) -> batch_pb2.Batch:
        response: pb.CancelBatchResponse = self._call(
            self._stub.CancelBatch, pb.CancelBatchRequest(batch_id=batch_id), timeout_s, None
        )
        return response.batch

    def wait_batch(self, batch_id: str, *, poll_s: float = 1.0, wait_s: float | None = None) -> batch_pb2.Batch:
        """Poll `get_batch` every `poll_s` until the batch is final; TimeoutError after `wait_s`."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while (batch := self.get_batch(batch_id)).status not in FINAL_BATCH_STATUSES:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} is still {batch_pb2.BatchStatus.Name(batch.status)}")
            time.sleep(poll_s)
        return batch

    def _call(self, rpc: Any, request: Any, timeout_s: float | None, request_id: str | None) -> Any:
        try:
            return rpc(request, **self._options(timeout_s, request_id))
        except grpc.RpcError as exc:
            raise PhiserveRpcError.from_call(exc) from None

    @staticmethod
    def _iterate(call: Any) -> Iterator[Any]:
        try:
            yield from call
        except grpc.RpcError as exc:
            raise PhiserveRpcError.from_call(exc) from None
        finally:
            call.cancel()  # a no-op when the call is done; cancels it when the caller left early

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
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
        request = pb.ChatRequest(**_chat(model, messages, user, **fields))
        async with _AsyncRpcErrors():
            response: pb.ChatResponse = await self._stub.Chat(request, **self._options(timeout_s, request_id))
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
        request = pb.ChatStreamRequest(**_chat(model, messages, user, **fields), include_usage=include_usage)
        call = self._stub.ChatStream(request, **self._options(timeout_s, request_id))
        async for chunk in self._iterate(call):
            yield chunk

    async def complete(
        self,
        model: str,
        prompt: str,
        *,
        echo: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> pb.CompleteResponse:
        request = pb.CompleteRequest(model=model, prompt=prompt, echo=echo, user=user, sampling=sampling(**fields))
        async with _AsyncRpcErrors():
            response: pb.CompleteResponse = await self._stub.Complete(request, **self._options(timeout_s, request_id))
        return response

    async def complete_stream(
        self,
        model: str,
        prompt: str,
        *,
        echo: bool = False,
        include_usage: bool = False,
        user: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> AsyncIterator[pb.CompleteStreamResponse]:
        request = pb.CompleteStreamRequest(
            model=model, prompt=prompt, echo=echo, user=user, include_usage=include_usage, sampling=sampling(**fields)
        )
        call = self._stub.CompleteStream(request, **self._options(timeout_s, request_id))
        async for chunk in self._iterate(call):
            yield chunk

    async def list_models(self, *, timeout_s: float | None = None) -> list[models_pb2.Model]:
        async with _AsyncRpcErrors():
            response = await self._stub.ListModels(pb.ListModelsRequest(), **self._options(timeout_s, None))
        return list(response.models)

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
        response: pb.UploadFileResponse = await self._call(self._stub.UploadFile, request, timeout_s, request_id)
        return response.file

    async def get_file(self, file_id: str, *, timeout_s: float | None = None) -> batch_pb2.File:
        response: pb.GetFileResponse = await self._call(
            self._stub.GetFile, pb.GetFileRequest(file_id=file_id), timeout_s, None
        )
        return response.file

    async def file_content(self, file_id: str, *, timeout_s: float | None = None) -> bytes:
        """A file's whole content (input, output or error file), from its chunks."""
        call = self._stub.GetFileContent(pb.GetFileContentRequest(file_id=file_id), **self._options(timeout_s, None))
        return b"".join([chunk.data async for chunk in self._iterate(call)])

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
        request = _create_batch(input_file_id, endpoint, completion_window, metadata)
        response: pb.CreateBatchResponse = await self._call(self._stub.CreateBatch, request, timeout_s, request_id)
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
            self._stub.ListBatches, _list_batches(after, limit), timeout_s, None
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
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while (batch := await self.get_batch(batch_id)).status not in FINAL_BATCH_STATUSES:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} is still {batch_pb2.BatchStatus.Name(batch.status)}")
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

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
top_k, stop, presence_penalty, frequency_penalty, repetition_penalty, seed, ignore_eos, n,
stop_token_ids, min_tokens, logit_bias, min_p, max_completion_tokens) or fields of the request
message (chat: response_format=json_schema(...), tools=[tool(...)], tool_choice=tool_choice(...),
parallel_tool_calls, logprobs, top_logprobs, echo; completions: logprobs; streams:
continuous_usage_stats). A completion's prompt is a string, a list of strings or a list of
token-id lists.
`timeout_s` sets the call's deadline: when it passes the server aborts the generation.
Failed calls raise `PhiserveRpcError`, which carries the rich status details.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Self

import grpc

from services.grpc.aio_client import AsyncClient
from services.grpc.client_common import (
    FINAL_BATCH_STATUSES,
    ClientBase,
    PhiserveRpcError,
    Prompt,
    assistant,
    batch_deadline,
    batch_pending,
    chat_request,
    chat_stream_request,
    complete_request,
    complete_stream_request,
    create_batch_request,
    image,
    json_object,
    json_schema,
    list_batches_request,
    list_files_request,
    message,
    sampling,
    struct,
    system,
    tokenize_request,
    tool,
    tool_choice,
    user,
)
from services.grpc.gen.phiserve.v1 import batch_pb2, chat_pb2, models_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc

__all__ = [
    "FINAL_BATCH_STATUSES",
    "AsyncClient",
    "Client",
    "PhiserveRpcError",
    "assistant",
    "image",
    "json_object",
    "json_schema",
    "message",
    "sampling",
    "struct",
    "system",
    "tool",
    "tool_choice",
    "user",
]


class Client(ClientBase):
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
        request = chat_request(model, messages, user, fields)
        response: pb.ChatResponse = self._call(self._stub.Chat, request, timeout_s, request_id)
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
        request = chat_stream_request(model, messages, user, include_usage, fields)
        return self._iterate(self._stub.ChatStream(request, **self._options(timeout_s, request_id)))

    def complete(
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
        response: pb.CompleteResponse = self._call(self._stub.Complete, request, timeout_s, request_id)
        return response

    def complete_stream(
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
    ) -> Iterator[pb.CompleteStreamResponse]:
        request = complete_stream_request(model, prompt, echo, user, include_usage, fields)
        return self._iterate(self._stub.CompleteStream(request, **self._options(timeout_s, request_id)))

    def list_models(self, *, timeout_s: float | None = None) -> list[models_pb2.Model]:
        response: pb.ListModelsResponse = self._call(
            self._stub.ListModels, pb.ListModelsRequest(), timeout_s, None
        )
        return list(response.models)

    def get_model(self, model: str, *, timeout_s: float | None = None) -> models_pb2.Model:
        """One model the caller's tenant may use (NOT_FOUND otherwise, as an unknown one)."""
        response: pb.GetModelResponse = self._call(
            self._stub.GetModel, pb.GetModelRequest(model=model), timeout_s, None
        )
        return response.model

    def delete_model(self, model: str, *, timeout_s: float | None = None) -> pb.DeleteModelResponse:
        """Deletes one of the tenant's own adapters (NOT_FOUND for any other id)."""
        response: pb.DeleteModelResponse = self._call(
            self._stub.DeleteModel, pb.DeleteModelRequest(model=model), timeout_s, None
        )
        return response

    def tokenize(
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
        response: pb.TokenizeResponse = self._call(self._stub.Tokenize, request, timeout_s, None)
        return response

    def detokenize(self, model: str, tokens: Iterable[int], *, timeout_s: float | None = None) -> str:
        request = pb.DetokenizeRequest(model=model, tokens=list(tokens))
        response: pb.DetokenizeResponse = self._call(self._stub.Detokenize, request, timeout_s, None)
        return response.prompt

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
        call = self._stub.GetFileContent(
            pb.GetFileContentRequest(file_id=file_id), **self._options(timeout_s, None)
        )
        return b"".join(chunk.data for chunk in self._iterate(call))

    def list_files(
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
        response: pb.ListFilesResponse = self._call(self._stub.ListFiles, request, timeout_s, None)
        return response

    def delete_file(self, file_id: str, *, timeout_s: float | None = None) -> pb.DeleteFileResponse:
        response: pb.DeleteFileResponse = self._call(
            self._stub.DeleteFile, pb.DeleteFileRequest(file_id=file_id), timeout_s, None
        )
        return response

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
        request = create_batch_request(input_file_id, endpoint, completion_window, metadata)
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
            self._stub.ListBatches, list_batches_request(after, limit), timeout_s, None
        )
        return response

    def cancel_batch(self, batch_id: str, *, timeout_s: float | None = None) -> batch_pb2.Batch:
        response: pb.CancelBatchResponse = self._call(
            self._stub.CancelBatch, pb.CancelBatchRequest(batch_id=batch_id), timeout_s, None
        )
        return response.batch

    def wait_batch(
        self, batch_id: str, *, poll_s: float = 1.0, wait_s: float | None = None
    ) -> batch_pb2.Batch:
        """Poll `get_batch` every `poll_s` until the batch is final; TimeoutError after `wait_s`."""
        deadline = batch_deadline(wait_s)
        while batch_pending(batch := self.get_batch(batch_id), batch_id, deadline):
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

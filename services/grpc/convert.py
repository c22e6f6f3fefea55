"""Proto messages <-> the REST API's models and results, so gRPC runs the REST code path.

A gRPC request becomes the REST API's pydantic model (`ChatCompletionRequest`,
`CompletionRequest`) and is validated by it, so both APIs accept and refuse exactly the
same requests; the gateway's results become proto messages through `ResponseShape`s.
Errors name REST fields (`param`); `proto_field()` turns those into the proto field path
that `google.rpc.BadRequest` reports.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from typing import Any

from pydantic import ValidationError

from services.errors import InvalidRequest
from services.grpc.gen.phiserve.v1 import (
    batch_pb2,
    chat_pb2,
    common_pb2,
    completion_pb2,
    models_pb2,
)
from services.grpc.gen.phiserve.v1 import (
    inference_service_pb2 as pb,
)
from services.inference.errors import invalid_request_from
from services.inference.protocol.batches import BatchObject, BatchStatus, FileObject
from services.inference.protocol.batches import CreateBatchRequest as CreateBatchBody
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.protocol.completions import CompletionRequest
from services.pools.engine import GenerationResult

ROLES: dict[int, str] = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_DEVELOPER: "developer",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
}
FINISH_REASONS: dict[str | None, common_pb2.FinishReason] = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
MODALITIES: dict[str, models_pb2.Modality] = {
    "text": models_pb2.MODALITY_TEXT,
    "vision": models_pb2.MODALITY_VISION,
}
# SamplingParams fields with presence: unset means "the REST default", not zero.
OPTIONAL_SAMPLING = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
)
SAMPLING_FIELDS = frozenset((*OPTIONAL_SAMPLING, "stop", "ignore_eos"))
# Magic numbers of the image formats the vision pool decodes, for the data URL's type
# (the pool sniffs the bytes itself; the type only has to start with image/).
_IMAGE_MAGIC = (
    (b"\x89PNG", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF8", "gif"),
    (b"RIFF", "webp"),
    (b"BM", "bmp"),
)

ChatRequests = pb.ChatRequest | pb.ChatStreamRequest
CompleteRequests = pb.CompleteRequest | pb.CompleteStreamRequest


def sampling_fields(params: common_pb2.SamplingParams) -> dict[str, Any]:
    fields: dict[str, Any] = {
        name: getattr(params, name) for name in OPTIONAL_SAMPLING if params.HasField(name)
    }
    if params.stop:
        fields["stop"] = list(params.stop)
    if params.ignore_eos:
        fields["ignore_eos"] = True
    return fields


def _stream_fields(request: Any, stream: bool) -> dict[str, Any]:
    if not stream:
        return {}
    fields: dict[str, Any] = {"stream": True}
    if request.include_usage:
        fields["stream_options"] = {"include_usage": True}
    return fields


def _validated(model: type[Any], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid_request_from(exc.errors()) from None


def chat_body(request: ChatRequests, *, stream: bool) -> ChatCompletionRequest:
    raw: dict[str, Any] = {
        "model": request.model,
        "messages": [_message(message, i) for i, message in enumerate(request.messages)],
        **sampling_fields(request.sampling),
        **_stream_fields(request, stream),
    }
    if request.user:
        raw["user"] = request.user
    body: ChatCompletionRequest = _validated(ChatCompletionRequest, raw)
    return body


def completion_body(request: CompleteRequests, *, stream: bool) -> CompletionRequest:
    raw: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt,
        "echo": request.echo,
        **sampling_fields(request.sampling),
        **_stream_fields(request, stream),
    }
    if request.user:
        raw["user"] = request.user
    body: CompletionRequest = _validated(CompletionRequest, raw)
    return body


def _message(message: chat_pb2.ChatMessage, i: int) -> dict[str, Any]:
    raw: dict[str, Any] = {"role": ROLES.get(message.role)}  # None: refused as messages[i].role
    if message.name:
        raw["name"] = message.name
    if message.text and message.parts:
        raise InvalidRequest("set either text or parts of a message, not both", param=f"messages[{i}]")
    if message.parts:
        raw["content"] = [_part(part, i, j) for j, part in enumerate(message.parts)]
    else:
        raw["content"] = message.text
    return raw


def _part(part: chat_pb2.ContentPart, i: int, j: int) -> dict[str, Any]:
    kind = part.WhichOneof("part")
    if kind == "text":
        return {"type": "text", "text": part.text}
    if kind == "image":
        source = part.image.WhichOneof("source")
        if source == "data":
            return {"type": "image_url", "image_url": {"url": data_url(part.image.data)}}
        if source == "url":
            return {"type": "image_url", "image_url": {"url": part.image.url}}
        raise InvalidRequest("an image needs data or url", param=f"messages[{i}].content[{j}].image_url")
    raise InvalidRequest("a content part needs text or image", param=f"messages[{i}].content[{j}]")


def data_url(image: bytes) -> str:
    kind = next((name for magic, name in _IMAGE_MAGIC if image.startswith(magic)), "unknown")
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


# Batch API requests: REST's `param` names that differ from the proto field.
BATCH_FIELDS = {"file": "data"}
# Default page size of ListBatches, as GET /v1/batches.
DEFAULT_BATCH_PAGE = 20

_CONTENT = re.compile(r"^messages\[(\d+)\]\.content(?:\[(\d+)\](\.image_url.*)?)?")


def proto_field(param: str | None, renames: dict[str, str] | None = None) -> str | None:
    """A REST `param` ("temperature", "messages[0].content[1].image_url.url") as the
    field path of the gRPC request ("sampling.temperature", "messages[0].parts[1].image").
    `renames` maps whole REST params of one RPC to its proto fields ("file" -> "data")."""
    if not param:
        return None
    if renames and param in renames:
        return renames[param]
    head = re.split(r"[.\[]", param, maxsplit=1)[0]
    if head in SAMPLING_FIELDS:
        return f"sampling.{param}"
    if head == "stream_options":
        return "include_usage"
    match = _CONTENT.match(param)
    if match is None:
        return param
    i, j, image = match.groups()
    if j is None:
        return f"messages[{i}]"  # text or parts
    return f"messages[{i}].parts[{j}]" + (".image" if image else "")


def finish(reason: str | None) -> common_pb2.FinishReason:
    return FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED)


class _Ids:
    """What every response message of one request repeats: the client's request id
    (echoed) and a response id of the server's own, never derived from the client's
    (issue 9, item 1)."""

    def __init__(self, prefix: str, request_id: str, model: str) -> None:
        self.id = f"{prefix}{uuid.uuid4().hex}"
        self.request_id, self.model, self.created = request_id, model, int(time.time())

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "request_id": self.request_id, "model": self.model, "created": self.created}


def usage(totals: dict[str, Any]) -> common_pb2.Usage:
    """The REST usage object (`services.inference.generation.usage`) as a message."""
    return common_pb2.Usage(
        prompt_tokens=totals["prompt_tokens"],
        completion_tokens=totals["completion_tokens"],
        total_tokens=totals["total_tokens"],
        prompt_tokens_details=common_pb2.PromptTokensDetails(
            cached_tokens=totals.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        ),
    )


def _result_usage(result: GenerationResult) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details=common_pb2.PromptTokensDetails(cached_tokens=result.cached_tokens),
    )


class ChatShape:
    """`ResponseShape` of Chat / ChatStream: ChatResponse and ChatStreamResponse messages."""

    def __init__(self, request_id: str, model: str) -> None:
        self._ids = _Ids("chatcmpl-", request_id, model)

    def response(self, result: GenerationResult) -> pb.ChatResponse:
        message = chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT, text=result.text)
        choice = chat_pb2.ChatChoice(index=0, message=message, finish_reason=finish(result.finish_reason))
        return pb.ChatResponse(**self._ids.fields(), choices=[choice], usage=_result_usage(result))

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> pb.ChatStreamResponse:
        delta = chat_pb2.ChatDelta(
            role=chat_pb2.ROLE_ASSISTANT if first else chat_pb2.ROLE_UNSPECIFIED, content=text
        )
        choice = chat_pb2.ChatStreamChoice(index=0, delta=delta, finish_reason=finish(finish_reason))
        return pb.ChatStreamResponse(**self._ids.fields(), choices=[choice])

    def usage_chunk(self, totals: dict[str, Any]) -> pb.ChatStreamResponse:
        return pb.ChatStreamResponse(**self._ids.fields(), usage=usage(totals))


class CompletionShape:
    """`ResponseShape` of Complete / CompleteStream."""

    def __init__(self, request_id: str, model: str, *, echo_prefix: str = "") -> None:
        self._ids = _Ids("cmpl-", request_id, model)
        self._echo_prefix = echo_prefix

    def response(self, result: GenerationResult) -> pb.CompleteResponse:
        choice = completion_pb2.CompletionChoice(
            index=0, text=self._echo_prefix + result.text, finish_reason=finish(result.finish_reason)
        )
        return pb.CompleteResponse(**self._ids.fields(), choices=[choice], usage=_result_usage(result))

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> pb.CompleteStreamResponse:
        if first:
            text = self._echo_prefix + text
        choice = completion_pb2.CompletionChoice(index=0, text=text, finish_reason=finish(finish_reason))
        return pb.CompleteStreamResponse(**self._ids.fields(), choices=[choice])

    def usage_chunk(self, totals: dict[str, Any]) -> pb.CompleteStreamResponse:
        return pb.CompleteStreamResponse(**self._ids.fields(), usage=usage(totals))


class Collector:
    """A `ResponseShape` that keeps the raw pieces, to build one unary result from a stream."""

    def response(self, result: GenerationResult) -> GenerationResult:
        return result

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> tuple[str, str | None]:
        return text, finish_reason

    def usage_chunk(self, totals: dict[str, Any]) -> dict[str, Any]:
        return totals


def models_response(listing: dict[str, Any]) -> pb.ListModelsResponse:
    """The REST listing (`ModelsService.list()`) as proto, so both list the same models."""
    return pb.ListModelsResponse(
        models=[
            models_pb2.Model(
                id=entry["id"],
                root=entry["root"],
                pool=entry["pool"],
                modality=MODALITIES.get(entry["modality"], models_pb2.MODALITY_UNSPECIFIED),
                max_model_len=entry["max_model_len"],
                max_images_per_request=entry["max_images_per_request"],
                created=entry["created"],
                owned_by=entry["owned_by"],
            )
            for entry in listing["data"]
        ]
    )


# -- Batch API ---------------------------------------------------------------------------

BATCH_STATUSES: dict[BatchStatus, batch_pb2.BatchStatus] = {
    BatchStatus.validating: batch_pb2.BATCH_STATUS_VALIDATING,
    BatchStatus.in_progress: batch_pb2.BATCH_STATUS_IN_PROGRESS,
    BatchStatus.finalizing: batch_pb2.BATCH_STATUS_FINALIZING,
    BatchStatus.completed: batch_pb2.BATCH_STATUS_COMPLETED,
    BatchStatus.failed: batch_pb2.BATCH_STATUS_FAILED,
    BatchStatus.cancelling: batch_pb2.BATCH_STATUS_CANCELLING,
    BatchStatus.cancelled: batch_pb2.BATCH_STATUS_CANCELLED,
    BatchStatus.expired: batch_pb2.BATCH_STATUS_EXPIRED,
}
_BATCH_TIMES = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def create_batch_body(request: pb.CreateBatchRequest) -> CreateBatchBody:
    """CreateBatch as REST's body, validated by the same model (unset window: "24h")."""
    raw: dict[str, Any] = {"input_file_id": request.input_file_id, "endpoint": request.endpoint}
    if request.completion_window:
        raw["completion_window"] = request.completion_window
    if request.metadata:
        raw["metadata"] = dict(request.metadata)
    body: CreateBatchBody = _validated(CreateBatchBody, raw)
    return body


def batch_message(batch: BatchObject) -> batch_pb2.Batch:
    """REST's Batch object as proto: the same fields, null as unset."""
    message = batch_pb2.Batch(
        id=batch.id,
        endpoint=batch.endpoint,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=BATCH_STATUSES.get(batch.status, batch_pb2.BATCH_STATUS_UNSPECIFIED),
        created_at=batch.created_at,
        request_counts=batch_pb2.BatchRequestCounts(
            total=batch.request_counts.total,
            completed=batch.request_counts.completed,
            failed=batch.request_counts.failed,
        ),
        metadata=batch.metadata or {},
    )
    if batch.output_file_id:
        message.output_file_id = batch.output_file_id
    if batch.error_file_id:
        message.error_file_id = batch.error_file_id
    for name in _BATCH_TIMES:
        value = getattr(batch, name)
        if value is not None:
            setattr(message, name, value)
    for entry in batch.errors.data if batch.errors else ():
        error = batch_pb2.BatchError(
            code=str(entry.get("code") or ""),
            message=str(entry.get("message") or ""),
            param=str(entry.get("param") or ""),
        )
        if isinstance(entry.get("line"), int):
            error.line = entry["line"]
        message.errors.append(error)
    return message


def file_message(file: FileObject) -> batch_pb2.File:
    return batch_pb2.File(
        id=file.id,
        bytes=file.bytes,
        created_at=file.created_at,
        filename=file.filename,
        purpose=file.purpose,
        status=file.status,
    )


def list_batches_response(batches: list[BatchObject], has_more: bool) -> pb.ListBatchesResponse:
    return pb.ListBatchesResponse(
        batches=[batch_message(batch) for batch in batches],
        first_id=batches[0].id if batches else "",
        last_id=batches[-1].id if batches else "",
        has_more=has_more,
    )

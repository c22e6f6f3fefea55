"""Proto requests -> the REST API's request models, so gRPC runs the REST code path.

A gRPC request becomes the REST API's pydantic model (`ChatCompletionRequest`,
`CompletionRequest`, `CreateBatchRequest`) and is validated by it, so both APIs accept and
refuse exactly the same requests. Errors name REST fields (`param`); `proto_field()` turns
those into the proto field path that `google.rpc.BadRequest` reports. The answers go the
other way in `responses.py` (generation, models) and `batch_messages.py` (files, batches).
"""

from __future__ import annotations

import base64
import re
from typing import Any

from pydantic import ValidationError

from services.errors import InvalidRequest
from services.grpc.gen.phiserve.v1 import chat_pb2, common_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.inference.errors import invalid_request_from
from services.inference.protocol.batches import CreateBatchRequest as CreateBatchBody
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.protocol.completions import CompletionRequest

ROLES: dict[int, str] = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_DEVELOPER: "developer",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
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


def create_batch_body(request: pb.CreateBatchRequest) -> CreateBatchBody:
    """CreateBatch as REST's body, validated by the same model (unset window: "24h")."""
    raw: dict[str, Any] = {"input_file_id": request.input_file_id, "endpoint": request.endpoint}
    if request.completion_window:
        raw["completion_window"] = request.completion_window
    if request.metadata:
        raw["metadata"] = dict(request.metadata)
    body: CreateBatchBody = _validated(CreateBatchBody, raw)
    return body

"""What the sync and asyncio gRPC clients share: message and request building, the
`PhiserveRpcError` conversion of failed calls, call options and the batch polling rule.

The public names are re-exported by `services.grpc.client`; import them from there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from services.grpc.gen.phiserve.v1 import batch_pb2, chat_pb2, common_pb2, completion_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb

_ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_DEVELOPER,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
}
_TOOL_CHOICE_MODES = {
    "none": chat_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": chat_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": chat_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
# Keyword arguments of the calls that are SamplingParams fields; the others are fields of
# the request message itself (response_format, tools, logprobs, continuous_usage_stats, ...).
_SAMPLING_NAMES = frozenset(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


# A batch in one of these states changes no more; its files are written.
FINAL_BATCH_STATUSES = frozenset(
    {
        batch_pb2.BATCH_STATUS_COMPLETED,
        batch_pb2.BATCH_STATUS_FAILED,
        batch_pb2.BATCH_STATUS_CANCELLED,
        batch_pb2.BATCH_STATUS_EXPIRED,
    }
)


# -- building messages -------------------------------------------------------------------


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


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object (a JSON schema, say) as a google.protobuf.Struct."""
    message = struct_pb2.Struct()
    message.update(value)
    return message


def json_schema(
    name: str, schema: Mapping[str, Any], *, strict: bool | None = True
) -> chat_pb2.ResponseFormat:
    """response_format: JSON following `schema`."""
    return chat_pb2.ResponseFormat(
        json_schema=chat_pb2.JsonSchemaFormat(name=name, schema=struct(schema), strict=strict)
    )


def json_object() -> chat_pb2.ResponseFormat:
    """response_format: any JSON object."""
    return chat_pb2.ResponseFormat(json_object=chat_pb2.JsonObjectFormat())


def tool(name: str, parameters: Mapping[str, Any] | None = None, description: str = "") -> chat_pb2.Tool:
    """A function tool; `parameters` is the JSON schema of its arguments."""
    function = chat_pb2.FunctionDefinition(name=name, description=description)
    if parameters is not None:
        function.parameters.CopyFrom(struct(parameters))
    return chat_pb2.Tool(function=function)


def tool_choice(choice: str) -> chat_pb2.ToolChoice:
    """ "none", "auto", "required", or the name of the function the model must call."""
    if choice in _TOOL_CHOICE_MODES:
        return chat_pb2.ToolChoice(mode=_TOOL_CHOICE_MODES[choice])
    return chat_pb2.ToolChoice(function_name=choice)


def sampling(**fields: Any) -> common_pb2.SamplingParams:
    """`SamplingParams` from keyword arguments; None leaves a field unset (its default)."""
    fields = {name: value for name, value in fields.items() if value is not None}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return common_pb2.SamplingParams(**fields)


# -- building requests -------------------------------------------------------------------


def _fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments as request fields: SamplingParams' into `sampling`, the rest as they
    are (None left out, so the field stays unset)."""
    given = {name: value for name, value in fields.items() if value is not None}
    request = {name: value for name, value in given.items() if name not in _SAMPLING_NAMES}
    return {**request, "sampling": sampling(**{k: v for k, v in given.items() if k in _SAMPLING_NAMES})}


def _chat(
    model: str, messages: Iterable[chat_pb2.ChatMessage], user_id: str, **fields: Any
) -> dict[str, Any]:
    return {"model": model, "messages": list(messages), "user": user_id, **_fields(fields)}


Prompt = str | Sequence[str] | Sequence[Sequence[int]]


def _prompt(prompt: Prompt) -> dict[str, Any]:
    """A prompt, a list of prompts, or a list of token-id prompts, as the request's field."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if prompt and all(isinstance(p, str) for p in prompt):
        return {"prompts": list(prompt)}
    token_prompts = cast("Sequence[Sequence[int]]", prompt)
    return {"token_prompts": [completion_pb2.TokenIds(ids=list(ids)) for ids in token_prompts]}


def chat_request(
    model: str, messages: Iterable[chat_pb2.ChatMessage], user_id: str, fields: Mapping[str, Any]
) -> pb.ChatRequest:
    return pb.ChatRequest(**_chat(model, messages, user_id, **fields))


def chat_stream_request(
    model: str,
    messages: Iterable[chat_pb2.ChatMessage],
    user_id: str,
    include_usage: bool,
    fields: Mapping[str, Any],
) -> pb.ChatStreamRequest:
    return pb.ChatStreamRequest(**_chat(model, messages, user_id, **fields), include_usage=include_usage)


def complete_request(
    model: str, prompt: Prompt, echo: bool, user_id: str, fields: Mapping[str, Any]
) -> pb.CompleteRequest:
    return pb.CompleteRequest(model=model, echo=echo, user=user_id, **_prompt(prompt), **_fields(fields))


def complete_stream_request(
    model: str, prompt: Prompt, echo: bool, user_id: str, include_usage: bool, fields: Mapping[str, Any]
) -> pb.CompleteStreamRequest:
    return pb.CompleteStreamRequest(
        model=model,
        echo=echo,
        user=user_id,
        include_usage=include_usage,
        **_prompt(prompt),
        **_fields(fields),
    )


def create_batch_request(
    input_file_id: str, endpoint: str, completion_window: str, metadata: Mapping[str, str] | None
) -> pb.CreateBatchRequest:
    return pb.CreateBatchRequest(
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=completion_window,
        metadata=dict(metadata or {}),
    )


def tokenize_request(
    model: str, prompt: str, messages: Iterable[chat_pb2.ChatMessage], fields: Mapping[str, Any]
) -> pb.TokenizeRequest:
    given = {name: value for name, value in fields.items() if value is not None}
    return pb.TokenizeRequest(model=model, prompt=prompt, messages=list(messages), **given)


_LIST_ORDERS = {None: pb.LIST_ORDER_UNSPECIFIED, "desc": pb.LIST_ORDER_DESC, "asc": pb.LIST_ORDER_ASC}


def list_files_request(
    purpose: str | None, order: str | None, after: str | None, limit: int
) -> pb.ListFilesRequest:
    return pb.ListFilesRequest(
        purpose=purpose or "", order=_LIST_ORDERS[order], after=after or "", limit=limit
    )


def list_batches_request(after: str | None, limit: int) -> pb.ListBatchesRequest:
    return pb.ListBatchesRequest(after=after or "", limit=limit)


def batch_deadline(wait_s: float | None) -> float | None:
    return None if wait_s is None else time.monotonic() + wait_s


def batch_pending(batch: batch_pb2.Batch, batch_id: str, deadline: float | None) -> bool:
    """True while the batch is not final; TimeoutError once `deadline` has passed."""
    if batch.status in FINAL_BATCH_STATUSES:
        return False
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"batch {batch_id} is still {batch_pb2.BatchStatus.Name(batch.status)}")
    return True


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
            for cls in (
                error_details_pb2.ErrorInfo,
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
            ):
                detail = cls()
                if packed.Unpack(detail):  # False when the packed type is another
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
        # A sync call gives grpc's (key, value) namedtuples, an aio call an aio.Metadata: both
        # iterate as pairs, which the stub's tuple[_Metadatum, ...] does not say.
        trailing = cast("Iterable[tuple[str, Any]]", error.trailing_metadata() or ())
        return cls(error.code(), error.details() or "", tuple(trailing))


# -- call options ------------------------------------------------------------------------


def _metadata(api_key: str | None, request_id: str | None) -> tuple[tuple[str, str], ...]:
    items = []
    if api_key:
        items.append(("authorization", f"Bearer {api_key}"))
    if request_id:
        items.append(("x-request-id", request_id))
    return tuple(items)


class ClientBase:
    def __init__(self, api_key: str | None, timeout_s: float | None) -> None:
        self._api_key = api_key
        self._timeout_s = timeout_s

    def _options(self, timeout_s: float | None, request_id: str | None) -> dict[str, Any]:
        return {
            "metadata": _metadata(self._api_key, request_id),
            "timeout": timeout_s if timeout_s is not None else self._timeout_s,
        }

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

from google.protobuf import json_format, struct_pb2
from pydantic import ValidationError

from services.errors import InvalidRequest
from services.grpc.gen.phiserve.v1 import chat_pb2, common_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.inference.errors import invalid_request_from
from services.inference.protocol.batches import MAX_FILE_LIST_LIMIT, FileListOrder
from services.inference.protocol.batches import CreateBatchRequest as CreateBatchBody
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.protocol.completions import CompletionRequest
from services.inference.protocol.tokenize import DetokenizeRequest, TokenizeRequest

ROLES: dict[int, str] = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_DEVELOPER: "developer",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}
TOOL_CHOICE_MODES: dict[int, str] = {
    chat_pb2.TOOL_CHOICE_MODE_NONE: "none",
    chat_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
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
    "n",
    "min_p",
    "max_completion_tokens",
)
SAMPLING_FIELDS = frozenset(
    (*OPTIONAL_SAMPLING, "stop", "ignore_eos", "stop_token_ids", "min_tokens", "logit_bias")
)
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
    if params.stop_token_ids:
        fields["stop_token_ids"] = list(params.stop_token_ids)
    if params.min_tokens:
        fields["min_tokens"] = params.min_tokens
    if params.logit_bias:
        # REST's keys are token ids as JSON strings (OpenAI's shape).
        fields["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
    return fields


def _stream_fields(request: Any, stream: bool) -> dict[str, Any]:
    if not stream:
        return {}
    fields: dict[str, Any] = {"stream": True}
    options = {name: True for name in ("include_usage", "continuous_usage_stats") if getattr(request, name)}
    if options:
        fields["stream_options"] = options
    return fields


def struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as the JSON object it holds. Struct numbers are doubles, so integral ones
    become ints again: a JSON schema's `"maxItems": 3` must not reach the grammar compiler
    as 3.0, which JSON Schema keywords that take integers refuse."""
    value: dict[str, Any] = _integral(json_format.MessageToDict(struct))
    return value


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


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
    raw.update(_chat_options(request))
    body: ChatCompletionRequest = _validated(ChatCompletionRequest, raw)
    return body


def _chat_options(request: ChatRequests) -> dict[str, Any]:
    """Structured output, tools, logprobs and echo, in REST's shape; unset fields are left
    out, so they take REST's defaults."""
    raw: dict[str, Any] = {}
    if request.HasField("response_format"):
        raw["response_format"] = _response_format(request.response_format)
    if request.tools:
        raw["tools"] = [_tool(tool) for tool in request.tools]
    if request.HasField("tool_choice"):
        raw["tool_choice"] = _tool_choice(request.tool_choice)
    if request.HasField("parallel_tool_calls"):
        raw["parallel_tool_calls"] = request.parallel_tool_calls
    if request.logprobs:
        raw["logprobs"] = True
    if request.HasField("top_logprobs"):
        raw["top_logprobs"] = request.top_logprobs
    if request.echo:
        raw["echo"] = True
    return raw


def _response_format(fmt: chat_pb2.ResponseFormat) -> dict[str, Any]:
    kind = fmt.WhichOneof("format")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.json_schema
        spec: dict[str, Any] = {"name": schema.name}
        if schema.description:
            spec["description"] = schema.description
        if schema.HasField("schema"):
            spec["schema"] = struct_dict(schema.schema)
        if schema.HasField("strict"):
            spec["strict"] = schema.strict
        return {"type": "json_schema", "json_schema": spec}
    return {"type": "text"}  # an empty ResponseFormat: free text, as unset


def _tool(tool: chat_pb2.Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description:
        function["description"] = tool.function.description
    if tool.function.HasField("parameters"):
        function["parameters"] = struct_dict(tool.function.parameters)
    if tool.function.HasField("strict"):
        function["strict"] = tool.function.strict
    return {"type": "function", "function": function}


def _tool_choice(choice: chat_pb2.ToolChoice) -> Any:
    if choice.WhichOneof("choice") == "function_name":
        return {"type": "function", "function": {"name": choice.function_name}}
    # An unknown or unset mode is None: as no tool_choice (with tools, refused as "auto").
    return TOOL_CHOICE_MODES.get(choice.mode)


def completion_body(request: CompleteRequests, *, stream: bool) -> CompletionRequest:
    raw: dict[str, Any] = {
        "model": request.model,
        "prompt": _prompt(request),
        "echo": request.echo,
        **sampling_fields(request.sampling),
        **_stream_fields(request, stream),
    }
    if request.user:
        raw["user"] = request.user
    if request.HasField("logprobs"):
        raw["logprobs"] = request.logprobs
    body: CompletionRequest = _validated(CompletionRequest, raw)
    return body


def _prompt(request: CompleteRequests) -> str | list[str] | list[list[int]]:
    """prompt, prompts or token_prompts: REST's one `prompt` field, whose checks (empty,
    too many, negative ids) then apply to whichever was sent."""
    given = [name for name in PROMPT_FIELDS if getattr(request, name)]
    if len(given) > 1:
        raise InvalidRequest(
            f"set one of prompt, prompts and token_prompts, not {' and '.join(given)}", param=given[1]
        )
    if request.prompts:
        return list(request.prompts)
    if request.token_prompts:
        return [list(prompt.ids) for prompt in request.token_prompts]
    return request.prompt


def prompt_renames(request: CompleteRequests) -> dict[str, str]:
    """REST's `prompt` param as the field the request used (prompts[3], token_prompts[0])."""
    used = next((name for name in PROMPT_FIELDS[1:] if getattr(request, name)), None)
    return {"prompt": used} if used else {}


def _message(message: chat_pb2.ChatMessage, i: int) -> dict[str, Any]:
    raw: dict[str, Any] = {"role": ROLES.get(message.role)}  # None: refused as messages[i].role
    if message.name:
        raw["name"] = message.name
    if message.text and message.parts:
        raise InvalidRequest("set either text or parts of a message, not both", param=f"messages[{i}]")
    if message.parts:
        raw["content"] = [_part(part, i, j) for j, part in enumerate(message.parts)]
    elif message.text or not message.tool_calls:
        raw["content"] = message.text
    else:
        raw["content"] = None  # an assistant turn of calls only, as OpenAI's content: null
    if message.tool_calls:
        raw["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        raw["tool_call_id"] = message.tool_call_id
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


PROMPT_FIELDS = ("prompt", "prompts", "token_prompts")
# Batch API requests: REST's `param` names that differ from the proto field.
BATCH_FIELDS = {"file": "data"}
# Default page size of ListBatches, as GET /v1/batches.
DEFAULT_BATCH_PAGE = 20

_CONTENT = re.compile(r"^messages\[(\d+)\]\.content(?:\[(\d+)\](\.image_url.*)?)?")
# REST's tool_calls[j].function.name is the proto's flat tool_calls[j].name.
_TOOL_CALL = re.compile(r"^(messages\[\d+\]\.tool_calls\[\d+\])(?:\.(?:function\.)?(\w+))?")


def proto_field(param: str | None, renames: dict[str, str] | None = None) -> str | None:
    """A REST `param` ("temperature", "messages[0].content[1].image_url.url") as the
    field path of the gRPC request ("sampling.temperature", "messages[0].parts[1].image").
    `renames` maps whole REST params of one RPC to its proto fields ("file" -> "data"), or
    a param's head ("prompt" -> "token_prompts", so "prompt[2]" is "token_prompts[2]")."""
    if not param:
        return None
    if renames and param in renames:
        return renames[param]
    head = re.split(r"[.\[]", param, maxsplit=1)[0]
    if renames and head in renames:
        return renames[head] + param[len(head) :]
    if head in SAMPLING_FIELDS:
        return f"sampling.{param}"
    if head == "stream_options":
        return "continuous_usage_stats" if param.endswith(".continuous_usage_stats") else "include_usage"
    if head == "tool_choice":
        # REST's {"type": "function", "function": {"name"}} is the proto's function_name; a
        # union's member tags (pydantic's loc) are not fields of either.
        return "tool_choice.function_name" if param.endswith("function.name") else "tool_choice"
    if head == "response_format":
        # pydantic names the tagged union's member: response_format.json_schema.json_schema.name
        return re.sub(r"^response_format\.(json_schema|json_object|text)(?=\.\1)", "response_format", param)
    tool_call = _TOOL_CALL.match(param)
    if tool_call is not None:
        return tool_call.group(1) + (f".{tool_call.group(2)}" if tool_call.group(2) else "")
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


def tokenize_body(request: pb.TokenizeRequest) -> TokenizeRequest:
    """Tokenize as REST's body; the service refuses both or neither of prompt and messages,
    and tools with a prompt, naming the field."""
    raw: dict[str, Any] = {"model": request.model}
    if request.prompt:
        raw["prompt"] = request.prompt
    if request.messages:
        raw["messages"] = [_message(message, i) for i, message in enumerate(request.messages)]
    for name in ("add_special_tokens", "add_generation_prompt"):
        if request.HasField(name):
            raw[name] = getattr(request, name)
    if request.return_token_strs:
        raw["return_token_strs"] = True
    if request.tools:
        raw["tools"] = [_tool(tool) for tool in request.tools]
    if request.HasField("tool_choice"):
        raw["tool_choice"] = _tool_choice(request.tool_choice)
    body: TokenizeRequest = _validated(TokenizeRequest, raw)
    return body


def detokenize_body(request: pb.DetokenizeRequest) -> DetokenizeRequest:
    body: DetokenizeRequest = _validated(
        DetokenizeRequest, {"model": request.model, "tokens": list(request.tokens)}
    )
    return body


LIST_ORDERS: dict[int, FileListOrder] = {
    pb.LIST_ORDER_UNSPECIFIED: "desc",
    pb.LIST_ORDER_DESC: "desc",
    pb.LIST_ORDER_ASC: "asc",
}


def list_files_options(request: pb.ListFilesRequest) -> dict[str, Any]:
    """ListFiles as FileApi.list's filters (unset: every purpose, newest first, 10000)."""
    order = LIST_ORDERS.get(request.order)
    if order is None:
        raise InvalidRequest("order must be LIST_ORDER_ASC or LIST_ORDER_DESC", param="order")
    return {
        "purpose": request.purpose or None,
        "order": order,
        "after": request.after or None,
        "limit": request.limit or MAX_FILE_LIST_LIMIT,
    }

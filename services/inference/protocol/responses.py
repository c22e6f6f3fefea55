"""Wire models of every success body the API returns, shared by REST, gRPC and batch output.

The generation bodies (chat/completion responses and every stream chunk) are TypedDicts:
plain dicts at run time, so the hot path builds and serialises them at no extra cost and
nothing validates them twice; mypy checks their shape where they are built, and pydantic
reads them for the OpenAPI document (`response_model=` / `responses=` on the routes, which
return ready `JSONResponse`s, so FastAPI documents the model without validating each
response). gRPC converts from these (services/grpc/responses.py) and the batch worker
writes them as output lines, so all three transports carry one definition.

`typing_extensions.TypedDict`: pydantic reads `typing.TypedDict` only on Python >= 3.12.
"""

from __future__ import annotations

from typing import Literal, NotRequired

from typing_extensions import TypedDict

# vLLM's finish reasons (vllm.v1.engine.FINISH_REASON_STRINGS), and OpenAI's tool_calls.
FinishReason = Literal["stop", "length", "abort", "error", "repetition", "tool_calls"]


class PromptTokensDetails(TypedDict):
    cached_tokens: int  # prompt tokens from the tenant's own prefix cache


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """OpenAI's usage object; `cached_tokens` are prompt tokens served from the tenant's
    own prefix cache (never another tenant's: the pools salt the cache per tenant)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# -- POST /v1/chat/completions -----------------------------------------------------------


class FunctionCall(TypedDict):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None  # None when the answer is tool calls
    tool_calls: NotRequired[list[ToolCall]]


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(TypedDict):
    name: NotRequired[str]  # the call's first delta only
    arguments: str


class ToolCallDelta(TypedDict):
    index: int
    id: NotRequired[str]  # the call's first delta only
    type: NotRequired[Literal["function"]]
    function: FunctionCallDelta


class ChatDelta(TypedDict):
    role: NotRequired[Literal["assistant"]]  # each choice's first chunk only
    content: NotRequired[str]
    tool_calls: NotRequired[list[ToolCallDelta]]


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(TypedDict):
    """One `data:` event of a chat stream; the last one (with `stream_options.include_usage`)
    has no choices and carries `usage`, as does every chunk with `continuous_usage_stats`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage]


# -- POST /v1/completions ----------------------------------------------------------------


class CompletionLogprobs(TypedDict):
    """The legacy completions shape: parallel lists, one entry per output token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None  # None on the stream's chunks before the last


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(TypedDict):
    """One `data:` event of a completion stream (OpenAI names it `text_completion` too)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: NotRequired[Usage]


# -- GET /v1/models ----------------------------------------------------------------------


ModelModality = Literal["text", "vision"]  # services.catalog.models.Modality's values


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str  # "phiserve", or the owning tenant's id for its adapters
    root: str  # the pool's first served name
    parent: str | None  # a tenant adapter's base model (its root); None for a served model
    pool: str
    modality: ModelModality
    max_model_len: int
    max_images_per_request: int


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]


class ModelDeleted(TypedDict):  # OpenAI's answer to models.delete
    id: str
    object: Literal["model"]
    deleted: bool


# -- usage, files, probes ---------------------------------------------------------------


class UsageRow(TypedDict):
    day: str  # YYYYMMDD (UTC)
    tenant_id: str
    model: str
    requests: int
    prompt_tokens: int  # all prompt tokens, cached or not
    completion_tokens: int
    images: int
    cached_prompt_tokens: int  # of prompt_tokens, served from the tenant's own prefix cache
    uncached_prompt_tokens: int  # prompt_tokens - cached_prompt_tokens
    billed_tokens: int  # charged to the daily token budget: cached prompt tokens at a discount


class UsageReport(TypedDict):
    object: Literal["list"]
    data: list[UsageRow]


class FileDeleted(TypedDict):
    id: str
    object: Literal["file"]
    deleted: Literal[True]


class Health(TypedDict):
    status: Literal["ok"]


PartState = Literal["ready", "unavailable"]


class ReadyStatus(TypedDict):
    """Each pool (and `batch-workers`, on a replica that has them) and its state."""

    status: PartState
    pools: dict[str, PartState]


# -- errors ------------------------------------------------------------------------------


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(TypedDict):
    """OpenAI's error body, of every non-2xx answer (and of a stream's error event)."""

    error: ErrorDetail

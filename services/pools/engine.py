"""The engine contract every pool replica embeds, and the messages that cross the handle.

The gateway sends one `GenerationRequest` to a pool over ONE Ray handle hop and gets
back either a `GenerationResult` (unary) or a stream of `GenerationChunk` lists.
These are plain dataclasses: cheap to pickle, no pydantic on the hot path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the output's form, compiled into a grammar by vLLM's structured-output
    backend. Exactly one of the two is set."""

    json_schema: str | None = None  # a JSON Schema, serialised
    json_object: bool = False  # any JSON object
    # The request field the constraint came from, named when the backend refuses it.
    param: str = "response_format"


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int | None = None  # per choice
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # Choices per prompt (vLLM's parallel sampling: the prompt is prefilled once).
    n: int = 1
    # None: no log probabilities; k >= 0: each sampled token's, with the k most likely.
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), bias in [-100, 100]
    structured: StructuredOutput | None = None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    text: str
    # Number of images this message carries, in order; their bytes are in
    # `GenerationRequest.images`.
    image_count: int = 0


# A completion prompt: text, or token ids of the model's vocabulary.
Prompt = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A tenant's LoRA adapter a request runs with, resolved and checked by the gateway.

    `model_id` is the adapter's model id (`ft:<base>:<tenant>:<name>`, services/tenancy/
    adapters.py): the pool's Serve multiplexing key. `path` is the folder the replica loads
    it from; `version` changes when the adapter is registered again under the same name, so
    a replica never serves a stale copy."""

    model_id: str
    path: str
    version: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. Exactly one of `prompts` (completions) or `messages` (chat) is set.

    Each prompt makes `sampling.n` choices; choice `i * n + j` is prompt i's j-th (OpenAI's
    order for a list of prompts). All of them share one admission and one handle call.

    `request_id` is the client's x-request-id (or one the gateway made up): for logs and
    tracing only. It is not unique and not trusted, so it never names the engine's request;
    the engine makes its own id for every generation (see `Engine`).
    """

    request_id: str
    model: str
    sampling: SamplingOptions
    prompts: tuple[Prompt, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    images: tuple[bytes, ...] = ()
    # vLLM request priority: lower runs first (scheduling_policy="priority").
    priority: int = 0
    # The tenant's prefix-cache salt, set by the gateway (never by the client): requests
    # with different salts never share cached blocks (services/tenancy/cache_salt.py).
    cache_salt: str | None = None
    # The client's `user`, as its keyed hash (services/tenancy/end_users.py): for the
    # request's log line only, never the raw value.
    end_user: str | None = None
    # The tenant's LoRA adapter, set by the gateway after checking the tenant owns it.
    adapter: AdapterRef | None = None

    @property
    def choice_count(self) -> int:
        return self.sampling.n * (len(self.prompts) if self.prompts is not None else 1)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token's log probability and the most likely alternatives at its place."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # (token, logprob), most likely first

    def __reduce__(self) -> tuple[type[TokenLogprob], tuple[str, float, tuple[tuple[str, float], ...]]]:
        # Pickled as its fields: a frozen slots dataclass otherwise unpickles through
        # dataclasses' Python-level __setstate__, once per token (issue 12).
        return TokenLogprob, (self.token, self.logprob, self.top)


@dataclass(slots=True)
class GenerationChunk:
    """A coalesced piece of a stream: choice `index`'s text since its previous chunk.

    The token counts are the running totals of the whole request (every choice)."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    # Prompt tokens served from the prefix cache (OpenAI's prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0
    index: int = 0
    logprobs: list[TokenLogprob] | None = None  # set when the request asked for them

    def __reduce__(self) -> tuple[type[GenerationChunk], tuple[object, ...]]:
        # Every chunk crosses the handle pickled (Serve's default: cloudpickle). As its fields
        # it is 1/3 of the size (no slot names, no copyreg state) and unpickles through
        # `__init__` in one call (issue 12, item 2).
        return GenerationChunk, (
            self.text,
            self.completion_tokens,
            self.prompt_tokens,
            self.finish_reason,
            self.cached_tokens,
            self.index,
            self.logprobs,
        )

    def merge(self, later: GenerationChunk) -> None:
        """Fold a later chunk of the same choice into this one (the pool's coalescing)."""
        self.text += later.text
        self.completion_tokens = later.completion_tokens
        self.prompt_tokens = later.prompt_tokens
        self.cached_tokens = later.cached_tokens
        self.finish_reason = later.finish_reason
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None

    def __reduce__(self) -> tuple[type[ChoiceResult], tuple[object, ...]]:
        return ChoiceResult, (self.index, self.text, self.finish_reason, self.logprobs)


@dataclass(slots=True)
class GenerationResult:
    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def __reduce__(self) -> tuple[type[GenerationResult], tuple[object, ...]]:
        # The unary answer crosses the handle pickled: as its fields (see GenerationChunk).
        return GenerationResult, (
            self.choices,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        )

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @classmethod
    def assemble(cls, chunks: list[GenerationChunk]) -> GenerationResult:
        """The unary result of a stream: each choice's pieces joined, in index order."""
        if not chunks:  # an engine that yields nothing broke the contract
            raise AssertionError("engine stream ended without a final chunk")
        choices: dict[int, ChoiceResult] = {}
        for chunk in chunks:
            choice = choices.get(chunk.index)
            if choice is None:
                choice = choices[chunk.index] = ChoiceResult(chunk.index, "", "stop", None)
            choice.text += chunk.text
            choice.finish_reason = chunk.finish_reason or choice.finish_reason
            if chunk.logprobs is not None:
                choice.logprobs = (choice.logprobs or []) + chunk.logprobs
        last = chunks[-1]
        return cls(
            choices=[choices[i] for i in sorted(choices)],
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
        )


class Engine(ABC):
    """What a pool replica needs from an inference engine.

    Rules every implementation keeps:

    * **Streaming**: `stream()` yields `GenerationChunk`s as text is produced. Each chunk
      carries only one choice's new text (a delta), its log probabilities when asked,
      and the request's running token counts; each choice's last chunk has
      `finish_reason` set ("stop" or "length"). Nothing is yielded after every choice's
      last chunk. With one choice (n=1, one prompt) every chunk has index 0.
    * **Validation first**: a request the engine cannot serve (prompt plus `max_tokens`
      beyond the context, an image the model cannot take) raises an
      `services.errors.InvalidRequest` subclass *before the first chunk*, so the gateway
      can still answer with a 4xx instead of a broken stream.
    * **Request ids**: the engine names each generation with an id of its own, fresh per
      call, and aborts only that one. `GenerationRequest.request_id` comes from the client
      and may be reused by anyone (issue 9, item 1).
    * **Cancellation**: when the consumer stops iterating (the generator is closed or
      the task is cancelled, e.g. because the HTTP client went away or its deadline
      passed), the engine request is aborted and its KV cache freed before the
      cancellation propagates. `num_unfinished()` then drops back.
    * **Errors**: engine failures are raised as `services.errors` types only
      (`ServiceUnavailable` when the engine is dead, `GenerationFailed` otherwise); no
      engine-internal exception type ever reaches the caller (they may not even
      unpickle on the gateway's side).
    * **Health**: `check_health()` makes a real round trip to the engine and raises
      `ServiceUnavailable` when it is dead, so Serve replaces the replica.
    """

    @abstractmethod
    async def start(self) -> None:
        """Load the model; return when the engine accepts requests."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Generate, yielding deltas (see the class docstring for the rules)."""

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        """Generate to the end and return every choice's whole text."""
        return GenerationResult.assemble([chunk async for chunk in self.stream(request)])

    @abstractmethod
    async def check_health(self) -> None:
        """Raise `ServiceUnavailable` when the engine cannot serve."""

    @abstractmethod
    async def num_unfinished(self) -> int:
        """Requests the engine holds (running or waiting)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free its memory."""

    async def rope_scaling(self) -> dict[str, object] | None:
        """The rotary embedding the loaded model runs, for diagnostics (None: not known)."""
        return None

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load a tenant's LoRA adapter so requests with `adapter` can run (issue 14).

        The caller has validated its files (services/pools/adapter_files.py) first: an engine
        may accept a broken adapter and fail later, for every request. Adding one already
        added is a no-op. A request whose adapter was not added is refused, never passed on.
        Raises `InvalidRequest` when this engine serves no adapters (the default) and
        `InvalidAdapter` when the engine refuses the files."""
        raise InvalidRequest(
            "this model serves no LoRA adapters", param="model", code="adapters_not_supported"
        )

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Unload `adapter` and free its memory; a no-op when it is not loaded. Requests still
        running with it are the caller's to drain first."""

"""The engine contract every pool replica embeds, and the messages that cross the handle.

The gateway sends one `GenerationRequest` to a pool over ONE Ray handle hop and gets
back either a `GenerationResult` (unary) or a stream of `GenerationChunk` lists.
These are plain dataclasses: cheap to pickle, no pydantic on the hot path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    text: str
    # Number of images this message carries, in order; their bytes are in
    # `GenerationRequest.images`.
    image_count: int = 0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. Exactly one of `prompt` (completions) or `messages` (chat) is set.

    `request_id` is the client's x-request-id (or one the gateway made up): for logs and
    tracing only. It is not unique and not trusted, so it never names the engine's request;
    the engine makes its own id for every generation (see `Engine`).
    """

    request_id: str
    model: str
    sampling: SamplingOptions
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    images: tuple[bytes, ...] = ()
    # vLLM request priority: lower runs first (scheduling_policy="priority").
    priority: int = 0
    # The tenant's prefix-cache salt, set by the gateway (never by the client): requests
    # with different salts never share cached blocks (services/tenancy/cache_salt.py).
    cache_salt: str | None = None


@dataclass(slots=True)
class GenerationChunk:
    """A coalesced piece of a stream: text since the previous chunk."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    # Prompt tokens served from the prefix cache (OpenAI's prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0


@dataclass(slots=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cached_tokens: int = 0


class Engine(ABC):
    """What a pool replica needs from an inference engine.

    Rules every implementation keeps:

    * **Streaming**: `stream()` yields `GenerationChunk`s as text is produced. Each chunk
      carries only the new text (a delta) and the running token counts; the last
      chunk has `finish_reason` set ("stop" or "length"). Nothing is yielded after it.
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
        """Generate to the end and return the whole text."""
        parts: list[str] = []
        last: GenerationChunk | None = None
        async for chunk in self.stream(request):
            parts.append(chunk.text)
            last = chunk
        if last is None:  # an engine that yields nothing broke the contract
            raise AssertionError("engine stream ended without a final chunk")
        return GenerationResult(
            text="".join(parts),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason or "stop",
            cached_tokens=last.cached_tokens,
        )

    @abstractmethod
    async def check_health(self) -> None:
        """Raise `ServiceUnavailable` when the engine cannot serve."""

    @abstractmethod
    async def num_unfinished(self) -> int:
        """Requests the engine holds (running or waiting)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free its memory."""

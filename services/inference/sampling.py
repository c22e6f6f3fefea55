"""Sampling fields shared by chat and completions, and their checks against a pool."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.catalog.models import Platform, PoolConfig
from services.errors import ContextLengthExceeded, InvalidRequest
from services.pools.engine import SamplingOptions, StructuredOutput

# vLLM's default `max_logprobs`; OpenAI allows top_logprobs up to 20 as well.
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")
    continuous_usage_stats: bool = Field(
        False, description="Carry the running token usage on every chunk (vLLM's extension)."
    )


class SamplingFields(BaseModel):
    """OpenAI sampling parameters, plus vLLM's `top_k`, `repetition_penalty`, `ignore_eos`.

    Strict, as every request model: a field takes exactly the JSON type its schema in
    /openapi.json names (no "0" for false, no "5" for 5), so the document is exact."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(
        ..., min_length=1, max_length=256, description="Model name or alias.", examples=["phi-3.5-mini"]
    )
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=128, description="Choices to generate; capped per tenant (limits.max_n).")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stop_token_ids: list[int] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="Token ids that end a choice (vLLM's extension)."
    )
    min_tokens: int = Field(0, ge=0, description="Tokens to generate before a stop or EOS may end a choice.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    seed: int | None = Field(
        None,
        description=(
            "Makes sampling reproducible: the same seed, prompt and parameters give the same text. "
            "Refused on a CPU pool that splits prompts across steps (see docs/api.md#seed)."
        ),
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="End-user id (logged only).")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise InvalidRequest(
                "stop takes up to 4 non-empty strings of at most 256 characters", param="stop"
            )
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def logprobs_count(self) -> int | None:
        """The top alternatives per token to return; None when no logprobs were asked."""
        raise NotImplementedError  # each API names the field its own way

    def structured_output(self) -> StructuredOutput | None:
        return None

    def token_limit(self) -> int | None:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise InvalidRequest(
                "max_tokens and max_completion_tokens differ; send one of them",
                param="max_completion_tokens",
            )
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        if not self.logit_bias:
            return ()
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
        pairs = []
        for key, bias in self.logit_bias.items():
            if not key.isdigit():
                raise InvalidRequest(
                    f"logit_bias keys are token ids; '{key[:32]}' is not", param="logit_bias"
                )
            if not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias of token {key} must be in [-100, 100]", param="logit_bias")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)


def sampling_options(fields: SamplingFields, pool: PoolConfig, platform: Platform) -> SamplingOptions:
    """Check the request against the pool before it costs an engine anything."""
    if (
        fields.seed is not None
        and platform is Platform.cpu
        and pool.engine.enable_chunked_prefill is not False
    ):
        # When vLLM splits a seeded request's prompt across steps, its model runner rewinds
        # the request's torch.Generator by its Philox offset (gpu_model_runner.py,
        # _bookkeeping_sync); a CPU generator has no offset, the call raises and the engine
        # dies. Pools that prefill whole prompts (enable_chunked_prefill: false) are safe.
        raise InvalidRequest(
            "seed is not supported on this pool: its CPU engine splits long prompts across steps "
            "(chunked prefill), and vLLM cannot keep a seeded sampler in step with a split prompt "
            "on the CPU; omit seed",
            param="seed",
        )
    if fields.stream_options is not None and not fields.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    limit = pool.context_len
    max_tokens = fields.token_limit()
    if max_tokens is not None and max_tokens >= limit:
        raise ContextLengthExceeded(
            f"max_tokens ({max_tokens}) must be below the model's context length "
            f"of {limit} tokens, which also holds the prompt",
            param="max_tokens",
        )
    if max_tokens is not None and fields.min_tokens > max_tokens:
        raise InvalidRequest(
            f"min_tokens ({fields.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=fields.temperature,
        top_p=fields.top_p,
        top_k=fields.top_k,
        min_p=fields.min_p,
        presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty,
        repetition_penalty=fields.repetition_penalty,
        stop=fields.stop_list(),
        stop_token_ids=tuple(fields.stop_token_ids or ()),
        seed=fields.seed,
        ignore_eos=fields.ignore_eos,
        min_tokens=fields.min_tokens,
        n=fields.n,
        logprobs=fields.logprobs_count(),
        logit_bias=fields.logit_bias_pairs(),
        structured=fields.structured_output(),
    )

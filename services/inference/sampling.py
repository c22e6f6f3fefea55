"""Sampling fields shared by chat and completions, and their checks against a pool."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.catalog.models import Platform, PoolConfig
from services.errors import ContextLengthExceeded, InvalidRequest
from services.pools.engine import SamplingOptions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


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
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    seed: int | None = Field(None, description="Not supported on the CPU backend.")
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


def sampling_options(fields: SamplingFields, pool: PoolConfig, platform: Platform) -> SamplingOptions:
    """Check the request against the pool before it costs an engine anything."""
    if fields.seed is not None and platform is Platform.cpu:
        # A per-request seed with chunked prefill kills vLLM's CPU engine
        # ("CPU Generator does not use offset"): refuse it instead.
        raise InvalidRequest(
            "seed is not supported on this deployment's CPU backend; omit it",
            param="seed",
        )
    if fields.stream_options is not None and not fields.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    limit = pool.engine.max_model_len
    if fields.max_tokens is not None and fields.max_tokens >= limit:
        raise ContextLengthExceeded(
            f"max_tokens ({fields.max_tokens}) must be below the model's context length "
            f"of {limit} tokens, which also holds the prompt",
            param="max_tokens",
        )
    return SamplingOptions(
        max_tokens=fields.max_tokens,
        temperature=fields.temperature,
        top_p=fields.top_p,
        top_k=fields.top_k,
        presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty,
        repetition_penalty=fields.repetition_penalty,
        stop=fields.stop_list(),
        seed=fields.seed,
        ignore_eos=fields.ignore_eos,
    )

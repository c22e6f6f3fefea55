"""Wire models of POST /v1/completions (OpenAI's legacy completions shape)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from services.inference.sampling import SamplingFields

# OpenAI's legacy completions take at most 5; vLLM takes up to its max_logprobs (20).
MAX_COMPLETION_LOGPROBS = 20


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "phi-3.5-mini", "prompt": "Once upon a time", "max_tokens": 8},
                {"model": "phi-3.5-mini", "prompt": "Once upon a time", "max_tokens": 8, "stream": True},
            ]
        },
    )
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ...,
        description="A prompt, a list of prompts, token ids, or a list of token-id prompts "
        "(each prompt makes n choices).",
    )
    echo: bool = Field(False, description="Prepend the prompt to the completion text.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="Log probabilities of the top tokens per place."
    )
    suffix: None = Field(None, description="Not supported.")

    def logprobs_count(self) -> int | None:
        return self.logprobs

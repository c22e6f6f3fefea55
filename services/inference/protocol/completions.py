"""Wire models of POST /v1/completions (OpenAI's legacy completions shape)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from services.inference.sampling import SamplingFields


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
    prompt: str | list[str] = Field(..., description="One prompt (a one-item list is accepted).")
    echo: bool = Field(False, description="Prepend the prompt to the completion text.")
    suffix: None = Field(None, description="Not supported.")

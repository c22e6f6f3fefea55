"""Wire models of POST /v1/completions (OpenAI's legacy completions shape)."""

from __future__ import annotations

from pydantic import Field

from services.inference.sampling import SamplingFields


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="One prompt (a one-item list is accepted).")
    echo: bool = Field(False, description="Prepend the prompt to the completion text.")
    suffix: None = Field(None, description="Not supported.")

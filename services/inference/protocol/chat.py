"""Wire models of POST /v1/chat/completions (OpenAI's shapes)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.inference.sampling import SamplingFields


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str = Field(..., description="A base64 data: URL (or http(s) when enabled).")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=64)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "model": "phi-3.5-mini",
                    "messages": [{"role": "user", "content": "Say hello"}],
                    "max_tokens": 8,
                },
                {
                    "model": "phi-3.5-mini",
                    "messages": [{"role": "user", "content": "Say hello"}],
                    "max_tokens": 8,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        },
    )
    messages: list[ChatMessageIn] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")

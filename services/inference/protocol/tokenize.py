"""Wire models of POST /tokenize and /detokenize (vLLM's server shapes).

vLLM's `TokenizeCompletionRequest | TokenizeChatRequest` (here one model) and
`DetokenizeRequest` (vllm/entrypoints/serve/tokenize/protocol.py), less what phiserve does not serve: a
request-supplied `chat_template` (a tenant's Jinja would run in the gateway),
`chat_template_kwargs`, `continue_final_message` and the multimodal kwargs are refused as
unknown fields. One difference in a default: a chat's `add_special_tokens` is true here,
because phiserve's pool encodes the rendered chat as a text prompt with the tokenizer's
special tokens (vLLM's own chat route does not), and /tokenize counts what the engine counts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.inference.protocol.chat import ChatMessageIn, NamedToolChoice, ToolDefinition


class TokenizeRequest(BaseModel):
    """vLLM's two request shapes in one model: `prompt` or `messages`, exactly one (the
    service says which is wrong), so a validation error names the field as it was sent."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "phi-3.5-mini", "prompt": "Once upon a time"},
                {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "Say hello"}]},
            ]
        },
    )
    model: str = Field(..., description="A served model name (GET /v1/models).")
    prompt: str | None = Field(
        None, min_length=1, description="Text to tokenize as a completion prompt (or send messages)."
    )
    messages: list[ChatMessageIn] | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="A chat to tokenize, rendered with the model's own chat template (or send prompt).",
    )
    add_special_tokens: bool = Field(
        True,
        description="Add the tokenizer's special tokens (e.g. BOS). True for messages too, as the "
        "pool encodes a rendered chat (vLLM's default for messages is false).",
    )
    add_generation_prompt: bool = Field(
        True, description="messages only: end with the assistant's turn marker, as a chat completion does."
    )
    return_token_strs: bool = Field(False, description="Also return each token's string.")
    tools: list[ToolDefinition] | None = Field(
        None, max_length=128, description="messages only: counted as a chat completion counts them."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="messages only, with tools."
    )


class TokenizeResponse(BaseModel):
    count: int = Field(..., description="The number of tokens.")
    max_model_len: int = Field(..., description="The model's context length, in tokens.")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "phi-3.5-mini", "tokens": [32010, 15043]}]},
    )
    model: str = Field(..., description="A served model name (GET /v1/models).")
    tokens: list[int] = Field(
        ...,
        min_length=1,
        description="Token ids of the model's vocabulary (the JSON body limit bounds the list).",
    )


class DetokenizeResponse(BaseModel):
    prompt: str

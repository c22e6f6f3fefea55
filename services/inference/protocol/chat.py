"""Wire models of POST /v1/chat/completions (OpenAI's shapes)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.errors import InvalidRequest
from services.inference.sampling import MAX_TOP_LOGPROBS, SamplingFields
from services.pools.engine import StructuredOutput


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


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(..., pattern=FUNCTION_NAME)
    arguments: str = Field(..., description="The arguments as a JSON string.")


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, sent back in the history."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(..., min_length=1, max_length=128)
    type: Literal["function"]
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=128, description="Assistant messages only.")
    tool_call_id: str | None = Field(None, max_length=128, description="Tool messages: the call answered.")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments object.")
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(..., pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=4096)
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


# The field a schema error names (a refusal by the grammar backend, the tenant's size cap).
SCHEMA_PARAM = "response_format.json_schema.schema"
# Past the end of the JSON the grammar allows only the end of sequence; with that ignored, vLLM
# goes on generating unconstrained text after the JSON (measured), and the output never parses.
IGNORE_EOS_WITH_JSON = (
    "ignore_eos cannot be combined with JSON output (response_format json_object or json_schema, "
    "or a forced tool call): the output would run on past the end of the JSON"
)


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_object"]


class ResponseFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


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
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = Field(False, description="Return each output token's log probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = Field(
        False, description="Prepend the last message, when it is the assistant's, to the output."
    )

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def structured_output(self) -> StructuredOutput | None:
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonObject | ResponseFormatJsonSchema) and self.ignore_eos:
            raise InvalidRequest(IGNORE_EOS_WITH_JSON, param="ignore_eos")
        if isinstance(fmt, ResponseFormatJsonSchema):
            if fmt.json_schema.schema_ is None:
                # A json_schema with nothing to follow is a client's mistake; answering it as
                # a json_object would hide it.
                raise InvalidRequest(
                    "response_format.json_schema needs a schema; for any JSON object send "
                    "response_format {'type': 'json_object'}",
                    param=SCHEMA_PARAM,
                )
            # Compact: the tenant's size cap (max_schema_bytes) counts these bytes.
            schema = json.dumps(fmt.json_schema.schema_, separators=(",", ":"))
            return StructuredOutput(json_schema=schema, param=SCHEMA_PARAM)
        if isinstance(fmt, ResponseFormatJsonObject):
            return StructuredOutput(json_object=True)
        return None

"""Forced tool calls on a model without a tool-call format of its own.

Phi-3.5 was not trained on a tool-call syntax, so nothing in its free text can be told
apart as a call. When the request forces a call (`tool_choice` "required" or a named
function), the call is instead generated under a JSON schema built from the tools
(vLLM's structured outputs), and the JSON is answered as OpenAI `tool_calls`:

* a named function: the output is the arguments object itself, streamed as argument
  deltas as it is generated;
* "required": the output is a list of `{"name", "arguments"}` (one item unless
  `parallel_tool_calls`), answered as whole calls once the choice ends.

`tool_choice: "auto"` (OpenAI's default when tools are sent) would need the model to
decide in free text; it is refused with the reason (docs/api.md, "Tools").
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from services.errors import InvalidRequest
from services.inference.protocol.chat import (
    IGNORE_EOS_WITH_JSON,
    ChatCompletionRequest,
    NamedToolChoice,
    ToolDefinition,
)
from services.inference.protocol.responses import ToolCall, ToolCallDelta
from services.pools.engine import StructuredOutput

AUTO_REFUSED = (
    "tool_choice 'auto' is not supported: Phi-3.5 has no tool-call format, so a call cannot be "
    "told apart from text. Set tool_choice to 'required' or to a named function (the call is "
    "then generated under the tools' JSON schema), or to 'none'"
)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """What the tools of a request change: the output's schema, a system message that
    describes the tools to the model (counted at admission like any message), and how the
    output is answered."""

    structured: StructuredOutput | None = None
    system_note: str | None = None
    output: ToolCallOutput | None = None


def plan_tools(body: ChatCompletionRequest) -> ToolPlan:
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()
    if choice is None or choice == "auto":
        raise InvalidRequest(AUTO_REFUSED, param="tool_choice", code="unsupported_tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequest(
            "response_format cannot be combined with a forced tool call: the call's arguments follow the tool's schema",
            param="response_format",
        )
    if body.ignore_eos:
        raise InvalidRequest(IGNORE_EOS_WITH_JSON, param="ignore_eos")
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool function names must be unique", param="tools")
    note = _describe(body.tools)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names '{choice.function.name}', which is not among the tools",
                param="tool_choice.function.name",
            )
        i = names.index(choice.function.name)
        tool = body.tools[i]
        return ToolPlan(
            # The schema is that tool's parameters alone: a refusal names them.
            _structured(tool.function.parameters or ANY_OBJECT, f"tools[{i}].function.parameters"),
            note,
            ToolCallOutput(named=tool.function.name),
        )
    item_schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "arguments": tool.function.parameters or ANY_OBJECT,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in body.tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "items": item_schemas[0] if len(item_schemas) == 1 else {"anyOf": item_schemas},
        "minItems": 1,
    }
    if not body.parallel_tool_calls:
        schema["maxItems"] = 1
    return ToolPlan(_structured(schema, "tools"), note, ToolCallOutput(named=None))


def _structured(schema: dict[str, Any], param: str) -> StructuredOutput:
    return StructuredOutput(json_schema=json.dumps(schema, separators=(",", ":")), param=param)


def _describe(tools: list[ToolDefinition]) -> str:
    listing = [tool.function.model_dump(exclude_none=True) for tool in tools]
    return "You can call these tools; answer with a call as JSON.\nTools: " + json.dumps(
        listing, separators=(",", ":")
    )


class ToolCallOutput:
    """A forced call's JSON output as OpenAI `tool_calls`, unary or as stream deltas.
    Made per request: it holds each choice's call ids and (for "required") its buffer."""

    def __init__(self, *, named: str | None) -> None:
        self._named = named
        self._ids: dict[tuple[int, int], str] = {}
        self._buffers: dict[int, str] = {}

    def _id(self, choice: int, call: int) -> str:
        return self._ids.setdefault((choice, call), f"call_{uuid.uuid4().hex[:24]}")

    def finish_reason(self, engine_reason: str) -> str:
        """A call that ended by itself is "tool_calls"; one cut at max_tokens stays "length"."""
        return "tool_calls" if engine_reason == "stop" else engine_reason

    def calls(self, text: str, choice: int = 0) -> list[ToolCall]:
        if self._named is not None:
            return [self._call(choice, 0, self._named, text)]
        return [
            self._call(choice, k, name, arguments) for k, (name, arguments) in enumerate(_parse_list(text))
        ]

    def deltas(self, choice: int, text: str, *, finished: bool) -> list[ToolCallDelta]:
        if self._named is not None:
            if (choice, 0) not in self._ids:
                return [
                    {
                        "index": 0,
                        "id": self._id(choice, 0),
                        "type": "function",
                        "function": {"name": self._named, "arguments": text},
                    }
                ]
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        # "required": a list whose items are only known whole; sent once the choice ends.
        self._buffers[choice] = self._buffers.get(choice, "") + text
        if not finished:
            return []
        return [
            {"index": k, **call}  # type: ignore[typeddict-item]  # a ToolCall plus its index
            for k, call in enumerate(self.calls(self._buffers.pop(choice), choice))
        ]

    def _call(self, choice: int, k: int, name: str, arguments: str) -> ToolCall:
        return {
            "id": self._id(choice, k),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }


def _parse_list(text: str) -> list[tuple[str, str]]:
    """The generated `[{"name", "arguments"}, ...]`; empty when cut short (max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [
        (item["name"], json.dumps(item["arguments"], separators=(",", ":")))
        for item in items
        if isinstance(item, dict) and isinstance(item.get("name"), str) and "arguments" in item
    ]

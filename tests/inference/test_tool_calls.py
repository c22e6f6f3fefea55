"""Forced tool calls without the cluster (issue 11, item 2): the JSON schema `plan_tools`
builds from the tools, and how `ToolCallOutput` / `ChatShape` answer the generated JSON as
OpenAI `tool_calls`, unary and as stream deltas."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from services.errors import InvalidRequest
from services.inference.chat_shape import ChatShape
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.tool_calls import ToolCallOutput, ToolPlan, plan_tools
from services.pools.engine import ChoiceResult, GenerationChunk, GenerationResult

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["paris", "oslo"]}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
ALARM = {
    "type": "object",
    "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["hour"],
}


def _tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"the {name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


TOOLS = [_tool("get_weather", WEATHER), _tool("set_alarm", ALARM)]


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def _plan(**fields: Any) -> ToolPlan:
    body = ChatCompletionRequest.model_validate(
        {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], **fields}
    )
    return plan_tools(body)


def _schema(plan: ToolPlan) -> dict[str, Any]:
    assert plan.structured is not None and plan.structured.json_schema is not None
    schema: dict[str, Any] = json.loads(plan.structured.json_schema)
    return schema


def _valid(schema: dict[str, Any], text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except jsonschema.ValidationError:
        return False
    return True


# -- plan_tools: the schema ------------------------------------------------------------------


def test_a_named_function_is_generated_under_its_own_parameters() -> None:
    plan = _plan(tools=TOOLS, tool_choice=_named("set_alarm"))
    assert _schema(plan) == ALARM
    assert plan.structured is not None and plan.structured.param == "tools[1].function.parameters"
    # The model reads every tool (counted at admission as a system message).
    assert plan.system_note is not None
    assert "get_weather" in plan.system_note and "set_alarm" in plan.system_note
    assert plan.output is not None


def test_a_named_function_without_parameters_takes_any_object() -> None:
    plan = _plan(tools=[_tool("ping")], tool_choice=_named("ping"))
    assert _schema(plan) == {"type": "object"}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_with_one_tool_is_a_list_of_its_calls(parallel: bool) -> None:
    schema = _schema(_plan(tools=TOOLS[:1], tool_choice="required", parallel_tool_calls=parallel))
    one = {"name": "get_weather", "arguments": {"city": "oslo", "celsius": True}}
    assert _valid(schema, json.dumps([one]))
    assert not _valid(schema, "[]")  # a call is required
    assert not _valid(schema, json.dumps([{**one, "name": "set_alarm"}]))
    assert not _valid(schema, json.dumps([{**one, "arguments": {"city": "rome", "celsius": True}}]))
    assert _valid(schema, json.dumps([one, one])) is parallel


def test_required_with_several_tools_takes_any_of_them() -> None:
    plan = _plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    schema = _schema(plan)
    assert plan.structured is not None and plan.structured.param == "tools"
    weather = {"name": "get_weather", "arguments": {"city": "paris", "celsius": False}}
    alarm = {"name": "set_alarm", "arguments": {"hour": 7}}
    assert _valid(schema, json.dumps([weather])) and _valid(schema, json.dumps([alarm]))
    # Each name goes with its own tool's arguments only.
    assert not _valid(schema, json.dumps([{"name": "set_alarm", "arguments": weather["arguments"]}]))
    assert not _valid(schema, json.dumps([weather, alarm]))  # parallel_tool_calls false: one call
    assert _valid(_schema(_plan(tools=TOOLS, tool_choice="required")), json.dumps([weather, alarm]))


# -- plan_tools: what is refused, and what changes nothing -------------------------------------


@pytest.mark.parametrize("choice", ["auto", None])
def test_auto_is_refused_with_the_reason(choice: str | None) -> None:
    with pytest.raises(InvalidRequest) as refused:
        _plan(tools=TOOLS, tool_choice=choice)
    assert (refused.value.param, refused.value.code) == ("tool_choice", "unsupported_tool_choice")
    assert "no tool-call format" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": _named("nope")}, "tool_choice.function.name"),
        ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        # Past the end of the call's JSON vLLM would go on unconstrained.
        ({"tools": TOOLS, "tool_choice": _named("set_alarm"), "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        _plan(**fields)
    assert refused.value.param == param


@pytest.mark.parametrize("fields", [{}, {"tool_choice": "none"}, {"tools": TOOLS, "tool_choice": "none"}])
def test_no_forced_call_changes_nothing(fields: dict[str, Any]) -> None:
    assert _plan(**fields) == ToolPlan()


# -- ToolCallOutput ----------------------------------------------------------------------------


def test_a_named_call_unary() -> None:
    output = ToolCallOutput(named="set_alarm")
    (call,) = output.calls('{"hour":7}')
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "set_alarm", "arguments": '{"hour":7}'}
    assert output.finish_reason("stop") == "tool_calls"
    assert output.finish_reason("length") == "length"  # cut at max_tokens: not a whole call


def test_a_named_call_streams_its_arguments_as_they_come() -> None:
    output = ToolCallOutput(named="set_alarm")
    first = output.deltas(0, '{"ho', finished=False)
    assert first == [
        {
            "index": 0,
            "id": first[0]["id"],
            "type": "function",
            "function": {"name": "set_alarm", "arguments": '{"ho'},
        }
    ]
    assert output.deltas(0, "", finished=False) == []  # nothing new: no delta
    assert output.deltas(0, 'ur":7}', finished=True) == [{"index": 0, "function": {"arguments": 'ur":7}'}}]
    # Another choice is a call of its own, with its own id.
    other = output.deltas(1, "{", finished=False)
    assert other[0]["id"] != first[0]["id"] and other[0]["function"]["name"] == "set_alarm"
    # The unary shape of the same choice keeps the streamed id.
    assert output.calls('{"hour":7}', 0)[0]["id"] == first[0]["id"]


def test_required_calls_go_out_whole_when_the_choice_ends() -> None:
    output = ToolCallOutput(named=None)
    text = '[{"name":"get_weather","arguments":{"city":"oslo","celsius":true}},{"name":"set_alarm","arguments":{"hour":7}}]'
    assert output.deltas(0, text[:30], finished=False) == []
    deltas = output.deltas(0, text[30:], finished=True)
    assert [(d["index"], d["function"]["name"]) for d in deltas] == [(0, "get_weather"), (1, "set_alarm")]
    assert json.loads(deltas[0]["function"]["arguments"]) == {"city": "oslo", "celsius": True}
    assert deltas[1]["function"]["arguments"] == '{"hour":7}'
    assert deltas[0]["id"] != deltas[1]["id"] and all(d["type"] == "function" for d in deltas)


@pytest.mark.parametrize("text", ['[{"name":"set_alarm","argu', "", '{"name":"set_alarm"}', "[1]"])
def test_unparsable_required_output_makes_no_call(text: str) -> None:
    output = ToolCallOutput(named=None)
    assert output.calls(text) == []
    assert output.deltas(0, text, finished=True) == []


# -- ChatShape with tools ------------------------------------------------------------------------


def test_the_shape_answers_calls_and_keeps_a_cut_output_as_text() -> None:
    shape = ChatShape("r1", "phi-3.5-mini", tools=ToolCallOutput(named=None))
    whole = '[{"name":"set_alarm","arguments":{"hour":7}}]'
    cut = '[{"name":"set_alarm","argu'
    body = shape.response(
        GenerationResult(
            [ChoiceResult(0, whole, "stop"), ChoiceResult(1, cut, "length")],
            prompt_tokens=5,
            completion_tokens=9,
        )
    )
    answered, truncated = body["choices"]
    assert answered["finish_reason"] == "tool_calls"
    assert answered["message"]["content"] is None
    assert answered["message"]["tool_calls"][0]["function"]["name"] == "set_alarm"  # type: ignore[typeddict-item]
    assert truncated["finish_reason"] == "length"
    assert truncated["message"] == {"role": "assistant", "content": cut}


def test_the_shape_streams_a_named_call() -> None:
    shape = ChatShape("r2", "phi-3.5-mini", tools=ToolCallOutput(named="set_alarm"))
    first = shape.chunk(GenerationChunk('{"hour"', completion_tokens=2, prompt_tokens=5))
    last = shape.chunk(GenerationChunk(":7}", completion_tokens=4, prompt_tokens=5, finish_reason="stop"))
    delta = first["choices"][0]["delta"]
    assert delta["role"] == "assistant" and "content" not in delta
    assert delta["tool_calls"][0]["function"] == {"name": "set_alarm", "arguments": '{"hour"'}  # type: ignore[typeddict-item]
    assert last["choices"][0]["finish_reason"] == "tool_calls"
    assert last["choices"][0]["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": ":7}"}}]

"""Forced tool calls from the client's side (issue 11, items 2 and 6): the official openai
SDK against the real cluster. A named function or tool_choice "required" is generated under a
JSON schema built from the tools and answered as OpenAI tool_calls; "auto" is refused.

The shared models, tools and checks are test_structured_outputs.py's (the same grammar path).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.conftest import Cluster
from tests.gateway.test_structured_outputs import (
    ASK,
    CHAT,
    MAX_TOKENS,
    MODEL,
    PARAMETERS,
    TOOLS,
    WEATHER,
    Weather,
    _error,
    _named,
    _valid_call,
)
from tests.gateway.test_tenancy_e2e import _client, _new_tenant

# -- forced tool calls -------------------------------------------------------------------------


def test_named_tool_call_unary(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice=_named("set_alarm"),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "set_alarm"  # type: ignore[union-attr]
    _valid_call(calls[0])


def test_named_tool_call_through_parse(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.parse(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice=_named("get_weather"),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    call = (resp.choices[0].message.tool_calls or [])[0]
    assert isinstance(call.function.parsed_arguments, Weather)


@pytest.mark.parametrize("tools", [[WEATHER], TOOLS], ids=["one-tool", "two-tools"])
def test_required_with_parallel_calls_off_makes_exactly_one_call(
    openai_client: OpenAI, tools: list[Any]
) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].function.name in {t["function"]["name"] for t in tools}  # type: ignore[union-attr]
    _valid_call(calls[0])


def test_required_with_parallel_calls_makes_valid_calls(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    calls = resp.choices[0].message.tool_calls or []
    assert resp.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        _valid_call(call)
    assert len({call.id for call in calls}) == len(calls)


def _streamed_calls(chunks: list[Any], choice: int = 0) -> tuple[list[dict[str, Any]], list[Any], str | None]:
    """The calls a choice's tool_call deltas assemble into, its deltas, and its finish reason."""
    calls: dict[int, dict[str, Any]] = {}
    deltas: list[Any] = []
    finish = None
    for chunk in chunks:
        for c in chunk.choices:
            if c.index != choice:
                continue
            finish = c.finish_reason or finish
            for delta in c.delta.tool_calls or []:
                deltas.append(delta)
                call = calls.setdefault(
                    delta.index, {"id": None, "type": None, "name": None, "arguments": ""}
                )
                if delta.id is not None:
                    assert call["id"] is None, "the id comes once, on the call's first delta"
                    call.update(id=delta.id, type=delta.type, name=delta.function.name)
                call["arguments"] += delta.function.arguments or ""
    return [calls[k] for k in sorted(calls)], deltas, finish


def _check_streamed(call: dict[str, Any]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


def test_named_tool_call_streamed(openai_client: OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,
            tool_choice=_named("set_alarm"),  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
    )
    calls, deltas, finish = _streamed_calls(chunks)
    assert finish == "tool_calls" and len(calls) == 1
    # The first delta names the call; the arguments follow as they are generated.
    assert deltas[0].id is not None and deltas[0].function.name == "set_alarm"
    # (how many pieces depends on the pool's coalescing and the load: at least one)
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    _check_streamed(calls[0])


def test_named_tool_call_through_the_sdks_stream_helper(openai_client: OpenAI) -> None:
    with openai_client.chat.completions.stream(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice=_named("get_weather"),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert len(done) == 1 and isinstance(done[0].parsed_arguments, Weather)
    assert final.choices[0].finish_reason == "tool_calls"
    assert isinstance((final.choices[0].message.tool_calls or [])[0].function.parsed_arguments, Weather)


def test_required_tool_call_streamed(openai_client: OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
    )
    calls, deltas, finish = _streamed_calls(chunks)
    assert finish == "tool_calls" and len(calls) == 1 and len(deltas) == 1
    _check_streamed(calls[0])


def test_n_choices_each_get_their_own_streamed_call(openai_client: OpenAI) -> None:
    for tool_choice in (_named("set_alarm"), "required"):
        chunks = list(
            openai_client.chat.completions.create(
                model=MODEL,
                messages=ASK,  # type: ignore[arg-type]
                tools=TOOLS,
                tool_choice=tool_choice,  # type: ignore[arg-type]
                parallel_tool_calls=False,
                max_tokens=MAX_TOKENS,
                temperature=1,
                n=3,
                stream=True,
            )
        )
        ids = set()
        for index in range(3):
            calls, _, finish = _streamed_calls(chunks, index)
            assert finish == "tool_calls" and len(calls) == 1, (tool_choice, index)
            _check_streamed(calls[0])
            ids.add(calls[0]["id"])
        assert len(ids) == 3


# -- what is refused, and what is accepted besides --------------------------------------------


@pytest.mark.parametrize("extra", [{"tool_choice": "auto"}, {}], ids=["auto", "no-tool_choice"])
def test_auto_is_refused_with_the_reason(http: httpx.Client, extra: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    err = _error(http.post(CHAT, json=body))
    assert err["param"] == "tool_choice"
    assert "no tool-call format" in err["message"] and "'required'" in err["message"]


def test_tool_choice_none_answers_text(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="none",
        max_tokens=6,
        extra_body={"ignore_eos": True},
    )
    choice = resp.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason == "length"


def test_a_history_with_a_call_and_its_result_is_accepted(openai_client: OpenAI) -> None:
    history: list[Any] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"oslo","celsius":true}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 degrees"},
    ]
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert resp.choices[0].message.content is not None
    # The call and its result are in the prompt: it is longer than the question alone.
    alone = openai_client.chat.completions.create(model=MODEL, messages=history[:1], max_tokens=4)
    assert resp.usage.prompt_tokens > alone.usage.prompt_tokens  # type: ignore[union-attr]


def test_the_tools_are_counted_in_the_prompt_and_at_admission(
    openai_client: OpenAI, cluster: Cluster, admin: httpx.Client
) -> None:
    plain = openai_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)  # type: ignore[arg-type]
    with_tools = openai_client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice=_named("set_alarm"),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    described = json.dumps([t["function"] for t in TOOLS])
    # Each tool's name, description and parameters are in the prompt the model reads...
    extra = with_tools.usage.prompt_tokens - plain.usage.prompt_tokens  # type: ignore[union-attr]
    assert extra > len(described) // 8
    # ...and in the count admission prices: a tenant whose tokens per minute hold the request
    # without its tools, but not with them.
    max_tokens = 40
    tpm = plain.usage.prompt_tokens + max_tokens + extra // 2  # type: ignore[union-attr]
    _, key, _ = _new_tenant(admin, limits={"tpm": tpm})
    with _client(cluster, key) as client:
        body = {"model": MODEL, "messages": ASK, "max_tokens": max_tokens, "temperature": 0}
        refused = client.post(CHAT, json={**body, "tools": TOOLS, "tool_choice": _named("set_alarm")})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["param"] == "request_exceeds_tpm"
        admitted = client.post(CHAT, json=body)
        assert admitted.status_code == 200, admitted.text

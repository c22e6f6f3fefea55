"""Structured outputs from the client's side (issue 11, items 1 and 6): the official openai
SDK against the real cluster, vLLM's xgrammar backend on the tiny text model. Forced tool
calls, which run on the same grammar path, are in test_tool_calls_e2e.py.

The model's weights are random, so only the grammar keeps its output in shape: the schemas
here hold booleans, enums and small integers (a free string can run to max_tokens), and
most requests decode greedily (temperature 0), so what passes once passes every time.
"""

from __future__ import annotations

import io
import json
from functools import cache
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

from tests.batch.test_batch_e2e import output_lines, wait_final
from tests.conftest import CACHE_DIR, Cluster
from tests.gateway.test_tenancy_e2e import _client, _new_tenant

MODEL = "phi-3.5-mini"
CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "Answer in JSON"}]
MAX_TOKENS = 300  # generous: a cut output would not parse
SCHEMA_PARAM = "response_format.json_schema.schema"


class Verdict(BaseModel):
    ok: bool
    color: Literal["red", "green", "blue"]
    score: int = Field(ge=0, le=9)


class Weather(BaseModel):
    city: Literal["paris", "oslo", "lima"]
    celsius: bool


class Alarm(BaseModel):
    hour: int = Field(ge=0, le=23)
    on: bool


WEATHER = openai.pydantic_function_tool(Weather, name="get_weather", description="The weather in a city")
ALARM = openai.pydantic_function_tool(Alarm, name="set_alarm", description="Set an alarm")
TOOLS = [WEATHER, ALARM]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}


def _valid_call(call: Any) -> dict[str, Any]:
    """A call's arguments, checked against its tool's parameters schema."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return arguments  # type: ignore[no-any-return]


def _error(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]  # type: ignore[no-any-return]


def _serves(client: OpenAI) -> None:
    """The pool answers a plain request and a schema request after a refusal."""
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)  # type: ignore[arg-type]
    assert plain.choices[0].message.content is not None
    parsed = client.chat.completions.parse(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Verdict,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


# -- response_format -------------------------------------------------------------------------


def test_parse_returns_a_valid_object(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.parse(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Verdict,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Verdict)
    # Compact JSON, as OpenAI returns it: the engine runs without the grammar's free
    # whitespace (a random model would otherwise fill max_tokens with it).
    content = choice.message.content or ""
    assert not any(c.isspace() for c in content), content
    assert Verdict.model_validate_json(content) == choice.message.parsed


def test_streamed_output_assembles_to_a_valid_object(openai_client: OpenAI) -> None:
    deltas: list[str] = []
    with openai_client.chat.completions.stream(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Verdict,
        max_tokens=MAX_TOKENS,
        temperature=0,
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    # How many pieces depends on the pool's coalescing (20 ms) and the machine's load.
    assert deltas
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.parsed == Verdict.model_validate_json("".join(deltas))


def test_n_schema_choices_each_validate(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format=_json_schema(Verdict.model_json_schema()),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        n=3,
        temperature=1,
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        Verdict.model_validate_json(choice.message.content or "")


def test_json_object_ends_with_the_object(openai_client: OpenAI) -> None:
    # A bias towards the token "{}" (a whole object): unconstrained, greedy decoding repeats
    # it until max_tokens; under json_object the grammar ends the output after the object.
    brace_pair = Tokenizer.from_file(str(CACHE_DIR / "models" / "phi-3.5-mini-tiny" / "tokenizer.json"))
    token_id = brace_pair.token_to_id("{}")
    assert token_id is not None, "the tiny tokenizer has a token for '{}'"
    bias = {str(token_id): 100}
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 16, "temperature": 0}
    free = openai_client.chat.completions.create(**body, logit_bias=bias)
    assert free.choices[0].finish_reason == "length"
    assert (free.choices[0].message.content or "").startswith("{}{}")
    constrained = openai_client.chat.completions.create(
        **body, logit_bias=bias, response_format={"type": "json_object"}
    )
    assert constrained.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(constrained.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "nonsense"}, "Unsupported type"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ],
)
def test_a_schema_the_backend_refuses_is_a_400_naming_it(
    openai_client: OpenAI, http: httpx.Client, schema: dict[str, Any], reason: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            response_format=_json_schema(schema),  # type: ignore[arg-type]
            max_tokens=8,
        )
    assert refused.value.param == SCHEMA_PARAM
    assert reason in refused.value.message and ".cc:" not in refused.value.message
    # Streamed: refused before the first chunk, so a 400 too, not an event-stream error.
    body = {"model": MODEL, "messages": ASK, "response_format": _json_schema(schema), "stream": True}
    assert _error(http.post(CHAT, json=body))["param"] == SCHEMA_PARAM
    _serves(openai_client)


def test_a_json_schema_without_a_schema_is_a_400(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": ASK,
        "response_format": {"type": "json_schema", "json_schema": {"name": "v"}},
    }
    err = _error(http.post(CHAT, json=body))
    assert err["param"] == SCHEMA_PARAM and "json_object" in err["message"]


@pytest.mark.parametrize(
    "extra",
    [{"response_format": {"type": "json_object"}}, {"tools": TOOLS, "tool_choice": _named("set_alarm")}],
    ids=["json_object", "forced-call"],
)
def test_ignore_eos_with_json_output_is_a_400(http: httpx.Client, extra: dict[str, Any]) -> None:
    # Past the end of the JSON vLLM would go on generating unconstrained text until max_tokens.
    body = {"model": MODEL, "messages": ASK, "max_tokens": 8, "ignore_eos": True, **extra}
    err = _error(http.post(CHAT, json=body))
    assert err["param"] == "ignore_eos" and "past the end of the JSON" in err["message"]


def test_schemas_over_the_tenants_cap_are_refused(cluster: Cluster, admin: httpx.Client) -> None:
    _, key, _ = _new_tenant(admin, limits={"max_schema_bytes": 96})
    with _client(cluster, key) as client:
        small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        body = {"model": MODEL, "messages": ASK, "max_tokens": MAX_TOKENS, "temperature": 0}
        admitted = client.post(CHAT, json={**body, "response_format": _json_schema(small)})
        assert admitted.status_code == 200, admitted.text
        assert json.loads(admitted.json()["choices"][0]["message"]["content"]) in (
            {"ok": True},
            {"ok": False},
        )

        big = Verdict.model_json_schema()
        err = _error(client.post(CHAT, json={**body, "response_format": _json_schema(big)}))
        assert (err["param"], err["code"]) == (SCHEMA_PARAM, "schema_too_large")
        # A forced call's schema is the tool's parameters: capped the same way.
        forced = {**body, "tools": [WEATHER], "tool_choice": _named("get_weather")}
        err = _error(client.post(CHAT, json=forced))
        assert (err["param"], err["code"]) == ("tools[0].function.parameters", "schema_too_large")
        assert client.post(CHAT, json=body).status_code == 200


# -- the Batch API ----------------------------------------------------------------------------


@cache
def _batch_lines() -> bytes:
    common = {"model": MODEL, "messages": ASK, "max_tokens": MAX_TOKENS, "temperature": 0}
    bodies = {
        "schema": {**common, "response_format": _json_schema(Verdict.model_json_schema())},
        "tool": {**common, "tools": TOOLS, "tool_choice": _named("get_weather")},
    }
    lines = [
        json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})
        for custom_id, body in bodies.items()
    ]
    return ("\n".join(lines) + "\n").encode()


def test_a_batch_carries_schema_and_tool_lines(openai_client: OpenAI) -> None:
    upload = openai_client.files.create(file=("so.jsonl", io.BytesIO(_batch_lines())), purpose="batch")
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_final(openai_client, batch.id)
    assert done.status == "completed"
    ok, bad = assert_exactly_once_by_id(openai_client, done, {"schema", "tool"})
    assert not bad
    schema_line = ok["schema"]["response"]["body"]["choices"][0]
    assert schema_line["finish_reason"] == "stop"
    Verdict.model_validate_json(schema_line["message"]["content"])
    tool_line = ok["tool"]["response"]["body"]["choices"][0]
    assert tool_line["finish_reason"] == "tool_calls"
    (call,) = tool_line["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    Weather.model_validate_json(call["function"]["arguments"])


def assert_exactly_once_by_id(
    client: OpenAI, batch: Any, custom_ids: set[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The output lines by custom_id, each input line answered once (the batch tests' check
    counts lines named req-<i>)."""
    ok = output_lines(client, batch.output_file_id)
    bad = output_lines(client, batch.error_file_id)
    assert sorted(line["custom_id"] for line in ok + bad) == sorted(custom_ids)
    assert batch.request_counts.completed == len(ok) and batch.request_counts.failed == len(bad)
    return {line["custom_id"]: line for line in ok}, bad

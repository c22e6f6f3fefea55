"""Issue 11's surface over gRPC against the real cluster (tiny text model, vLLM's xgrammar
backend): structured outputs, forced tool calls, logprobs, n, stop_token_ids, min_tokens,
logit_bias, prompt lists, continuous usage, GetModel, ListFiles/DeleteFile, Tokenize and
Detokenize.

The model's weights are random, so only a grammar keeps its output in shape: the schemas
hold booleans, enums and small integers (a free string can run to max_tokens), and requests
decode greedily. The sampling parameters are shown through one token X (from Tokenize): a
bias of 100 makes greedy decoding repeat X, so a stop on X or min_tokens have a visible,
exact effect.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import grpc
import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from services.grpc.client import Client, PhiserveRpcError, json_schema, tool, tool_choice, user
from services.grpc.gen.phiserve.v1 import common_pb2
from tests.conftest import Cluster
from tests.grpc.conftest import grpc_target, new_tenant
from tests.grpc.test_batch import batch_file

MODEL = "phi-3.5-mini"
ASK = [user("Answer in JSON")]
MAX_TOKENS = 300  # generous: a cut output would not parse
STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
TOOL_CALLS = common_pb2.FINISH_REASON_TOOL_CALLS
Code = grpc.StatusCode


class Verdict(BaseModel):
    ok: bool
    color: Literal["red", "green", "blue"]
    score: int = Field(ge=0, le=9)


class Alarm(BaseModel):
    hour: int = Field(ge=0, le=23)
    on: bool


class Weather(BaseModel):
    city: Literal["paris", "oslo", "lima"]
    celsius: bool


PARAMETERS = {"set_alarm": Alarm.model_json_schema(), "get_weather": Weather.model_json_schema()}
TOOLS = [tool(name, schema, f"{name} tool") for name, schema in PARAMETERS.items()]


def _fails(call: Any, *args: Any, **kwargs: Any) -> PhiserveRpcError:
    with pytest.raises(PhiserveRpcError) as info:
        call(*args, **kwargs)
    return info.value


def _client_for(cluster: Cluster, key: str) -> Client:
    return Client(grpc_target(cluster), api_key=key, timeout_s=120)


@pytest.fixture(scope="module")
def token_x(grpc_client: Client) -> int:
    """An ordinary token of the vocabulary (the last of "hello world")."""
    return grpc_client.tokenize(MODEL, "hello world", add_special_tokens=False).tokens[-1]


# -- structured outputs and tools ----------------------------------------------------------


def test_json_schema_output_parses_and_validates(grpc_client: Client) -> None:
    fmt = json_schema("verdict", Verdict.model_json_schema())
    whole = grpc_client.chat(MODEL, ASK, response_format=fmt, max_tokens=MAX_TOKENS, temperature=0)
    [choice] = whole.choices
    assert choice.finish_reason == STOP, choice.message.text
    Verdict.model_validate_json(choice.message.text)

    chunks = list(
        grpc_client.chat_stream(MODEL, ASK, response_format=fmt, max_tokens=MAX_TOKENS, temperature=1)
    )
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == STOP
    Verdict.model_validate_json(text)


def test_forced_tool_call_unary_and_streamed(grpc_client: Client) -> None:
    ask = [user("Wake me at seven")]
    fields = {
        "tools": TOOLS,
        "tool_choice": tool_choice("set_alarm"),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    [choice] = grpc_client.chat(MODEL, ask, **fields).choices
    assert choice.finish_reason == TOOL_CALLS
    assert choice.message.text == ""
    [call] = choice.message.tool_calls
    assert call.name == "set_alarm" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), PARAMETERS["set_alarm"])

    chunks = list(grpc_client.chat_stream(MODEL, ask, **{**fields, "temperature": 1}))
    deltas = [d for c in chunks for choice_ in c.choices for d in choice_.delta.tool_calls]
    assert deltas and {d.index for d in deltas} == {0}
    assert deltas[0].name == "set_alarm" and deltas[0].id.startswith("call_")
    assert all(not d.id and not d.name for d in deltas[1:])  # id and name on the first piece only
    jsonschema.validate(json.loads("".join(d.arguments for d in deltas)), PARAMETERS["set_alarm"])
    assert chunks[-1].choices[0].finish_reason == TOOL_CALLS


def test_tool_choice_auto_is_refused_naming_tool_choice(grpc_client: Client) -> None:
    for fields in ({"tool_choice": tool_choice("auto")}, {}):  # unset with tools is "auto"
        error = _fails(grpc_client.chat, MODEL, ASK, tools=TOOLS, max_tokens=4, **fields)
        assert error.code == Code.INVALID_ARGUMENT
        assert error.field == "tool_choice" and error.param == "tool_choice"
        assert "Phi-3.5 has no tool-call format" in error.message
    error = _fails(grpc_client.chat, MODEL, ASK, tools=TOOLS, tool_choice=tool_choice("nope"), max_tokens=4)
    assert error.code == Code.INVALID_ARGUMENT and error.field == "tool_choice.function_name"


# -- sampling ------------------------------------------------------------------------------


def test_logprobs_carry_top_alternatives(grpc_client: Client) -> None:
    answer = grpc_client.chat(
        MODEL, ASK, logprobs=True, top_logprobs=3, max_tokens=5, temperature=0, ignore_eos=True
    )
    tokens = answer.choices[0].logprobs.content
    assert len(tokens) == answer.usage.completion_tokens == 5
    for token in tokens:
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-4)
        assert token.bytes == token.token.encode()
        assert all(top.bytes == top.token.encode() for top in token.top_logprobs)

    completion = grpc_client.complete(
        MODEL, "Once upon", logprobs=2, max_tokens=4, temperature=0, ignore_eos=True
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 4
    for token_logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top.logprobs) <= 2
        assert token_logprob == pytest.approx(max(top.logprobs.values()), abs=1e-4)  # greedy
    assert list(logprobs.text_offset) == [sum(map(len, logprobs.tokens[:i])) for i in range(4)]


def test_n_gives_n_choices_unary_and_streamed(grpc_client: Client) -> None:
    answer = grpc_client.chat(MODEL, ASK, n=2, max_tokens=4, temperature=1, ignore_eos=True)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.completion_tokens == 8
    chunks = list(grpc_client.chat_stream(MODEL, ASK, n=2, max_tokens=4, temperature=1, ignore_eos=True))
    finished = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert finished == {0: LENGTH, 1: LENGTH}


def test_logit_bias_stop_token_ids_and_min_tokens_reach_the_engine(grpc_client: Client, token_x: int) -> None:
    prompt = "def fibonacci(n):"
    greedy = grpc_client.complete(MODEL, prompt, max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    forced = grpc_client.complete(
        MODEL, prompt, max_tokens=6, temperature=0, logprobs=0, ignore_eos=True, logit_bias={token_x: 100}
    )
    # logit_bias: +100 on X makes every token X, which greedy decoding alone does not give.
    [x_text] = set(forced.choices[0].logprobs.tokens)
    assert set(greedy.choices[0].logprobs.tokens) != {x_text}

    # stop_token_ids: the first X ends the choice.
    stopped = grpc_client.complete(
        MODEL, prompt, max_tokens=6, temperature=0, logit_bias={token_x: 100}, stop_token_ids=[token_x]
    )
    assert stopped.choices[0].finish_reason == STOP and stopped.usage.completion_tokens == 1

    # min_tokens: X may end the choice only after 4 tokens.
    held = grpc_client.complete(
        MODEL,
        prompt,
        max_tokens=6,
        temperature=0,
        logit_bias={token_x: 100},
        stop_token_ids=[token_x],
        min_tokens=4,
    )
    assert held.choices[0].finish_reason == STOP
    assert held.usage.completion_tokens == 5  # 4 held back, then the stop token


def test_prompt_lists_token_prompts_and_continuous_usage(grpc_client: Client, token_x: int) -> None:
    several = grpc_client.complete(MODEL, ["one", "two"], n=2, max_tokens=2, temperature=1, ignore_eos=True)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.usage.completion_tokens == 8
    ids = grpc_client.tokenize(MODEL, "Once upon a time").tokens
    by_ids = grpc_client.complete(MODEL, [list(ids)], max_tokens=3, temperature=0, ignore_eos=True)
    by_text = grpc_client.complete(MODEL, "Once upon a time", max_tokens=3, temperature=0, ignore_eos=True)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)

    error = _fails(grpc_client.complete, MODEL, [[1], []], max_tokens=2)
    assert error.code == Code.INVALID_ARGUMENT and error.field == "token_prompts[1]"

    chunks = list(
        grpc_client.chat_stream(
            MODEL, ASK, max_tokens=5, temperature=0, ignore_eos=True, continuous_usage_stats=True
        )
    )
    content = [c for c in chunks if c.choices]
    assert all(c.HasField("usage") for c in content)
    assert [c.usage.completion_tokens for c in content][-1] == 5
    totals = [c.usage.completion_tokens for c in content]
    assert totals == sorted(totals) and totals[0] < totals[-1]


# -- models, tokenize ----------------------------------------------------------------------


def test_get_model_is_the_tenants(cluster: Cluster, admin: httpx.Client, grpc_client: Client) -> None:
    listed = {m.id: m for m in grpc_client.list_models()}
    assert grpc_client.get_model(MODEL) == listed[MODEL]

    _, key = new_tenant(admin, allowed_models=["phi-3.5-moe"])
    with _client_for(cluster, key) as restricted:
        moe = restricted.get_model("phi-3.5-moe")
        assert moe.id == "phi-3.5-moe"
        # With a key, ListModels lists what the tenant may use (the moe pool's names).
        assert {m.pool for m in restricted.list_models()} == {moe.pool}
        hidden = _fails(restricted.get_model, MODEL)
        missing = _fails(restricted.get_model, "no-such-model")
    # A model the tenant may not use is answered as one that does not exist.
    assert hidden.code == missing.code == Code.NOT_FOUND
    assert hidden.message.replace(MODEL, "?") == missing.message.replace("no-such-model", "?")
    assert hidden.error_code == missing.error_code and hidden.param == missing.param == "model"
    with Client(grpc_target(cluster), timeout_s=30) as anonymous:
        assert _fails(anonymous.get_model, MODEL).code == Code.UNAUTHENTICATED


def test_tokenize_detokenize_round_trip_and_chat_count(grpc_client: Client) -> None:
    text = "Once upon a time, a fox"
    answer = grpc_client.tokenize(MODEL, text, add_special_tokens=False, return_token_strs=True)
    assert answer.count == len(answer.tokens) == len(answer.token_strs) > 3
    assert answer.max_model_len == grpc_client.get_model(MODEL).max_model_len
    assert grpc_client.detokenize(MODEL, answer.tokens) == text

    # Messages count as Chat counts its prompt.
    messages = [user("Count the tokens of this chat")]
    counted = grpc_client.tokenize(MODEL, messages=messages)
    chat = grpc_client.chat(MODEL, messages, max_tokens=1)
    assert counted.count == chat.usage.prompt_tokens

    error = _fails(grpc_client.detokenize, MODEL, [10**9])
    assert error.code == Code.INVALID_ARGUMENT and error.field == "tokens"
    error = _fails(grpc_client.tokenize, MODEL, "x", messages=messages)
    assert error.code == Code.INVALID_ARGUMENT


# -- files ---------------------------------------------------------------------------------


def test_list_and_delete_files_are_the_tenants(cluster: Cluster, admin: httpx.Client) -> None:
    _, key_a = new_tenant(admin)
    _, key_b = new_tenant(admin)
    with _client_for(cluster, key_a) as a, _client_for(cluster, key_b) as b:
        first = a.upload_file(batch_file(1), filename="first.jsonl")
        second = a.upload_file(batch_file(2), filename="second.jsonl")
        page = a.list_files()
        assert [f.id for f in page.files] == [second.id, first.id]  # newest first
        assert (page.first_id, page.last_id, page.has_more) == (second.id, first.id, False)
        oldest = a.list_files(order="asc", limit=1)
        assert [f.id for f in oldest.files] == [first.id] and oldest.has_more
        assert [f.id for f in a.list_files(order="asc", after=first.id).files] == [second.id]
        assert not a.list_files(purpose="batch_output").files

        # The attacker's side: B sees none of A's files and cannot delete them.
        assert not b.list_files().files
        assert _fails(b.delete_file, first.id).code == Code.NOT_FOUND
        assert _fails(b.list_files, after=first.id).code == Code.INVALID_ARGUMENT
        assert a.get_file(first.id).id == first.id  # still there

        deleted = a.delete_file(first.id)
        assert (deleted.id, deleted.deleted) == (first.id, True)
        assert _fails(a.get_file, first.id).code == Code.NOT_FOUND
        assert [f.id for f in a.list_files().files] == [second.id]
        error = _fails(a.list_files, limit=-1)
        assert error.code == Code.INVALID_ARGUMENT and error.field == "limit"

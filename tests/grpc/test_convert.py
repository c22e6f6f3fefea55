"""Proto requests -> REST models and REST params -> proto field paths (services/grpc/convert.py),
and the core's response bodies -> proto (services/grpc/responses.py), without a cluster.

The REST models validate what the converter produces, so a field the converter dropped or
misnamed shows up here as a default value or a validation error."""

from __future__ import annotations

import pytest

from services.errors import InvalidRequest
from services.grpc import convert, responses
from services.grpc.client import json_object, json_schema, tool, tool_choice, user
from services.grpc.client_common import complete_request, complete_stream_request, sampling
from services.grpc.gen.phiserve.v1 import chat_pb2, common_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.inference.protocol.chat import NamedToolChoice, ResponseFormatJsonSchema
from services.inference.protocol.responses import ChatCompletion, ChatCompletionChunk, Completion

MODEL = "phi-3.5-mini"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}


def test_new_sampling_fields_reach_the_rest_model() -> None:
    params = sampling(
        n=2,
        stop_token_ids=[7, 9],
        min_tokens=3,
        logit_bias={42: -100.0, 7: 2.5},
        min_p=0.1,
        max_completion_tokens=12,
    )
    body = convert.chat_body(
        pb.ChatRequest(model=MODEL, messages=[user("hi")], sampling=params), stream=False
    )
    assert body.n == 2
    assert body.stop_token_ids == [7, 9]
    assert body.min_tokens == 3
    assert body.logit_bias == {"42": -100.0, "7": 2.5}
    assert set(body.logit_bias_pairs()) == {(42, -100.0), (7, 2.5)}  # a proto map has no order
    assert body.min_p == pytest.approx(0.1)
    assert body.token_limit() == 12
    # Unset: REST's defaults.
    plain = convert.chat_body(pb.ChatRequest(model=MODEL, messages=[user("hi")]), stream=False)
    assert (plain.n, plain.min_tokens, plain.logit_bias, plain.stop_token_ids, plain.min_p) == (
        1,
        0,
        None,
        None,
        0,
    )


def test_json_schema_and_tools_become_rest_dicts_with_integer_keywords() -> None:
    request = pb.ChatRequest(
        model=MODEL,
        messages=[user("weather?")],
        response_format=json_schema("forecast", SCHEMA),
        logprobs=True,
        top_logprobs=3,
        echo=True,
    )
    body = convert.chat_body(request, stream=False)
    assert isinstance(body.response_format, ResponseFormatJsonSchema)
    schema = body.response_format.json_schema.schema_
    assert schema == SCHEMA
    # A Struct holds doubles: 20.0 must come back as the integer JSON Schema requires.
    assert isinstance(schema["properties"]["city"]["maxLength"], int)
    assert body.response_format.json_schema.strict is True
    assert body.logprobs_count() == 3
    assert body.echo is True

    any_object = pb.ChatRequest(model=MODEL, messages=[user("x")], response_format=json_object())
    assert convert.chat_body(any_object, stream=False).model_dump()["response_format"] == {
        "type": "json_object"
    }

    tools = pb.ChatStreamRequest(
        model=MODEL,
        messages=[user("weather?")],
        tools=[tool("get_weather", SCHEMA, "Weather of a city"), tool("noop")],
        tool_choice=tool_choice("get_weather"),
        parallel_tool_calls=False,
        continuous_usage_stats=True,
    )
    body = convert.chat_body(tools, stream=True)
    assert body.tools is not None
    assert body.tools[0].function.parameters == SCHEMA
    assert body.tools[0].function.description == "Weather of a city"
    assert body.tools[1].function.parameters is None
    assert isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name == "get_weather"
    assert body.parallel_tool_calls is False
    assert body.continuous_usage() is True and body.include_usage() is False

    for mode in ("none", "auto", "required"):
        chosen = tools.__class__()
        chosen.CopyFrom(tools)
        chosen.tool_choice.CopyFrom(tool_choice(mode))
        assert convert.chat_body(chosen, stream=True).tool_choice == mode


def test_tool_messages_in_the_history() -> None:
    history = [
        user("weather in Paris?"),
        chat_pb2.ChatMessage(
            role=chat_pb2.ROLE_ASSISTANT,
            tool_calls=[chat_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')],
        ),
        chat_pb2.ChatMessage(role=chat_pb2.ROLE_TOOL, tool_call_id="call_1", text='{"temp": 21}'),
    ]
    body = convert.chat_body(pb.ChatRequest(model=MODEL, messages=history), stream=False)
    call = body.messages[1].tool_calls
    assert call is not None and call[0].id == "call_1" and call[0].function.arguments == '{"city":"Paris"}'
    assert body.messages[2].role == "tool" and body.messages[2].tool_call_id == "call_1"


def test_completion_prompts_token_ids_and_logprobs() -> None:
    one = convert.completion_body(complete_request(MODEL, "Once", False, "", {"logprobs": 2}), stream=False)
    assert one.prompt == "Once" and one.logprobs == 2
    several = convert.completion_body(complete_request(MODEL, ["a", "b"], False, "", {}), stream=False)
    assert several.prompt == ["a", "b"] and several.logprobs is None
    ids = convert.completion_body(
        complete_stream_request(MODEL, [[1, 2], [3]], True, "", False, {"continuous_usage_stats": True}),
        stream=True,
    )
    assert ids.prompt == [[1, 2], [3]] and ids.echo is True and ids.continuous_usage()

    both = pb.CompleteRequest(model=MODEL, prompt="a", prompts=["b"])
    with pytest.raises(InvalidRequest) as refused:
        convert.completion_body(both, stream=False)
    assert refused.value.param == "prompts"
    tokens = pb.CompleteRequest(model=MODEL, token_prompts=[{"ids": [1]}, {"ids": [2]}])
    assert convert.prompt_renames(tokens) == {"prompt": "token_prompts"}
    assert convert.proto_field("prompt[1]", convert.prompt_renames(tokens)) == "token_prompts[1]"
    assert convert.proto_field("prompt", convert.prompt_renames(tokens)) == "token_prompts"
    assert convert.prompt_renames(pb.CompleteRequest(model=MODEL, prompt="a")) == {}


@pytest.mark.parametrize(
    ("param", "field"),
    [
        ("n", "sampling.n"),
        ("logit_bias", "sampling.logit_bias"),
        ("stop_token_ids", "sampling.stop_token_ids"),
        ("min_tokens", "sampling.min_tokens"),
        ("min_p", "sampling.min_p"),
        ("max_completion_tokens", "sampling.max_completion_tokens"),
        ("temperature", "sampling.temperature"),
        ("tool_choice", "tool_choice"),
        ("tool_choice.function.name", "tool_choice.function_name"),
        ("tool_choice.NamedToolChoice.function.name", "tool_choice.function_name"),
        ("tools", "tools"),
        ("tools[1].function.parameters", "tools[1].function.parameters"),
        ("response_format", "response_format"),
        ("response_format.json_schema.json_schema.name", "response_format.json_schema.name"),
        ("response_format.json_schema.schema", "response_format.json_schema.schema"),
        ("top_logprobs", "top_logprobs"),
        ("stream_options", "include_usage"),
        ("stream_options.continuous_usage_stats", "continuous_usage_stats"),
        ("messages[2].tool_calls[0].function.arguments", "messages[2].tool_calls[0].arguments"),
        ("messages[2].tool_calls", "messages[2].tool_calls"),
        ("messages[1].tool_call_id", "messages[1].tool_call_id"),
        ("messages[0].content[1].image_url.url", "messages[0].parts[1].image"),
    ],
)
def test_rest_params_name_proto_fields(param: str, field: str) -> None:
    assert convert.proto_field(param) == field


def test_chat_bodies_with_tool_calls_and_logprobs_become_proto() -> None:
    top = [
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
        {"token": "Yo", "logprob": -2.0, "bytes": None},
    ]
    body: ChatCompletion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"x":1}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "Hi"},
                "logprobs": {
                    "content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": top}]
                },
                "finish_reason": "stop",
            },
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    answer = responses.chat_response(body, "rid")
    calls, text = answer.choices
    assert calls.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert [(c.id, c.name, c.arguments) for c in calls.message.tool_calls] == [("call_a", "f", '{"x":1}')]
    assert calls.message.text == "" and not calls.HasField("logprobs")
    assert text.index == 1 and text.message.text == "Hi"
    [token] = text.logprobs.content
    assert (token.token, token.bytes) == ("Hi", b"Hi")
    assert [(t.token, t.logprob, t.bytes) for t in token.top_logprobs] == [
        ("Hi", -0.1, b"Hi"),
        ("Yo", -2.0, b""),
    ]

    chunk: ChatCompletionChunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "f", "arguments": ""},
                        }
                    ]
                },
                "logprobs": None,
                "finish_reason": None,
            },
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]},
                "logprobs": None,
                "finish_reason": "tool_calls",
            },
        ],
        "usage": body["usage"],
    }
    message = responses.chat_chunk(chunk, "rid")
    first, later = message.choices
    assert [(d.index, d.id, d.name, d.arguments) for d in first.delta.tool_calls] == [(0, "call_a", "f", "")]
    assert [(d.index, d.id, d.name, d.arguments) for d in later.delta.tool_calls] == [(0, "", "", '{"x"')]
    assert later.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert message.usage.total_tokens == 7


def test_completion_logprobs_become_proto() -> None:
    body: Completion = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": "ab",
                "logprobs": {
                    "tokens": ["a", "b"],
                    "token_logprobs": [-0.5, -1.5],
                    "top_logprobs": [{"a": -0.5, "c": -1.0}, {"b": -1.5}],
                    "text_offset": [0, 1],
                },
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "total_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    [choice] = responses.completion_response(body, "rid").choices
    assert list(choice.logprobs.tokens) == ["a", "b"]
    assert list(choice.logprobs.token_logprobs) == [-0.5, -1.5]
    assert [dict(top.logprobs) for top in choice.logprobs.top_logprobs] == [
        {"a": -0.5, "c": -1.0},
        {"b": -1.5},
    ]
    assert list(choice.logprobs.text_offset) == [0, 1]

"""What crosses the handle per streamed chunk and per unary answer (services/pools/engine.py):
each pickles as its fields, round-trips equal through Serve's serializer (cloudpickle), and
stays small (issue 12, item 2)."""

from __future__ import annotations

import pickle

from ray import cloudpickle

from services.pools.engine import ChoiceResult, GenerationChunk, GenerationResult, TokenLogprob


def test_a_chunk_round_trips_equal_and_small() -> None:
    chunk = GenerationChunk(
        text="hello wor",
        completion_tokens=12,
        prompt_tokens=20,
        finish_reason="length",
        cached_tokens=16,
        index=3,
    )
    wire = cloudpickle.dumps(chunk)
    assert pickle.loads(wire) == chunk
    # As its fields: the class once, then the values; no slot names (183 bytes before).
    assert len(wire) < 100, len(wire)
    for name in ("completion_tokens", "prompt_tokens", "cached_tokens", "finish_reason"):
        assert name.encode() not in wire


def test_a_chunk_with_logprobs_round_trips_and_stays_mergeable() -> None:
    tokens = [TokenLogprob("a", -0.5, (("a", -0.5), ("b", -1.25))), TokenLogprob("c", -9999.0)]
    chunk = GenerationChunk("ac", 2, 5, logprobs=tokens)
    back = pickle.loads(cloudpickle.dumps(chunk))
    assert back == chunk and back.logprobs == tokens
    back.merge(GenerationChunk("d", 3, 5, finish_reason="stop", logprobs=[TokenLogprob("d", -2.0)]))
    assert (back.text, back.completion_tokens, back.finish_reason) == ("acd", 3, "stop")
    assert [t.token for t in back.logprobs or ()] == ["a", "c", "d"]


def test_a_unary_result_round_trips_equal() -> None:
    result = GenerationResult(
        choices=[
            ChoiceResult(0, "abc", "stop", [TokenLogprob("abc", -1.0, (("abc", -1.0),))]),
            ChoiceResult(1, "xy", "length"),
        ],
        prompt_tokens=7,
        completion_tokens=5,
        cached_tokens=4,
    )
    back = pickle.loads(cloudpickle.dumps(result))
    assert back == result
    assert (back.text, back.finish_reason) == ("abc", "stop")

"""CompletionShape (services/inference/completions.py): OpenAI's text_completion bodies per
choice, with echo prefixes per prompt and logprobs whose text_offset counts from the start
of the choice's text (the echoed prompt included), unary and across stream chunks."""

from __future__ import annotations

from services.inference.completions import CompletionShape
from services.pools.engine import ChoiceResult, GenerationChunk, GenerationResult, TokenLogprob


def tokens(*texts: str) -> list[TokenLogprob]:
    return [TokenLogprob(t, -1.0, ((t, -1.0), ("x", -2.0))) for t in texts]


def test_unary_offsets_start_after_the_echoed_prompt_of_each_choice() -> None:
    shape = CompletionShape("id", "m", echo_prefixes=["Hello", "Hi!"], n=2)
    result = GenerationResult(
        choices=[
            ChoiceResult(0, " big world", "length", tokens(" big", " world")),
            ChoiceResult(1, " big world", "length", tokens(" big", " world")),
            ChoiceResult(2, " you", "stop", tokens(" you")),
            ChoiceResult(3, " you", "stop", tokens(" you")),
        ],
        prompt_tokens=4,
        completion_tokens=6,
    )
    body = shape.response(result)
    assert [c["text"] for c in body["choices"]] == [
        "Hello big world",
        "Hello big world",
        "Hi! you",
        "Hi! you",
    ]
    logprobs = [c["logprobs"] for c in body["choices"]]
    assert all(lp is not None for lp in logprobs)
    assert logprobs[0] == {
        "tokens": [" big", " world"],
        "token_logprobs": [-1.0, -1.0],
        "top_logprobs": [{" big": -1.0, "x": -2.0}, {" world": -1.0, "x": -2.0}],
        "text_offset": [5, 9],
    }
    assert logprobs[3]["text_offset"] == [3]  # type: ignore[index]
    assert body["usage"]["total_tokens"] == 10


def test_streamed_offsets_continue_per_choice_across_chunks() -> None:
    shape = CompletionShape("id", "m", echo_prefixes=["Hey"], n=2)

    def chunk(index: int, *texts: str) -> GenerationChunk:
        return GenerationChunk("".join(texts), 1, 1, index=index, logprobs=tokens(*texts))

    first = shape.chunk(chunk(0, " a", "bc"))
    other = shape.chunk(chunk(1, " z"))
    later = shape.chunk(chunk(0, " d"))
    assert first["choices"][0]["text"] == "Hey abc"  # the prompt, once, before the first delta
    assert first["choices"][0]["logprobs"]["text_offset"] == [3, 5]  # type: ignore[index]
    assert other["choices"][0]["text"] == "Hey z"
    assert other["choices"][0]["logprobs"]["text_offset"] == [3]  # type: ignore[index]
    assert later["choices"][0]["text"] == " d"
    assert later["choices"][0]["logprobs"]["text_offset"] == [7]  # type: ignore[index]


def test_without_logprobs_or_echo() -> None:
    shape = CompletionShape("id", "m")
    body = shape.response(GenerationResult([ChoiceResult(0, "text", "stop")], 1, 1))
    assert body["choices"][0] == {"index": 0, "text": "text", "logprobs": None, "finish_reason": "stop"}

"""Several engine streams of one request as one (services/pools/streams.py): the running
totals the merged stream carries, and how errors and early closes reach every stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.pools.engine import GenerationChunk
from services.pools.streams import RunningTotals, merge_streams


def chunk(
    text: str, completion: int, *, prompt: int = 10, cached: int = 0, index: int = 0
) -> GenerationChunk:
    return GenerationChunk(
        text=text, completion_tokens=completion, prompt_tokens=prompt, cached_tokens=cached, index=index
    )


def test_totals_are_the_sums_of_each_streams_latest_counts() -> None:
    totals = RunningTotals(2)
    first = totals.add(0, chunk("a", 1, prompt=10, cached=4))
    assert (first.prompt_tokens, first.completion_tokens, first.cached_tokens) == (10, 1, 4)
    second = totals.add(1, chunk("b", 1, prompt=7, index=1))
    assert (second.prompt_tokens, second.completion_tokens, second.cached_tokens) == (17, 2, 4)
    # A stream's counts are running totals of its own: the later one replaces the earlier.
    third = totals.add(0, chunk("c", 3, prompt=10, cached=4))
    assert (third.prompt_tokens, third.completion_tokens, third.cached_tokens) == (17, 4, 4)
    assert (third.text, third.index) == ("c", 0)


def test_copies_of_a_prompt_count_its_prompt_once() -> None:
    # Two prompts, two greedy choices each: streams 0, 1 are prompt 0's, streams 2, 3 prompt 1's.
    totals = RunningTotals(4, copies=2)
    totals.add(0, chunk("a", 2, prompt=10, cached=0))
    totals.add(1, chunk("a", 2, prompt=10, cached=8))  # the copy hit the first one's blocks
    totals.add(2, chunk("b", 1, prompt=5))
    last = totals.add(3, chunk("b", 1, prompt=5))
    assert last.prompt_tokens == 15  # as OpenAI counts a prompt with n choices
    assert last.completion_tokens == 6  # every choice's tokens
    assert last.cached_tokens == 0


async def _stream(items: list[GenerationChunk], closed: list[int], position: int, fail: bool = False):  # type: ignore[no-untyped-def]
    try:
        for item in items:
            await asyncio.sleep(0)
            yield item
        if fail:
            raise ValueError("engine broke")
        if position < 0:  # a stream that has not ended: waits until it is closed
            await asyncio.Event().wait()
    finally:
        closed.append(position)


async def test_merged_chunks_are_tagged_with_their_stream() -> None:
    closed: list[int] = []
    streams: list[AsyncIterator[GenerationChunk]] = [
        _stream([chunk("a", 1), chunk("b", 2)], closed, 0),
        _stream([chunk("x", 1, index=1)], closed, 1),
    ]
    seen = [(position, c.text) async for position, c in merge_streams(streams)]
    assert sorted(seen) == [(0, "a"), (0, "b"), (1, "x")]
    assert [text for position, text in seen if position == 0] == ["a", "b"]  # each in order
    assert sorted(closed) == [0, 1]


async def test_an_error_in_one_stream_is_raised_and_closes_the_others() -> None:
    closed: list[int] = []
    endless = _stream([chunk("a", 1)], closed, -1)  # waits forever after its chunk
    broken = _stream([chunk("x", 1, index=1)], closed, 1, fail=True)
    with pytest.raises(ValueError, match="engine broke"):
        async for _ in merge_streams([endless, broken]):
            pass
    assert sorted(closed) == [-1, 1]


async def test_closing_the_merged_stream_closes_every_stream() -> None:
    closed: list[int] = []
    merged = merge_streams([_stream([chunk("a", 1)], closed, -1), _stream([chunk("b", 1)], closed, -2)])
    await anext(merged)
    await merged.aclose()
    assert sorted(closed) == [-2, -1]

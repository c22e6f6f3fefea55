"""The pool replica's coalescing per choice (services/pools/deployment.py), on a scripted
engine: deltas of one choice are joined, never those of two; a finished choice goes out at
once; every chunk sent carries the request's latest totals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from services.catalog.loader import load_catalog
from services.catalog.models import PoolConfig
from services.pools.deployment import COALESCE_STREAMS_AT_BASE, MAX_COALESCE_FACTOR, coalesce_interval
from services.pools.engine import (
    Engine,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    TokenLogprob,
)
from tests.fakes.handles import start_pool_replica


class ScriptedEngine(Engine):
    """Yields the chunks it was given, as they are."""

    def __init__(self, script: list[GenerationChunk]) -> None:
        self.script = script

    async def start(self) -> None:
        pass

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        for piece in self.script:
            yield replace(piece)  # a copy: the replica merges into the chunks it holds

    async def check_health(self) -> None:
        pass

    async def num_unfinished(self) -> int:
        return 0

    def shutdown(self) -> None:
        pass


def piece(index: int, text: str, completion: int, finish: str | None = None) -> GenerationChunk:
    return GenerationChunk(
        text=text,
        completion_tokens=completion,
        prompt_tokens=9,
        finish_reason=finish,
        cached_tokens=completion // 2,
        index=index,
        logprobs=[TokenLogprob(text, -float(completion))],
    )


SCRIPT = [
    piece(0, "a", 1),
    piece(1, "b", 2),
    piece(0, "c", 3),
    piece(1, "d", 4),
    piece(0, "e", 5, "length"),
    piece(1, "f", 6, "stop"),
]
REQUEST = GenerationRequest(
    request_id="r", model="phi-3.5-mini", sampling=SamplingOptions(n=2), prompts=("x",)
)


def text_pool() -> PoolConfig:
    return next(pool for pool in load_catalog("local").enabled_pools if pool.name == "text")


async def test_each_choice_is_coalesced_on_its_own() -> None:
    replica = await start_pool_replica(
        text_pool(), engine_factory=lambda pool, path: ScriptedEngine(SCRIPT), coalesce_interval_s=60.0
    )
    sent = [chunk async for chunk in replica.generate_stream(REQUEST)]
    assert [(c.index, c.text, c.finish_reason) for c in sent] == [
        (0, "a", None),  # the first delta goes out at once (time to first token)
        (0, "ce", "length"),  # choice 0 finished: everything held goes, in choice order
        (1, "bd", None),
        (1, "f", "stop"),
    ]
    # Each carries the request's totals as of when it was sent.
    assert [c.completion_tokens for c in sent] == [1, 5, 5, 6]
    assert [c.cached_tokens for c in sent] == [0, 2, 2, 3]
    assert all(c.prompt_tokens == 9 for c in sent)
    # Log probabilities travel with their choice's text, in order.
    assert [[t.token for t in c.logprobs or ()] for c in sent] == [["a"], ["c", "e"], ["b", "d"], ["f"]]


async def test_without_coalescing_every_delta_goes_out_and_assembles_per_choice() -> None:
    replica = await start_pool_replica(
        text_pool(), engine_factory=lambda pool, path: ScriptedEngine(SCRIPT), coalesce_interval_s=0.0
    )
    sent = [chunk async for chunk in replica.generate_stream(REQUEST)]
    assert [(c.index, c.text) for c in sent] == [(0, "a"), (1, "b"), (0, "c"), (1, "d"), (0, "e"), (1, "f")]
    result = GenerationResult.assemble(sent)
    assert [(c.index, c.text, c.finish_reason) for c in result.choices] == [
        (0, "ace", "length"),
        (1, "bdf", "stop"),
    ]
    assert [t.token for t in result.choices[1].logprobs or ()] == ["b", "d", "f"]
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (9, 6, 3)
    unary = await replica.generate(REQUEST)
    assert [c.text for c in unary.choices] == ["ace", "bdf"] and unary.completion_tokens == 6


ONE_CHOICE = [piece(0, "a", 1), piece(0, "b", 2), piece(0, "c", 3), piece(0, "d", 4, "length")]
ONE_REQUEST = replace(REQUEST, sampling=SamplingOptions(n=1))


async def test_one_choice_is_coalesced_with_its_latest_totals() -> None:
    replica = await start_pool_replica(
        text_pool(), engine_factory=lambda pool, path: ScriptedEngine(ONE_CHOICE), coalesce_interval_s=60.0
    )
    sent = [chunk async for chunk in replica.generate_stream(ONE_REQUEST)]
    assert [(c.text, c.finish_reason, c.completion_tokens, c.cached_tokens) for c in sent] == [
        ("a", None, 1, 0),  # at once
        ("bcd", "length", 4, 2),  # the rest when the choice finished
    ]
    assert [[t.token for t in c.logprobs or ()] for c in sent] == [["a"], ["b", "c", "d"]]


async def test_one_choice_without_coalescing_sends_every_delta() -> None:
    replica = await start_pool_replica(
        text_pool(), engine_factory=lambda pool, path: ScriptedEngine(ONE_CHOICE), coalesce_interval_s=0.0
    )
    sent = [chunk async for chunk in replica.generate_stream(ONE_REQUEST)]
    assert [c.text for c in sent] == ["a", "b", "c", "d"]
    assert sent[-1].finish_reason == "length" and sent[-1].completion_tokens == 4


def test_the_interval_grows_with_the_replicas_open_streams() -> None:
    base = 0.02
    assert coalesce_interval(base, 1) == base
    assert coalesce_interval(base, COALESCE_STREAMS_AT_BASE) == base
    assert coalesce_interval(base, 2 * COALESCE_STREAMS_AT_BASE) == 2 * base
    assert coalesce_interval(base, 1000) == MAX_COALESCE_FACTOR * base
    assert coalesce_interval(0.0, 1000) == 0.0  # no coalescing stays none


async def test_open_streams_are_counted_until_they_end_or_close() -> None:
    replica = await start_pool_replica(
        text_pool(), engine_factory=lambda pool, path: ScriptedEngine(ONE_CHOICE), coalesce_interval_s=60.0
    )
    streams = [replica.generate_stream(ONE_REQUEST) for _ in range(3)]
    for stream in streams:
        await anext(stream)
    assert replica._active_streams == 3
    await streams[0].aclose()  # a client gone
    assert replica._active_streams == 2
    for stream in streams[1:]:
        assert [c.finish_reason async for c in stream] == ["length"]
    assert replica._active_streams == 0

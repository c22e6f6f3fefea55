"""The pool replica's coalescing per choice (services/pools/deployment.py), on a scripted
engine: deltas of one choice are joined, never those of two; a finished choice goes out at
once; every chunk sent carries the request's latest totals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from services.catalog.loader import load_catalog
from services.catalog.models import PoolConfig
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

"""Merging the engine streams of a request with several prompts into one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from services.pools.engine import GenerationChunk

_DONE = object()


class RunningTotals:
    """Each prompt's stream counts its own tokens; the merged stream carries the sums.

    `copies`: each prompt runs as that many consecutive streams (greedy choices, one engine
    request each); its prompt is counted once, as OpenAI counts it, from its first stream."""

    def __init__(self, streams: int, *, copies: int = 1) -> None:
        self._copies = copies
        self._prompt = [0] * streams
        self._completion = [0] * streams
        self._cached = [0] * streams

    def add(self, position: int, chunk: GenerationChunk) -> GenerationChunk:
        self._completion[position] = chunk.completion_tokens
        if position % self._copies == 0:
            self._prompt[position] = chunk.prompt_tokens
            self._cached[position] = chunk.cached_tokens
        return replace(
            chunk,
            prompt_tokens=sum(self._prompt),
            completion_tokens=sum(self._completion),
            cached_tokens=sum(self._cached),
        )


async def merge_streams(
    streams: list[AsyncIterator[GenerationChunk]],
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Chunks of every stream as they come, tagged with the stream's position. The first
    error stops the rest; closing the merged stream closes (aborts) every one."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(position: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((position, chunk))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            await queue.put((position, exc))
            return
        await queue.put((position, _DONE))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            position, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, GenerationChunk)
                yield position, item
    finally:
        for task in tasks:
            task.cancel()  # each stream's own `finally` aborts its engine request
        await asyncio.gather(*tasks, return_exceptions=True)

"""Validating and storing a large batch file does not stall the event loop (issue 9, item 4).

The real FileService on real Redis and a local file store: while one tenant uploads a big
JSONL file, a ticker on the same loop (standing in for every other request the replica
serves) must keep running.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from services.batch.files import FileService, LocalFileStore
from services.tenancy.redis_state import RedisState

TICK_S = 0.005


def _big_file(lines: int) -> bytes:
    body = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 4}
    return "\n".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for i in range(lines)
    ).encode()


async def test_a_big_upload_leaves_the_loop_free(state: RedisState, tmp_path: Path) -> None:
    data = _big_file(40_000)  # ~13 MB
    files = FileService(state, LocalFileStore(tmp_path), max_bytes=64 << 20, max_lines=50_000)
    longest_gap = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest_gap
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            longest_gap = max(longest_gap, now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    file = await files.upload("acme", filename="big.jsonl", purpose="batch", data=data)
    took = time.perf_counter() - started
    done.set()
    await ticking
    assert file.bytes == len(data)
    assert took > 0.3, f"the upload took {took:.2f} s: too small a file to show anything"
    # On the loop, the gap is the whole validation; off it, a few thread switches.
    assert longest_gap < max(0.15, took / 4), f"loop stalled {longest_gap:.2f} s of an upload of {took:.2f} s"

"""Validating and storing a large batch file does not stall the event loop (issue 9, item 4).

The real FileService on real Redis and a local file store: while one tenant uploads a big
JSONL file, a ticker on the same loop (standing in for every other request the replica
serves) must keep running.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.batch.files import FileService, LocalFileStore
from services.tenancy.redis_state import RedisState
from tests.helpers import LoopStallMeter


def _big_file(lines: int) -> bytes:
    body = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 4}
    return "\n".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for i in range(lines)
    ).encode()


async def test_a_big_upload_leaves_the_loop_free(state: RedisState, tmp_path: Path) -> None:
    data = _big_file(40_000)  # ~13 MB
    files = FileService(state, LocalFileStore(tmp_path), max_bytes=64 << 20, max_lines=50_000)
    async with LoopStallMeter() as meter:
        file = await files.upload("acme", filename="big.jsonl", purpose="batch", data=data)
    longest_gap, took = meter.longest_gap, meter.took
    assert file.bytes == len(data)
    assert took > 0.3, f"the upload took {took:.2f} s: too small a file to show anything"
    # On the loop, the gap is the whole validation; off it, a few thread switches.
    assert longest_gap < max(0.15, took / 4), f"loop stalled {longest_gap:.2f} s of an upload of {took:.2f} s"

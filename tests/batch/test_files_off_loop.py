"""Validating and storing a large batch file does not stall the event loop (issue 9, item 4).

The real FileService on real Redis and a local file store: while one tenant's big JSONL
file is validated and written, the event loop (which serves every other request on the
replica) must stay free. The probes show on which thread that work ran, not how long it
took, so the answer does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.batch import files as files_module
from services.batch.files import FileService, LocalFileStore
from services.redis_store import RedisStore
from tests.helpers import OffLoopProbe


def _big_file(lines: int) -> bytes:
    body = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 4}
    return "\n".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for i in range(lines)
    ).encode()


async def test_a_big_upload_leaves_the_loop_free(
    state: RedisStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _big_file(5_000)  # ~1.6 MB
    loop = asyncio.get_running_loop()
    validate = OffLoopProbe(files_module.validate_batch_jsonl, loop)
    monkeypatch.setattr(files_module, "validate_batch_jsonl", validate)
    store = LocalFileStore(tmp_path)
    write = OffLoopProbe(store.put, loop)
    monkeypatch.setattr(store, "put", write)
    files = FileService(state, store, max_bytes=64 << 20, max_lines=50_000)

    file = await files.upload("acme", filename="big.jsonl", purpose="batch", data=data)

    assert file.bytes == len(data)
    validate.assert_off_loop()
    write.assert_off_loop()
    assert await files.content("acme", file.id) == data

"""Tenants' LoRA adapters in the Batch API (issue 14).

* On the real worker over real Redis (no pools): an item naming another tenant's adapter is
  refused at creation, and items whose adapter was deleted after the batch was created fail
  with model_not_found when the worker reaches them (not a crash, not a retry loop).
* Through the cluster: a batch of adapter items completes with the adapter's own answers.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from services.inference.protocol.batches import BatchObject, CreateBatchRequest
from services.tenancy.adapters import AdapterRecord, AdapterRegistry, new_record
from tests.adapter_helpers import BASE, MAX_TOKENS, PROMPT, chat_text, client, new_tenant, register
from tests.batch.harness import Worker, add_tenant, build_worker, running, worker_settings
from tests.batch.test_batch_e2e import output_lines, wait_final
from tests.conftest import UNIT_DB, Cluster, LocalRedis


def _lines(models: list[str], *, url: str = "/v1/chat/completions") -> bytes:
    lines = []
    for i, model in enumerate(models):
        if url == "/v1/chat/completions":
            body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
        else:
            body = {"model": model, "prompt": PROMPT}
        body.update(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}))
    return ("\n".join(lines) + "\n").encode()


async def _final(worker: Worker, tenant_id: str, batch_id: str, timeout_s: float) -> BatchObject:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = await worker.batches.get(tenant_id, batch_id)
        if batch.status.final:
            return batch
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not final within {timeout_s} s")


async def test_items_whose_adapter_was_deleted_fail_with_model_not_found(
    state: Any, redis_server: LocalRedis, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}"
    # No record cache: the worker reads the registry as it reaches each item.
    settings = worker_settings(url, tmp_path / "files", adapter_cache_ttl_s=0)
    theirs = (await AdapterRegistry(state).register(_record("other"), max_adapters=8)).id
    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        worker = build_worker(settings)
        await add_tenant(worker, "owner")
        registry = worker.core.adapters
        mine = (await registry.register(_record("owner"), max_adapters=8)).id
        upload = await worker.files.upload(
            "owner", filename="in.jsonl", purpose="batch", data=_lines([mine, theirs, mine], url=endpoint)
        )
        batch = await worker.batches.create(
            "owner", CreateBatchRequest(input_file_id=upload.id, endpoint=endpoint)
        )
        # Its own adapter's items were queued (the other tenant's was refused already).
        assert batch.status.value == "in_progress" and batch.request_counts.failed == 1
        await registry.delete("owner", "ft1")
        async with running(worker):  # closes the worker's Redis clients at the end
            done = await _final(worker, "owner", batch.id, timeout_s=20)
            errors = await worker.files.content("owner", done.error_file_id or "")
        assert done.status.value == "completed" and done.request_counts.failed == 3, done
        lines = [json.loads(line) for line in errors.decode().splitlines() if line]
        assert sorted(line["custom_id"] for line in lines) == ["req-0", "req-1", "req-2"]
        for line in lines:
            assert line["response"]["status_code"] == 404
            assert line["error"]["code"] == "model_not_found"


def _record(tenant_id: str) -> AdapterRecord:
    return new_record(tenant_id, "ft1", base_model=BASE, path="/nowhere", rank=8, target_modules=["o_proj"])


def test_a_batch_of_adapter_items_completes_with_the_adapters_answers(
    cluster: Cluster, admin: httpx.Client
) -> None:
    tenant_id, key = new_tenant(admin)
    model = register(admin, tenant_id, "batched", "tiny/phi-3.5-mini-2")
    with client(cluster, key) as http:
        adapter_text, base_text = chat_text(http, model), chat_text(http, BASE)
    sdk = OpenAI(base_url=cluster.base_url, api_key=key, max_retries=0, timeout=120)
    try:
        upload = sdk.files.create(
            file=("in.jsonl", io.BytesIO(_lines([model, BASE, model]))), purpose="batch"
        )
        batch = sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_final(sdk, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 3, done
        answers = {
            line["custom_id"]: line["response"]["body"] for line in output_lines(sdk, done.output_file_id)
        }
    finally:
        sdk.close()
    assert answers["req-0"]["model"] == answers["req-2"]["model"] == model
    assert [answers[f"req-{i}"]["choices"][0]["message"]["content"] for i in range(3)] == [
        adapter_text,
        base_text,
        adapter_text,
    ]

"""The Batch API through the real cluster with the official openai SDK."""

from __future__ import annotations

import io
import json
import time
import uuid

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import ADMIN_KEY, Cluster, wait_until

FINAL = {"completed", "failed", "cancelled", "expired"}


def batch_file(
    n: int, *, model: str = "phi-3.5-mini", max_tokens: int = 8, url: str = "/v1/chat/completions"
) -> bytes:
    lines = []
    for i in range(n):
        if url == "/v1/chat/completions":
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"item {i}"}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
            }
        else:
            body = {"model": model, "prompt": f"item {i}", "max_tokens": max_tokens, "ignore_eos": True}
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}))
    return ("\n".join(lines) + "\n").encode()


def wait_final(client: OpenAI, batch_id: str, timeout_s: float = 240):  # type: ignore[no-untyped-def]
    return wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in FINAL and b,
        timeout_s=timeout_s,
        interval_s=0.5,
        what=f"batch {batch_id} final",
    )


def output_lines(client: OpenAI, file_id: str | None) -> list[dict]:  # type: ignore[type-arg]
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def assert_exactly_once(client: OpenAI, batch, n: int) -> tuple[list[dict], list[dict]]:  # type: ignore[no-untyped-def,type-arg]
    ok = output_lines(client, batch.output_file_id)
    bad = output_lines(client, batch.error_file_id)
    ids = [line["custom_id"] for line in ok + bad]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(n)), "each input line exactly once"
    assert batch.request_counts.total == n
    assert batch.request_counts.completed == len(ok) and batch.request_counts.failed == len(bad)
    return ok, bad


def test_batch_round_trip_with_the_sdk(openai_client: OpenAI) -> None:
    upload = openai_client.files.create(file=("in.jsonl", io.BytesIO(batch_file(12))), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0
    batch = openai_client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "t1"},
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "t1"}
    done = wait_final(openai_client, batch.id)
    assert done.status == "completed"
    ok, bad = assert_exactly_once(openai_client, done, 12)
    assert not bad
    body = ok[0]["response"]["body"]
    assert ok[0]["response"]["status_code"] == 200
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 8
    listed = openai_client.batches.list(limit=100)
    assert done.id in [b.id for b in listed.data]
    # Batch usage counts against the tenant like any other request.
    assert openai_client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_completions_batch_and_unknown_model_lines(openai_client: OpenAI) -> None:
    lines = batch_file(4, url="/v1/completions").decode().splitlines()
    bad = json.loads(lines[2])
    bad["body"]["model"] = "no-such-model"
    lines[2] = json.dumps(bad)
    upload = openai_client.files.create(
        file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = wait_final(openai_client, batch.id)
    ok, errors = assert_exactly_once(openai_client, done, 4)
    assert len(ok) == 3 and len(errors) == 1
    assert errors[0]["custom_id"] == "req-2" and errors[0]["error"]["code"] == "model_not_found"
    assert ok[0]["response"]["body"]["object"] == "text_completion"


def test_invalid_item_bodies_go_to_the_error_file(openai_client: OpenAI) -> None:
    lines = batch_file(3).decode().splitlines()
    broken = json.loads(lines[1])
    broken["body"]["temperature"] = 9
    lines[1] = json.dumps(broken)
    upload = openai_client.files.create(
        file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_final(openai_client, batch.id)
    _, errors = assert_exactly_once(openai_client, done, 3)
    assert [e["custom_id"] for e in errors] == ["req-1"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"custom_id": "a", "method": "POST"\n', "line 1: not valid JSON"),
        (batch_file(1) + batch_file(1), "appears twice"),
        (batch_file(1, url="/v1/embeddings"), "url must be one of"),
    ],
)
def test_bad_uploads_are_400(openai_client: OpenAI, content: bytes, fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    assert fragment in info.value.message


def test_wrong_endpoint_and_oversized_file(
    openai_client: OpenAI, cluster: Cluster, http: httpx.Client
) -> None:
    upload = openai_client.files.create(file=("in.jsonl", io.BytesIO(batch_file(2))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        openai_client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        openai_client.batches.create(
            input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
        )  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    huge = b"x" * (cluster.settings.max_batch_file_bytes + 200_000)
    resp = http.post("/v1/files", files={"file": ("big.jsonl", huge)}, data={"purpose": "batch"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    resp = http.post("/v1/files", files={"file": ("a.jsonl", batch_file(1))}, data={"purpose": "fine-tune"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "purpose"


def test_tenants_cannot_see_each_others_files_or_batches(cluster: Cluster, openai_client: OpenAI) -> None:
    admin = httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    other_id = f"t-{uuid.uuid4().hex[:8]}"
    assert admin.post("/admin/tenants", json={"id": other_id}).status_code == 201
    other_key = admin.post(f"/admin/tenants/{other_id}/keys", json={}).json()["key"]
    other = OpenAI(base_url=cluster.base_url, api_key=other_key, max_retries=0)
    upload = openai_client.files.create(file=("in.jsonl", io.BytesIO(batch_file(2))), purpose="batch")
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: other.files.retrieve(upload.id),
        lambda: other.files.content(upload.id),
        lambda: other.files.delete(upload.id),
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in other.batches.list().data]
    assert upload.id not in [f.id for f in other.files.list().data]
    wait_final(openai_client, batch.id)
    admin.close()


def test_cancel_stops_new_items(openai_client: OpenAI) -> None:
    upload = openai_client.files.create(
        file=("in.jsonl", io.BytesIO(batch_file(60, max_tokens=200))), purpose="batch"
    )
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    time.sleep(0.5)
    cancelling = openai_client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done = wait_final(openai_client, batch.id)
    assert done.status == "cancelled"
    ok, errors = assert_exactly_once(openai_client, done, 60)
    assert any(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert len(ok) < 60
    with pytest.raises(openai.BadRequestError):
        openai_client.batches.cancel(batch.id)


def test_metadata_is_bounded_and_results_leave_redis(openai_client: OpenAI, cluster: Cluster) -> None:
    # Issue 9, item 2: metadata is stored in Redis with the batch (OpenAI's bounds), and a
    # finished batch's results move from Redis into its files.
    import redis

    from services.redis_store import keys

    upload = openai_client.files.create(file=("in.jsonl", io.BytesIO(batch_file(3))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"k": "v" * 513},
        )
    assert info.value.status_code == 400 and info.value.body["param"] == "metadata"  # type: ignore[index]
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_final(openai_client, batch.id)
    assert done.status == "completed"
    ok, _ = assert_exactly_once(openai_client, done, 3)
    assert len(ok) == 3
    client = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
    assert client.exists(keys.batch_results(batch.id)) == 0
    assert 0 < client.ttl(keys.batch_record(batch.id)) <= cluster.settings.batch_retention_s
    assert client.hlen(keys.tenant_active_batches("demo")) == len(
        [b for b in openai_client.batches.list(limit=100).data if b.status not in FINAL]
    )

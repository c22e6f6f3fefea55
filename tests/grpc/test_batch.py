"""The Batch API over gRPC against the real cluster: upload, create, poll, read the output,
cancel; the REST API's validation, tenant isolation and error table."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import httpx
import pytest

from services.grpc.client import AsyncClient, Client, PhiserveRpcError
from services.grpc.gen.phiserve.v1 import batch_pb2
from tests.conftest import DEMO_KEY, Cluster
from tests.grpc.conftest import grpc_target, new_tenant

Code = grpc.StatusCode
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def batch_file(n: int, *, url: str = CHAT, max_tokens: int = 8, model: str = "phi-3.5-mini") -> bytes:
    lines = []
    for i in range(n):
        if url == CHAT:
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


def jsonl(data: bytes) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in data.decode().splitlines() if line]


def _fails(call, *args, **kwargs) -> PhiserveRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(PhiserveRpcError) as info:
        call(*args, **kwargs)
    assert info.value.request_id and "Traceback" not in info.value.message
    return info.value


@dataclass(frozen=True)
class Finished:
    input: batch_pb2.File
    created: batch_pb2.Batch
    done: batch_pb2.Batch


N_ITEMS = 6


@pytest.fixture(scope="module")
def finished(grpc_client: Client) -> Finished:
    """One chat batch run to completion over gRPC (shared by the tests below)."""
    upload = grpc_client.upload_file(batch_file(N_ITEMS), filename="in.jsonl")
    created = grpc_client.create_batch(upload.id, CHAT, metadata={"job": "grpc-t1"})
    done = grpc_client.wait_batch(created.id, poll_s=0.5, wait_s=120)
    return Finished(upload, created, done)


def test_batch_round_trip(grpc_client: Client, finished: Finished, http: httpx.Client) -> None:
    upload, created, done = finished.input, finished.created, finished.done
    assert upload.id.startswith("file-") and upload.purpose == "batch" and upload.status == "processed"
    assert (
        upload.filename == "in.jsonl" and upload.bytes == len(batch_file(N_ITEMS)) and upload.created_at > 0
    )
    assert grpc_client.file_content(upload.id) == batch_file(N_ITEMS)

    assert created.id.startswith("batch_") and created.endpoint == CHAT and created.completion_window == "24h"
    assert created.status == batch_pb2.BATCH_STATUS_IN_PROGRESS
    assert created.input_file_id == upload.id and dict(created.metadata) == {"job": "grpc-t1"}
    assert created.request_counts.total == N_ITEMS
    assert created.expires_at == created.created_at + 24 * 3600
    assert not created.HasField("output_file_id") and not created.HasField("completed_at")

    assert done.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert (
        done.HasField("completed_at") and done.HasField("finalizing_at") and not done.HasField("cancelled_at")
    )
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (N_ITEMS, N_ITEMS, 0)
    assert done.HasField("output_file_id") and not done.HasField("error_file_id")
    output = jsonl(grpc_client.file_content(done.output_file_id))
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(N_ITEMS))
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 8
    meta = grpc_client.get_file(done.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes == len(grpc_client.file_content(done.output_file_id))
    assert grpc_client.get_batch(done.id) == done
    # One store behind both APIs: REST sees the same batch and files.
    rest = http.get(f"/v1/batches/{done.id}").json()
    assert rest["status"] == "completed" and rest["output_file_id"] == done.output_file_id
    assert rest["request_counts"] == {"total": N_ITEMS, "completed": N_ITEMS, "failed": 0}
    assert rest["metadata"] == {"job": "grpc-t1"} and rest["completed_at"] == done.completed_at
    assert http.get(f"/v1/files/{done.output_file_id}/content").content == grpc_client.file_content(
        done.output_file_id
    )


def test_list_batches_pages(grpc_client: Client, finished: Finished) -> None:
    second = grpc_client.create_batch(finished.input.id, CHAT)
    try:
        first_page = grpc_client.list_batches(limit=1)
        assert len(first_page.batches) == 1 and first_page.has_more
        assert first_page.first_id == first_page.last_id == first_page.batches[0].id
        next_page = grpc_client.list_batches(after=first_page.last_id, limit=99)
        paged = [b.id for b in first_page.batches] + [b.id for b in next_page.batches]
        # Newest first (by created_at, in seconds), every batch once, the same as one big page.
        assert {finished.done.id, second.id} <= set(paged) and len(paged) == len(set(paged))
        assert paged == [b.id for b in grpc_client.list_batches(limit=100).batches]
        created = [b.created_at for b in grpc_client.list_batches(limit=100).batches]
        assert created == sorted(created, reverse=True)
        assert len(grpc_client.list_batches().batches) == min(20, len(paged))  # default page: 20
        bad = _fails(grpc_client.list_batches, limit=101)
        assert bad.code == Code.INVALID_ARGUMENT and bad.field == "limit"
        unknown = _fails(grpc_client.list_batches, after="batch_nope")
        assert unknown.code == Code.INVALID_ARGUMENT and unknown.field == "after"
    finally:
        # Leave the engine idle for the tests that count its requests (test_cancellation).
        assert (
            grpc_client.wait_batch(second.id, poll_s=0.5, wait_s=120).status
            == batch_pb2.BATCH_STATUS_COMPLETED
        )


def test_cancel_of_a_finished_batch_is_invalid(grpc_client: Client, finished: Finished) -> None:
    err = _fails(grpc_client.cancel_batch, finished.done.id)
    assert err.code == Code.INVALID_ARGUMENT and err.field == "batch_id" and "completed" in err.message


def test_malformed_file_is_refused_naming_the_line(grpc_client: Client) -> None:
    lines = batch_file(3).decode().splitlines()
    lines[1] = lines[1][:-5]  # line 2 is cut short
    err = _fails(grpc_client.upload_file, "\n".join(lines).encode())
    assert err.code == Code.INVALID_ARGUMENT and err.error_code == "invalid_request"
    assert "line 2: not valid JSON" in err.message and "line 1" not in err.message
    assert err.field == "data" and err.param == "file"  # the proto field; REST's param
    twice = _fails(grpc_client.upload_file, batch_file(1) + batch_file(1))
    assert twice.code == Code.INVALID_ARGUMENT and "line 2: custom_id 'req-0' appears twice" in twice.message
    for content, fragment in (
        (b"", "no lines"),
        (batch_file(1, url="/v1/embeddings"), "line 1: url must be"),
    ):
        refused = _fails(grpc_client.upload_file, content)
        assert refused.code == Code.INVALID_ARGUMENT and fragment in refused.message
    purpose = _fails(grpc_client.upload_file, batch_file(1), purpose="fine-tune")
    assert purpose.code == Code.INVALID_ARGUMENT and purpose.field == "purpose"


def test_create_batch_is_validated_as_rest(grpc_client: Client, finished: Finished) -> None:
    chat_file = finished.input.id
    for endpoint in ("/v1/embeddings", COMPLETIONS, ""):  # unknown; not the lines' url; unset
        err = _fails(grpc_client.create_batch, chat_file, endpoint)
        assert err.code == Code.INVALID_ARGUMENT and err.field == "endpoint", endpoint
    window = _fails(grpc_client.create_batch, chat_file, CHAT, completion_window="1h")
    assert window.code == Code.INVALID_ARGUMENT and window.field == "completion_window"
    metadata = _fails(grpc_client.create_batch, chat_file, CHAT, metadata={f"k{i}": "v" for i in range(17)})
    assert metadata.code == Code.INVALID_ARGUMENT and metadata.field == "metadata"
    missing = _fails(grpc_client.create_batch, "file-nope", CHAT)
    assert missing.code == Code.NOT_FOUND and missing.param == "file_id"
    output = _fails(grpc_client.create_batch, finished.done.output_file_id, CHAT)  # not purpose=batch
    assert output.code == Code.INVALID_ARGUMENT and output.field == "input_file_id"
    no_key = Client(channel=grpc_client._channel, timeout_s=30)
    assert _fails(no_key.get_batch, finished.done.id).code == Code.UNAUTHENTICATED
    assert _fails(no_key.upload_file, batch_file(1)).code == Code.UNAUTHENTICATED


def test_another_tenant_gets_not_found(
    grpc_channel: grpc.Channel, admin: httpx.Client, finished: Finished
) -> None:
    _, key = new_tenant(admin)
    other = Client(api_key=key, channel=grpc_channel, timeout_s=60)
    done = finished.done
    for call, arg in (
        (other.get_batch, done.id),
        (other.cancel_batch, done.id),
        (other.get_file, finished.input.id),
        (other.file_content, finished.input.id),
        (other.file_content, done.output_file_id),
        (other.create_batch, finished.input.id),
    ):
        err = _fails(call, arg)
        assert err.code == Code.NOT_FOUND and err.error_code == "not_found", call.__name__
    assert other.list_batches().batches == []
    # The same ids as a missing one: nothing tells the other tenant they exist.
    assert _fails(other.get_batch, "batch_nope").message == "No such Batch object: batch_nope"
    assert _fails(other.get_batch, done.id).message == f"No such Batch object: {done.id}"


def test_upload_over_the_message_size_is_resource_exhausted(grpc_client: Client, cluster: Cluster) -> None:
    huge = b"x" * (cluster.settings.max_request_body_bytes + 1)
    with pytest.raises(PhiserveRpcError) as info:  # refused by gRPC itself, before the servicer
        grpc_client.upload_file(huge)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    # The channel and the server are fine afterwards.
    assert grpc_client.upload_file(batch_file(1)).bytes == len(batch_file(1))


async def test_async_client_batch_cancel(cluster: Cluster) -> None:
    async with AsyncClient(grpc_target(cluster), api_key=DEMO_KEY, timeout_s=60) as client:
        upload = await client.upload_file(batch_file(32, url=COMPLETIONS, max_tokens=64), filename="c.jsonl")
        created = await client.create_batch(upload.id, COMPLETIONS)
        cancelling = await client.cancel_batch(created.id)
        assert cancelling.status == batch_pb2.BATCH_STATUS_CANCELLING and cancelling.HasField("cancelling_at")
        assert (await client.get_batch(created.id)).status in (
            batch_pb2.BATCH_STATUS_CANCELLING,
            batch_pb2.BATCH_STATUS_FINALIZING,
            batch_pb2.BATCH_STATUS_CANCELLED,
        )
        done = await client.wait_batch(created.id, poll_s=0.5, wait_s=120)
        assert done.status == batch_pb2.BATCH_STATUS_CANCELLED and done.HasField("cancelled_at")
        ok = jsonl(await client.file_content(done.output_file_id)) if done.HasField("output_file_id") else []
        failed = (
            jsonl(await client.file_content(done.error_file_id)) if done.HasField("error_file_id") else []
        )
        assert sorted(line["custom_id"] for line in ok + failed) == sorted(f"req-{i}" for i in range(32))
        assert (done.request_counts.completed, done.request_counts.failed) == (len(ok), len(failed))
        assert all(line["response"]["body"]["object"] == "text_completion" for line in ok)
        assert all(line["error"]["code"] == "batch_cancelled" for line in failed)
        assert created.id in [b.id for b in (await client.list_batches(limit=100)).batches]
        with pytest.raises(PhiserveRpcError) as info:
            await client.cancel_batch(created.id)
        assert info.value.code == Code.INVALID_ARGUMENT

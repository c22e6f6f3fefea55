"""Crash safety: a killed worker, a restarted Redis, a killed gateway replica. Every input line
ends exactly once in the output or error file, and the batch completes."""

from __future__ import annotations

import io
import os
import signal

import psutil
from openai import OpenAI
from ray import serve

from services.app import APP_NAME, BATCH_DEPLOYMENT
from tests.batch.test_batch_e2e import assert_exactly_once, batch_file, wait_final
from tests.conftest import Cluster, wait_until

ITEMS = 60


def _start_batch(client: OpenAI) -> str:
    upload = client.files.create(
        file=("in.jsonl", io.BytesIO(batch_file(ITEMS, max_tokens=120))), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def _wait_partly_done(client: OpenAI, batch_id: str, at_least: int = 5) -> None:
    wait_until(
        lambda: client.batches.retrieve(batch_id).request_counts.completed >= at_least,
        timeout_s=120,
        interval_s=0.2,
        what="batch under way",
    )
    assert client.batches.retrieve(batch_id).status == "in_progress", "the batch ended before the crash"


def _finish(client: OpenAI, batch_id: str) -> None:
    done = wait_final(client, batch_id, timeout_s=300)
    assert done.status == "completed"
    ok, errors = assert_exactly_once(client, done, ITEMS)
    assert not errors, errors[:2]
    assert all(line["response"]["body"]["usage"]["completion_tokens"] == 120 for line in ok)


def test_worker_killed_mid_batch(openai_client: OpenAI) -> None:
    batch_id = _start_batch(openai_client)
    _wait_partly_done(openai_client, batch_id)
    worker = serve.get_deployment_handle(BATCH_DEPLOYMENT, app_name=APP_NAME)
    diag = worker.diagnostics.remote().result(timeout_s=30)
    assert diag["in_flight"] > 0
    os.kill(diag["pid"], signal.SIGKILL)
    _finish(openai_client, batch_id)
    assert worker.diagnostics.remote().result(timeout_s=60)["pid"] != diag["pid"]


def test_redis_restarted_mid_batch(openai_client: OpenAI, cluster: Cluster) -> None:
    batch_id = _start_batch(openai_client)
    _wait_partly_done(openai_client, batch_id)
    cluster.redis.stop()
    cluster.redis.start()  # AOF: batches, items, results and consumer groups come back
    _finish(openai_client, batch_id)


def test_gateway_replica_killed_mid_batch(openai_client: OpenAI) -> None:
    batch_id = _start_batch(openai_client)
    _wait_partly_done(openai_client, batch_id)
    # Only this test session's cluster: its Ray processes descend from this process.
    gateways = [
        p
        for p in psutil.Process().children(recursive=True)
        if any("ServeReplica:phiserve:gateway" in part for part in (p.cmdline() or []))
    ]
    assert gateways, "no gateway replica process found"
    gateways[0].kill()
    _finish(openai_client, batch_id)

"""`phiserve status` against the real session cluster (issue 9, item 9): pools and their
replicas from Serve, queue depth from the fair queue in Redis, and batch progress."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading

import httpx
import pytest
import ray
from openai import OpenAI

from services.cli import main
from services.status import ClusterStatus, cluster_status
from tests.batch.test_batch_e2e import FINAL, batch_file
from tests.conftest import AUTH, REPO, Cluster, wait_until

BATCH_LINES = 40
STREAMS = 3


def _long_stream(url: str, done: threading.Event) -> None:
    body = {
        "model": "phi-3.5-mini",
        "messages": [{"role": "user", "content": "Write a very long story"}],
        "max_tokens": 1800,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(base_url=url, headers=AUTH, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        for _ in resp.iter_lines():
            if done.is_set():
                return


def _status(cluster: Cluster) -> ClusterStatus:
    return asyncio.run(cluster_status(cluster.settings, cluster.catalog))


def test_status_shows_pools_replicas_queue_depth_and_batch_progress(
    cluster: Cluster, openai_client: OpenAI
) -> None:
    upload = openai_client.files.create(
        file=("in.jsonl", io.BytesIO(batch_file(BATCH_LINES, max_tokens=200))), purpose="batch"
    )
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = threading.Event()
    streams = [
        threading.Thread(target=_long_stream, args=(cluster.url, done), daemon=True) for _ in range(STREAMS)
    ]
    for thread in streams:
        thread.start()
    try:

        def text_busy():  # type: ignore[no-untyped-def]
            status = _status(cluster)
            text = next(p for p in status.pools if p.name == "text")
            return status if text.in_flight > 0 else None

        report = wait_until(
            text_busy, timeout_s=60, interval_s=0.2, what="a generation in flight in the status"
        )
        # Served from the function `phiserve status` calls, and from the command itself.
        cli = subprocess.run(
            [sys.executable, "-m", "services.cli", "status"],
            env={
                **os.environ,
                "PHISERVE_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                "PHISERVE_REDIS_URL": cluster.settings.redis_url,
                "RAY_AUTH_MODE": "token",  # the session cluster's, as for any driver
            },
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,  # the assertion below reports stdout and stderr
        )
    finally:
        done.set()
        openai_client.batches.cancel(batch.id)  # the rest of the suite needs the pools
    assert report.app_status == "RUNNING"
    by_name = {p.name: p for p in report.pools}
    assert set(by_name) == {pool.name for pool in cluster.catalog.enabled_pools}
    for pool in report.pools:
        assert pool.deployment_status == "HEALTHY" and pool.replicas.get("RUNNING", 0) >= 1, pool
        assert pool.in_flight >= 0 and pool.waiting >= 0
    assert by_name["text"].in_flight >= 1
    assert report.other_deployments["gateway"].get("RUNNING") == cluster.settings.gateway_replicas
    (progress,) = [b for b in report.batches if b.id == batch.id]
    assert progress.total == BATCH_LINES and progress.completed + progress.failed <= BATCH_LINES
    assert progress.status in ("in_progress", "finalizing")

    assert cli.returncode == 0, cli.stdout + cli.stderr
    out = cli.stdout
    assert "application: RUNNING" in out
    for pool in cluster.catalog.enabled_pools:
        assert f"  {pool.name}: healthy, replicas " in out and "running" in out
    assert "queue: " in out and " in flight, " in out
    assert f"gateway: replicas {cluster.settings.gateway_replicas} running" in out
    assert batch.id in out or openai_client.batches.retrieve(batch.id).status in FINAL


@pytest.mark.parametrize(
    ("argv", "ray_address", "message"),
    [
        (["up", "--nodes", "0"], None, "--nodes must be 1 or more"),
        (["up", "--nodes", "2"], "10.0.0.1:6379", "unset PHISERVE_RAY_ADDRESS"),
    ],
)
def test_up_refuses_nodes_it_cannot_start(
    argv: list[str], ray_address: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before anything starts (no Redis, no Ray, no model build)."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # main() sets it for a local cluster
    if ray_address is None:
        monkeypatch.delenv("PHISERVE_RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("PHISERVE_RAY_ADDRESS", ray_address)
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert message in str(refused.value)

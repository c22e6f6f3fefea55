"""A dead engine gives 503 + Retry-After (never 500), and Serve replaces the replica.

Runs last in the suite (it takes a pool down for ~a minute).
"""

from __future__ import annotations

import os
import signal

import httpx

from tests.conftest import AUTH, Cluster, wait_until
from tests.helpers import pool_diagnostics


def test_killed_engine_gives_503_then_replica_is_replaced(cluster: Cluster) -> None:
    body = {"model": "phi-3.5-moe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    url = f"{cluster.base_url}/chat/completions"
    assert httpx.post(url, json=body, timeout=60, headers=AUTH).status_code == 200

    before = pool_diagnostics("moe")
    assert before["engine_pids"], "the replica should run its engine core in a child process"
    for pid in before["engine_pids"]:
        os.kill(pid, signal.SIGKILL)

    statuses: list[int] = []

    def served_again() -> bool:
        resp = httpx.post(url, json=body, timeout=60, headers=AUTH)
        statuses.append(resp.status_code)
        if resp.status_code == 503:
            assert resp.headers.get("retry-after"), resp.headers
            assert resp.json()["error"]["type"] == "service_unavailable_error"
        else:
            assert resp.status_code == 200, resp.text
        return resp.status_code == 200

    wait_until(served_again, timeout_s=240, interval_s=1.0, what="moe pool served again")
    assert 503 in statuses, statuses
    assert set(statuses) <= {200, 503}
    after = pool_diagnostics("moe")
    assert after["pid"] != before["pid"], "Serve should have started a new replica"
    # The other pools never noticed.
    text = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url, json=text, timeout=60, headers=AUTH).status_code == 200
    wait_until(
        lambda: httpx.get(f"{cluster.url}/ready", timeout=10).status_code == 200,
        timeout_s=60,
        what="ready again",
    )

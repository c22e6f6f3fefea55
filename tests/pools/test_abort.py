"""A client that goes away mid-stream aborts the engine request (verified on the engine)."""

from __future__ import annotations

import httpx

from tests.conftest import AUTH, Cluster, wait_until
from tests.helpers import pool_diagnostics

# 2000 tokens are beyond the short pool's context: phi-3.5-mini runs them on its long pool.
LONG_POOL = "text-long"


def test_disconnect_mid_stream_aborts_engine_request(cluster: Cluster) -> None:
    body = {
        "model": "phi-3.5-mini",
        "messages": [{"role": "user", "content": "Write a very long story"}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    assert pool_diagnostics(LONG_POOL)["num_unfinished"] == 0
    with httpx.stream(
        "POST", f"{cluster.base_url}/chat/completions", json=body, timeout=60, headers=AUTH
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        received = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or line == "" for line in received)
        # The request is running in the engine while we hold the stream open.
        assert pool_diagnostics(LONG_POOL)["num_unfinished"] == 1
    # Leaving the block closes the connection long before 2000 tokens are done.
    wait_until(
        lambda: pool_diagnostics(LONG_POOL)["num_unfinished"] == 0,
        timeout_s=20,
        interval_s=0.2,
        what="engine request aborted after disconnect",
    )


def test_client_timeout_on_unary_request_aborts_engine_request(cluster: Cluster) -> None:
    body = {
        "model": "phi-3.5-mini",
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "ignore_eos": True,
    }
    # A few requests first, so that HAProxy has open connections to the gateway replicas: a
    # shared one hid the disconnect from the replica and the generation ran to its end.
    for _ in range(4):
        small = {"model": "phi-3.5-mini", "prompt": "Hi", "max_tokens": 2}
        assert (
            httpx.post(f"{cluster.base_url}/completions", json=small, timeout=60, headers=AUTH).status_code
            == 200
        )
    try:
        httpx.post(f"{cluster.base_url}/completions", json=body, timeout=1.0, headers=AUTH)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError("2000 tokens finished within 1 s; the test needs a longer generation")
    wait_until(
        lambda: pool_diagnostics(LONG_POOL)["num_unfinished"] == 0,
        timeout_s=20,
        interval_s=0.2,
        what="engine request aborted after client timeout",
    )

"""A deadline that passes or a client that leaves mid-call aborts the engine request
(verified on the engine), frees the tenant's concurrency slot and settles its tokens."""

from __future__ import annotations

import time

import grpc
import httpx

from services.grpc.client import Client, PhiserveRpcError, user
from tests.conftest import wait_until
from tests.grpc.conftest import new_tenant, usage_of
from tests.helpers import pool_diagnostics

# As long as the tiny model's 2048-token context allows: even a quiet 2-core machine
# (~1,200 tokens/s for one stream) needs well over a second for it.
LONG = {"max_tokens": 2000, "ignore_eos": True}
# 2000 tokens are beyond the short pool's context: phi-3.5-mini runs them on its long pool.
LONG_POOL = "text-long"


def _engine_idle() -> None:
    wait_until(
        lambda: pool_diagnostics(LONG_POOL)["num_unfinished"] == 0,
        timeout_s=20,
        interval_s=0.2,
        what="engine request aborted",
    )


def test_deadline_mid_stream_aborts_engine_and_frees_the_slot(
    grpc_channel: grpc.Channel, admin: httpx.Client
) -> None:
    tenant_id, key = new_tenant(admin, limits={"max_concurrent": 1})
    client = Client(api_key=key, channel=grpc_channel)
    assert pool_diagnostics(LONG_POOL)["num_unfinished"] == 0
    stream = client.chat_stream("phi-3.5-mini", [user("Write a very long story")], timeout_s=1.2, **LONG)
    received = [next(stream) for _ in range(3)]
    assert received[0].choices[0].delta.role
    # Running in the engine, holding the tenant's one slot.
    assert pool_diagnostics(LONG_POOL)["num_unfinished"] == 1
    try:
        client.chat("phi-3.5-mini", [user("hi")], max_tokens=2, timeout_s=30)
    except PhiserveRpcError as busy:
        assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in busy.message
    else:
        raise AssertionError("a second request got the tenant's only slot")
    try:
        for _ in stream:
            pass
    except PhiserveRpcError as expired:
        assert expired.code == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        raise AssertionError("2000 tokens finished within the deadline; the test needs a longer generation")
    _engine_idle()
    # The slot is free again, and the cut stream was settled to what it generated.
    wait_until(
        lambda: (
            client.chat("phi-3.5-mini", [user("hi")], max_tokens=2, timeout_s=30).usage.completion_tokens >= 1
        ),
        timeout_s=20,
        what="slot freed",
    )
    used = usage_of(admin, tenant_id)
    assert used["requests"] == 2
    assert 2 < used["completion_tokens"] < 2000


def test_client_cancel_mid_stream_aborts_engine(grpc_client: Client) -> None:
    stream = grpc_client.chat_stream("phi-3.5-mini", [user("Write a very long story")], **LONG)
    for _ in range(3):
        next(stream)
    assert pool_diagnostics(LONG_POOL)["num_unfinished"] == 1
    stream.close()  # leaving the loop cancels the call
    _engine_idle()


def test_deadline_on_a_unary_call_aborts_engine_and_settles(
    grpc_channel: grpc.Channel, admin: httpx.Client
) -> None:
    tenant_id, key = new_tenant(admin)
    client = Client(api_key=key, channel=grpc_channel)
    try:
        client.complete("phi-3.5-mini", "Once upon a time", timeout_s=1.0, max_tokens=2000, ignore_eos=True)
    except PhiserveRpcError as expired:
        assert expired.code == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        raise AssertionError("2000 tokens finished within 1 s; the test needs a longer generation")
    expired_at = time.monotonic()
    # Aborted, not left to run to its 2000 tokens (which takes far longer than this).
    wait_until(
        lambda: pool_diagnostics(LONG_POOL)["num_unfinished"] == 0,
        timeout_s=3,
        interval_s=0.1,
        what="engine request aborted promptly after the unary deadline",
    )
    idle_after_s = time.monotonic() - expired_at
    wait_until(lambda: usage_of(admin, tenant_id)["requests"] == 1, timeout_s=10, what="settled")
    # Settled to what the engine generated before the abort.
    assert 0 < usage_of(admin, tenant_id)["completion_tokens"] < 2000, idle_after_s

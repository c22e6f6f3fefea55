"""Shared test helpers: images, pool handles, work kept off the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import uuid
from typing import Any

import httpx


def png_data_url(width: int = 320, height: int = 240) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (30, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 4, height // 4, width // 2, height // 2), fill=(250, 200, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pool_diagnostics(pool_name: str) -> dict:  # type: ignore[type-arg]
    from ray import serve

    from services.app import APP_NAME

    handle = serve.get_deployment_handle(f"pool-{pool_name}", app_name=APP_NAME)
    return handle.diagnostics.remote().result(timeout_s=30)


class OffLoopProbe:
    """Wraps a blocking function to show whether it runs off the event loop.

    Each call, before doing the real work, asks the loop to run a coroutine and waits for
    it. That only succeeds when the call runs on another thread while the loop is free,
    which is what every other request on the replica needs. A call on the loop's own
    thread is recorded instead (waiting there would deadlock). No timing is involved, so
    a fast or slow machine gives the same answer.
    """

    def __init__(self, fn: Any, loop: asyncio.AbstractEventLoop, *, wait_s: float = 30.0) -> None:
        self._fn = fn
        self._loop = loop
        self._wait_s = wait_s
        self._loop_thread = threading.get_ident()  # built on the loop's thread, in the test
        self.calls = 0
        self.calls_on_loop = 0
        self.loop_ran_during_call = 0

    async def _ping(self) -> bool:
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if threading.get_ident() == self._loop_thread:
            self.calls_on_loop += 1
        else:
            ran = asyncio.run_coroutine_threadsafe(self._ping(), self._loop).result(timeout=self._wait_s)
            self.loop_ran_during_call += int(ran)
        return self._fn(*args, **kwargs)

    def assert_off_loop(self) -> None:
        assert self.calls > 0, "the wrapped work never ran"
        assert self.calls_on_loop == 0, f"{self.calls_on_loop} of {self.calls} calls ran on the event loop"
        assert self.loop_ran_during_call == self.calls


def real_gate(
    state: Any,
    capacity: dict[str, int],
    metrics: Any,
    *,
    counter: Any = None,
    lease_ttl_s: float = 30,
    queue_timeout_s: float = 5,
) -> Any:
    """The real tenant gate on the test's Redis (admission, fair queue, lease keeper), no Ray."""
    from services.inference.gate import LeaseKeeper, TenantGate
    from services.inference.tokens import TokenCounter
    from services.tenancy.admission import Admission
    from services.tenancy.entry import TenancySteps
    from services.tenancy.fair_queue import FairQueue
    from services.tenancy.store import TenantStore

    admission = Admission(state, lease_ttl_s=lease_ttl_s)
    fair_queue = FairQueue(state, capacity, max_waiting=10, lease_ttl_s=lease_ttl_s)
    keeper = LeaseKeeper(admission, fair_queue, metrics, pools=list(capacity), interval_s=60)
    return TenantGate(
        TenancySteps(state, admission, fair_queue),
        TenantStore(state),
        counter or TokenCounter({}, {}),
        keeper,
        metrics,
        queue_timeout_s=queue_timeout_s,
    )


def new_tenant(admin: httpx.Client, *, prefix: str = "t", **fields: object) -> tuple[str, str]:
    """Create a tenant and a key through the REST admin API; return (tenant id, key)."""
    tenant_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
    created = admin.post("/admin/tenants", json={"id": tenant_id, **fields})
    assert created.status_code == 201, created.text
    key = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": f"{prefix}-test"})
    assert key.status_code == 201, key.text
    return tenant_id, key.json()["key"]

"""A separate process for the fair-queue tests: a waiter that can be killed -9, and a
gateway whose clock is wrong. Run as `python -m tests.tenancy.fq_child <mode> <redis url> ...`.

Modes:
  waiters <n>        enqueue n tickets of tenant "dead" in pool "p", print "queued", wait
  hold <offset_s>    with this host's clock off by offset_s, take one slot of pool "p", exit
  admit <offset_s>   with the clock off by offset_s, admit tenant "acme" (rpm 3) twice and
                     print "admitted" or the refusal's reason for each
"""

from __future__ import annotations

import asyncio
import sys
import time


def _skew(offset_s: float) -> None:
    # Before anything imports time.time into a default argument.
    real = time.time
    time.time = lambda: real() + offset_s  # type: ignore[assignment]


async def main(mode: str, url: str, arg: str) -> None:
    if mode in ("hold", "admit"):
        _skew(float(arg))
    from services.errors import RateLimited
    from services.redis_store import RedisStore, keys
    from services.tenancy.admission import Admission
    from services.tenancy.fair_queue import FairQueue
    from services.tenancy.models import Tenant, TenantLimits

    state = RedisStore(url)
    fq = FairQueue(state, {"p": 1}, max_waiting=1000, lease_ttl_s=30, **_ticket_ttl())
    if mode == "waiters":
        n = int(arg)
        tasks = [
            asyncio.create_task(fq.acquire("p", tenant_id="dead", cost=1, weight=1, priority=1, timeout_s=99))
            for _ in range(n)
        ]
        while await state.redis.zcard(keys.pool_waiting("p")) < n:
            await asyncio.sleep(0.02)
        print("queued", flush=True)
        await asyncio.gather(*tasks)  # killed -9 long before this returns
    elif mode == "hold":
        await fq.acquire("p", tenant_id="skewed", cost=1, weight=1, priority=1, timeout_s=1)
        print("holding", flush=True)
    elif mode == "admit":
        admission = Admission(state, lease_ttl_s=30)
        tenant = Tenant(id="acme", limits=TenantLimits(rpm=3))
        for _ in range(2):
            try:
                await admission.admit(tenant, 1)
                print("admitted", flush=True)
            except RateLimited as exc:
                print(exc.param, flush=True)
    await state.close()


def _ticket_ttl() -> dict[str, float]:
    return {"ticket_ttl_s": 1.5}  # as tests/tenancy/test_fair_queue_leaving.py


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))

"""Token-weighted fair queueing between tenants, per pool, shared by every gateway replica.

Start-time fair queueing (SFQ) with its state in Redis; each step is one Lua call:

* a pool has a capacity (replicas x max_num_seqs by default) and a zset of in-flight
  grants whose leases expire, so a crashed gateway frees its slots;
* a ticket's score is (priority class, virtual start), virtual start being
  max(pool virtual time, the tenant's last virtual finish), and its finish adds
  cost / weight, where cost = reserved tokens x the model's cost factor;
* `acquire` enqueues and dispatches in one call: an idle pool grants the caller in
  that same round trip; otherwise the caller BLPOPs its grant key until its timeout;
* `release` frees the slot and dispatches the next tickets (pushing their grant keys).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.errors import Overloaded
from services.tenancy import keys
from services.tenancy.redis_state import RedisState

GRANTED, QUEUED, QUEUE_FULL = 1, 0, -1


@dataclass(frozen=True)
class Grant:
    pool: str
    ticket_id: str
    waited_s: float


class FairQueue:
    def __init__(
        self,
        state: RedisState,
        capacities: dict[str, int],
        *,
        max_waiting: int,
        lease_ttl_s: float,
        policy: str = "fair",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._policy = policy
        self._capacities = capacities
        self._max_waiting = max_waiting
        self._lease_ms = int(lease_ttl_s * 1000)
        self._clock = clock

    def _keys(self, pool: str) -> list[str]:
        return [
            keys.pool_in_flight(pool),
            keys.pool_waiting(pool),
            keys.pool_tickets(pool),
            keys.pool_virtual_time(pool),
        ]

    async def acquire(
        self,
        pool: str,
        *,
        tenant_id: str,
        cost: float,
        weight: float,
        priority: int,
        timeout_s: float,
    ) -> Grant:
        started = time.monotonic()
        ticket = secrets.token_hex(8)
        grant_prefix = keys.ticket_grant(pool, "")
        outcome = await self._state.script(
            "fair_queue",
            keys=self._keys(pool),
            args=[
                "acquire",
                int(self._clock() * 1000),
                self._capacities[pool],
                ticket,
                self._lease_ms,
                grant_prefix,
                tenant_id,
                cost,
                weight,
                priority,
                self._max_waiting,
                self._policy,
            ],
        )
        if outcome == QUEUE_FULL:
            raise Overloaded(
                f"pool '{pool}' has {self._max_waiting} requests waiting; retry later",
                param="queue_full",
                retry_after_s=5,
            )
        if outcome == QUEUED:
            granted = await self._state.blpop(keys.ticket_grant(pool, ticket), timeout_s)
            if granted is None:
                # Gave up: leave the queue (or hand back a grant that raced the timeout).
                await self.release(Grant(pool, ticket, time.monotonic() - started))
                await self._state.run(self._state.redis.delete(keys.ticket_grant(pool, ticket)))
                raise Overloaded(
                    f"waited {timeout_s:.0f} s for capacity in pool '{pool}'; retry later",
                    param="queue_timeout",
                    retry_after_s=max(1, int(timeout_s / 2)),
                )
        return Grant(pool, ticket, time.monotonic() - started)

    async def release(self, grant: Grant) -> None:
        await self._state.script(
            "fair_queue",
            keys=self._keys(grant.pool),
            args=[
                "release",
                int(self._clock() * 1000),
                self._capacities[grant.pool],
                grant.ticket_id,
                self._lease_ms,
                keys.ticket_grant(grant.pool, ""),
            ],
        )

    async def renew(self, grants: list[Grant]) -> None:
        expiry = int(self._clock() * 1000) + self._lease_ms
        async with self._state.pipeline() as pipe:
            for g in grants:
                pipe.zadd(keys.pool_in_flight(g.pool), {g.ticket_id: expiry}, xx=True)
            await pipe.execute()

    async def depth(self, pool: str) -> tuple[int, int]:
        """(in flight, waiting) for a pool."""
        async with self._state.pipeline() as pipe:
            pipe.zcard(keys.pool_in_flight(pool))
            pipe.zcard(keys.pool_waiting(pool))
            in_flight, waiting = await pipe.execute()
        return int(in_flight), int(waiting)

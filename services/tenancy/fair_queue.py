"""Token-weighted fair queueing between tenants, per pool, shared by every gateway replica.

Start-time fair queueing (SFQ) with its state in Redis; each step is one Lua call
(`lua/fair_queue.lua`), timed by Redis's own clock:

* a pool has a capacity (live replicas x max_num_seqs by default, kept current by the
  lease keeper) and a zset of in-flight grants whose leases expire, so a crashed
  gateway frees its slots;
* a ticket's score is (priority class, virtual start), virtual start being
  max(pool virtual time, the tenant's last virtual finish), and its finish adds
  cost / weight, where cost = reserved tokens x the model's cost factor;
* `release` of a granted slot corrects the tenant's last finish to the request's actual
  cost (issue 13): uncached prompt + generated tokens + cached prompt tokens x the pool's
  cached_prompt_queue_factor, times the cost factor, so a tenant whose prompts hit its
  prefix cache (or that generates less than it reserved) waits its real share;
* `acquire` enqueues and dispatches in one call: an idle pool grants the caller in
  that same round trip; otherwise the caller waits on its grant key in slices, renewing
  its ticket's own short lease between them;
* `release` frees the slot and dispatches the next tickets; the caller then pushes their
  grant lists (keys the script cannot name before it runs, so it does not touch them).

Leaving the queue (issue 9, item 3). A waiter that stops waiting for any reason (timeout,
cancellation by a client disconnect or gRPC deadline, a Redis error) withdraws its ticket,
shielded from further cancellation, and hands back a grant that raced its exit. A waiter
that cannot (its process was killed) stops renewing: its ticket expires within
`ticket_ttl_s` and the next step drops it, and a grant pushed to it expires as fast
because a grant is only given the full lease once its waiter claims it. Each tenant may
have at most `max_waiting_per_tenant` tickets waiting per pool, so one tenant cannot fill
the waiting room.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from services.errors import Overloaded, RateLimited, ServiceUnavailable
from services.redis_store import RedisStore, Script, keys

logger = logging.getLogger(__name__)

GRANTED, QUEUED, QUEUE_FULL, TENANT_QUEUE_FULL = 1, 0, -1, -2
# `renew` answers per ticket:
TICKET_GONE, TICKET_WAITING, TICKET_GRANTED = 0, 1, 2


@dataclass(frozen=True)
class QueueCharge:
    """What a ticket added to its tenant's virtual finish at acquire: cost / weight."""

    tenant_id: str
    cost: float
    weight: float

    def correction(self, actual_cost: float) -> float:
        """The change to the tenant's last virtual finish that charges `actual_cost` instead."""
        return (actual_cost - self.cost) / self.weight


@dataclass(frozen=True)
class Grant:
    pool: str
    ticket_id: str
    waited_s: float
    # False when Redis failed and the queue was configured to fail open: nothing to release.
    recorded: bool = True
    # What acquire charged, corrected at release to the actual cost (None: no correction).
    charge: QueueCharge | None = None


class FairQueue:
    def __init__(
        self,
        store: RedisStore,
        capacities: dict[str, int],
        *,
        max_waiting: int,
        lease_ttl_s: float,
        ticket_ttl_s: float = 10.0,
        max_waiting_per_tenant: int = 0,
        policy: str = "fair",
        fail_open: bool = False,
    ) -> None:
        self._store = store
        self._policy = policy
        self._capacities = dict(capacities)
        self._max_waiting = max_waiting
        self._max_waiting_per_tenant = max_waiting_per_tenant
        self._lease_ms = int(lease_ttl_s * 1000)
        self._ticket_ttl_ms = int(ticket_ttl_s * 1000)
        # A waiter renews three times per ticket lease: one late renewal is not fatal.
        self._renew_every_s = ticket_ttl_s / 3
        self._fail_open = fail_open

    def capacity(self, pool: str) -> int:
        return self._capacities[pool]

    def set_capacity(self, pool: str, capacity: int) -> None:
        """A pool's grants at once from now on (the lease keeper follows live replicas)."""
        self._capacities[pool] = max(capacity, 1)

    def step_call(self, pool: str, op: str, args: list[Any]) -> tuple[list[str], list[Any]]:
        """fair_queue.lua's KEYS and ARGV (run alone, or inside enter.lua / leave.lua).
        `args` start with the tickets the step names (all of them for renew), whose grant
        lists are its keys."""
        tickets = args if op == "renew" else args[:1]
        return (
            [
                keys.pool_in_flight(pool),
                keys.pool_waiting(pool),
                keys.pool_tickets(pool),
                keys.pool_virtual_time(pool),
                keys.pool_ticket_leases(pool),
                keys.pool_tenant_waiting(pool),
                *(keys.ticket_grant(pool, ticket) for ticket in tickets),
            ],
            [op, self._capacities[pool], self._lease_ms, self._ticket_ttl_ms, *args],
        )

    async def _step(self, pool: str, op: str, args: list[Any]) -> Any:
        """One script step; then wake the waiters its dispatch granted."""
        result, granted = await self._store.script(Script.FAIR_QUEUE, *self.step_call(pool, op, args))
        if granted:
            await self.wake(pool, granted)
        return result

    async def wake(self, pool: str, tickets: list[str]) -> None:
        """Push the grants the dispatch gave to waiters. A grant lives a ticket lease until
        its waiter claims it (a renew); the list expires after two, read or not."""
        try:
            async with self._store.pipeline(transaction=False) as pipe:
                for ticket in tickets:
                    pipe.rpush(keys.ticket_grant(pool, ticket), 1)
                    pipe.pexpire(keys.ticket_grant(pool, ticket), 2 * self._ticket_ttl_ms)
                await pipe.execute()
        except ServiceUnavailable as exc:
            # The step itself is done; a waiter not woken finds its grant by its next renew.
            logger.warning("fair queue: could not wake granted waiters of pool %s: %s", pool, exc)

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
        ticket, args = self.acquire_args(tenant_id=tenant_id, cost=cost, weight=weight, priority=priority)
        try:
            outcome = await self._step(pool, "acquire", args)
        except BaseException as exc:
            # Whatever ended the step (Redis error, a cancel: it may have queued or granted
            # the ticket) withdraws the ticket.
            await self.leave_queue(pool, ticket)
            if isinstance(exc, ServiceUnavailable) and self._fail_open:
                return self.granted_without_queue(pool, ticket, started)
            raise
        charge = QueueCharge(tenant_id, cost, weight)
        return await self.after_acquire(
            pool, ticket, outcome, started=started, timeout_s=timeout_s, charge=charge
        )

    def acquire_args(
        self, *, tenant_id: str, cost: float, weight: float, priority: int
    ) -> tuple[str, list[Any]]:
        """A new ticket, and the acquire step's arguments after the op (see `step_call`)."""
        ticket = secrets.token_hex(8)
        caps = [self._max_waiting, self._max_waiting_per_tenant]
        return ticket, [ticket, tenant_id, cost, weight, priority, *caps, self._policy]

    def granted_without_queue(self, pool: str, ticket: str, started: float) -> Grant:
        logger.warning("fair queue: Redis unavailable, admitting to pool %s without queueing", pool)
        return Grant(pool, ticket, time.monotonic() - started, recorded=False)

    async def after_acquire(
        self,
        pool: str,
        ticket: str,
        outcome: int,
        *,
        started: float,
        timeout_s: float,
        charge: QueueCharge | None = None,
    ) -> Grant:
        """Wait for a queued ticket's grant, or refuse a full waiting room. `charge`: what
        the acquire charged, which the grant's release corrects."""
        if outcome == QUEUED:
            try:
                await self._wait(pool, ticket, started + timeout_s)
            except BaseException as exc:
                # Whatever ended the wait (timeout, cancel, Redis error) withdraws the ticket.
                await self.leave_queue(pool, ticket)
                if isinstance(exc, ServiceUnavailable) and self._fail_open:
                    return self.granted_without_queue(pool, ticket, started)
                raise
        if outcome == QUEUE_FULL:
            raise Overloaded(
                f"pool '{pool}' has {self._max_waiting} requests waiting; retry later",
                param="queue_full",
                retry_after_s=5,
            )
        if outcome == TENANT_QUEUE_FULL:
            raise RateLimited(
                f"this tenant already has {self._max_waiting_per_tenant} requests waiting for "
                f"pool '{pool}'; retry when some have been served",
                param="max_waiting_per_tenant",
                retry_after_s=2,
            )
        return Grant(pool, ticket, time.monotonic() - started, charge=charge)

    async def _wait(self, pool: str, ticket: str, deadline: float) -> None:
        """Wait for the grant in slices, renewing the ticket's lease between them."""
        grant_key = keys.ticket_grant(pool, ticket)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(
                    f"waited too long for capacity in pool '{pool}'; retry later",
                    param="queue_timeout",
                    retry_after_s=5,
                )
            granted = await self._store.blpop(grant_key, max(min(remaining, self._renew_every_s), 0.01))
            # Claim the grant (full lease), or renew the waiting ticket.
            (status,) = await self._step(pool, "renew", [ticket])
            if status == TICKET_GRANTED:
                return
            if status == TICKET_GONE:
                if granted is not None:
                    return  # claimed too late: the slot may be shared for one lease (rare)
                raise Overloaded(
                    f"the request's place in pool '{pool}''s queue lapsed; retry",
                    param="queue_timeout",
                    retry_after_s=1,
                )

    async def leave_queue(self, pool: str, ticket: str) -> None:
        """Withdraw a ticket, or hand back its grant; shielded, so a second cancel does not
        stop it. On a Redis error the ticket's own lease expires instead."""
        try:
            await asyncio.shield(self._step(pool, "release", [ticket]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - best effort: the ticket's lease expires instead
            logger.warning(
                "fair queue: could not withdraw ticket %s of pool %s (it expires): %s", ticket, pool, exc
            )

    async def release(self, grant: Grant, *, actual_cost: float | None = None) -> None:
        """Free the grant's slot; with `actual_cost`, charge its tenant that instead of
        what the acquire charged."""
        if grant.recorded:
            await self._step(grant.pool, "release", _release_args(grant, actual_cost))

    def release_call(self, grant: Grant, *, actual_cost: float | None = None) -> tuple[list[str], list[Any]]:
        return self.step_call(grant.pool, "release", _release_args(grant, actual_cost))

    async def renew(self, grants: list[Grant]) -> None:
        """Extend the leases of requests still running; one step per pool."""
        by_pool: dict[str, list[str]] = {}
        for g in grants:
            if g.recorded:
                by_pool.setdefault(g.pool, []).append(g.ticket_id)
        for pool, tickets in by_pool.items():
            await self._step(pool, "renew", tickets)

    async def depth(self, pool: str) -> tuple[int, int]:
        """(in flight, waiting) for a pool."""
        async with self._store.pipeline() as pipe:
            pipe.zcard(keys.pool_in_flight(pool))
            pipe.zcard(keys.pool_waiting(pool))
            in_flight, waiting = await pipe.execute()
        return int(in_flight), int(waiting)


def _release_args(grant: Grant, actual_cost: float | None) -> list[Any]:
    """The release step's arguments after the op: the ticket, and the correction of its
    tenant's virtual finish when the actual cost is known."""
    if actual_cost is None or grant.charge is None:
        return [grant.ticket_id]
    return [grant.ticket_id, grant.charge.tenant_id, grant.charge.correction(actual_cost)]

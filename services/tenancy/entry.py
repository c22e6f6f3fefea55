"""A generation's way into tenancy and out of it, one Redis step each (issue 12).

In: `enter.lua` checks the auth version the caller's cached key was read at, admits the
request against the tenant's limits and takes its fair-queue ticket, atomically; an idle
pool grants the ticket in the same step. Out: `leave.lua` settles the reservation to the
tokens used, releases the slot (dispatching the next tickets) and corrects the tenant's
virtual finish to the request's actual queue cost (issue 13). `Admission` and
`FairQueue` name the keys and arguments of each part and read the parts' replies, so the
rules live in one place whether a part runs alone or inside these steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.errors import ServiceUnavailable
from services.redis_store import RedisStore, Script, keys
from services.tenancy.admission import Admission, AdmitCall, Reservation, Usage
from services.tenancy.fair_queue import GRANTED, QUEUED, FairQueue, Grant, QueueCharge
from services.tenancy.models import Tenant

logger = logging.getLogger(__name__)


class StaleAuth(Exception):
    """The key or tenant a replica cached changed (a revocation, a tenant update) after it
    was read: nothing was recorded; read them again and retry."""


class TenancySteps:
    def __init__(self, store: RedisStore, admission: Admission, fair_queue: FairQueue) -> None:
        self._store = store
        self._admission = admission
        self._fair_queue = fair_queue

    async def enter(
        self, tenant: Tenant, reserve_tokens: int, *, pool: str, cost: float, timeout_s: float
    ) -> tuple[Reservation, Grant]:
        """Admit, then wait for the fair queue's grant when the pool is busy. Raises
        RateLimited (a limit, or the tenant's waiting cap), Overloaded (a full waiting room,
        a queue timeout) or StaleAuth; whatever was recorded is undone first."""
        started = time.monotonic()
        call = self._admission.admit_call(tenant, reserve_tokens)
        ticket, acquire = self._fair_queue.acquire_args(
            tenant_id=tenant.id,
            cost=cost,
            weight=tenant.weight,
            priority=tenant.priority_class.engine_priority,
        )
        queue_keys, queue_args = self._fair_queue.step_call(pool, "acquire", acquire)
        stamp = tenant.auth_stamp
        step = asyncio.ensure_future(
            self._store.script(
                Script.ENTER,
                keys=[*call.keys, keys.AUTH_VERSION, *queue_keys],
                args=[stamp.version if stamp else "", *call.args, *queue_args],
            )
        )
        try:
            reply = await asyncio.shield(step)
        except asyncio.CancelledError:
            # The step still runs to its end: undo what it recorded, then go on cancelling.
            await asyncio.shield(self._undo(step, call, pool, ticket))
            raise
        except ServiceUnavailable:
            if not self._admission.fail_open:
                raise
            return (
                self._admission.admitted_without_limits(call),
                self._fair_queue.granted_without_queue(pool, ticket, started),
            )
        status = str(reply[0])
        if status == "stale":
            raise StaleAuth()
        reservation = self._admission.reservation(call, reply[2])  # raises a limit's refusal
        outcome, granted = reply[3]
        if granted:
            await self._fair_queue.wake(pool, granted)
        try:
            grant = await self._fair_queue.after_acquire(
                pool,
                ticket,
                outcome,
                started=started,
                timeout_s=timeout_s,
                charge=QueueCharge(tenant.id, cost, tenant.weight),
            )
        except BaseException:
            if outcome in (GRANTED, QUEUED):  # a full waiting room was undone by enter.lua
                await asyncio.shield(self._admission.settle(reservation, 0))
            raise
        return reservation, grant

    async def leave(
        self,
        reservation: Reservation,
        grant: Grant | None,
        used_tokens: int,
        *,
        usage: Usage | None,
        queue_cost: float | None = None,
    ) -> None:
        """Settle and release in one step (both recorded: the common case); otherwise
        each part that was recorded on its own. `queue_cost`: the request's actual cost in
        the fair queue, charged to its tenant instead of the acquire's (None: keep that)."""
        if not (reservation.recorded and grant is not None and grant.recorded):
            steps = [self._admission.settle(reservation, used_tokens, usage=usage)]
            if grant is not None:
                steps.append(self._fair_queue.release(grant, actual_cost=queue_cost))
            for exc in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(exc, Exception):
                    raise exc
            return
        settle_keys, settle_args = self._admission.settle_call(reservation, used_tokens, usage)
        queue_keys, queue_args = self._fair_queue.release_call(grant, actual_cost=queue_cost)
        _, (_, granted) = await self._store.script(
            Script.LEAVE, keys=[*settle_keys, *queue_keys], args=[*settle_args, *queue_args]
        )
        if granted:
            await self._fair_queue.wake(grant.pool, granted)

    async def _undo(self, step: asyncio.Future[Any], call: AdmitCall, pool: str, ticket: str) -> None:
        try:
            reply = await step
        except Exception:  # noqa: BLE001 - the step failed: nothing was recorded
            return
        if str(reply[0]) != "ok" or reply[3][0] not in (GRANTED, QUEUED):
            return  # stale, refused, or a full waiting room (enter.lua undid it)
        reservation = self._admission.reservation(call, reply[2])
        try:
            await self.leave(reservation, Grant(pool, ticket, 0.0), 0, usage=None)
        except Exception as exc:  # noqa: BLE001 - best effort: the leases expire instead
            logger.warning("undoing a cancelled admission of tenant %s failed: %s", call.tenant.id, exc)

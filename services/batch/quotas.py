"""Per-tenant quotas of the Batch API (issue 9, item 2): Redis memory and file storage are
shared by every tenant, so each one may hold only so much of them.

A quota is a hash per tenant (`keys.tenant_active_batches`, `keys.tenant_file_bytes`):
one entry per unfinished batch (its item count) or stored file (its size). A reservation
checks and adds in one Lua step; releasing is an HDEL, idempotent, so a retried or
repeated release never frees more than was taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import RateLimited
from services.redis_store import RedisStore, Script

TOO_MANY, TOO_LARGE = 1, 2


@dataclass(frozen=True)
class Quota:
    max_members: int
    max_sum: int
    members: str  # "unfinished batches", "files"
    amounts: str  # "queued items", "bytes of files"


class TenantQuotas:
    def __init__(self, store: RedisStore) -> None:
        self._store = store

    async def reserve(self, key: str, member: str, amount: int, quota: Quota) -> None:
        """Take a place or raise 429 quota_exceeded naming what is full and how full."""
        verdict, count, total = await self._store.script(
            Script.RESERVE, keys=[key], args=[member, amount, quota.max_members, quota.max_sum]
        )
        if verdict == TOO_MANY:
            raise RateLimited(
                f"quota: the tenant has {count} of {quota.max_members} {quota.members}; "
                f"wait for some to finish or delete some",
                param=quota.members.replace(" ", "_"),
                code="quota_exceeded",
            )
        if verdict == TOO_LARGE:
            raise RateLimited(
                f"quota: the tenant has {total} of {quota.max_sum} {quota.amounts}; this needs {amount} more",
                param=quota.amounts.replace(" ", "_"),
                code="quota_exceeded",
            )

    async def record(self, key: str, member: str, amount: int) -> None:
        """Count without checking (a batch's own output files must always be written)."""
        await self._store.redis.hset(key, member, amount)

    async def release(self, key: str, member: str) -> None:
        await self._store.redis.hdel(key, member)

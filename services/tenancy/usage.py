"""Usage per tenant, model and UTC day: requests, prompt/completion tokens, images, and
the prompt tokens served from the tenant's prefix cache with what the daily budget charged
(issue 13).

Indexed by tenant (issue 9, item 9): one hash per tenant and day, so a tenant's own query
reads only its own keys, and one set per day of the tenants with usage, for the admin view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.redis_store import RedisStore, keys

USAGE_TTL_S = 90 * 86400
# The fields settle.lua adds up per "<model>|". `cache_credit_tokens`: tokens of the usage
# the daily budget did not charge (cached prompt tokens at the pool's billing factor).
# Recorded as a credit, absent (0) for requests settled before it existed, whose budget
# charge was their tokens in full.
FIELDS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "images",
    "cached_prompt_tokens",
    "cache_credit_tokens",
)


@dataclass(frozen=True)
class UsageRow:
    day: str
    tenant_id: str
    model: str
    requests: int
    prompt_tokens: int  # all prompt tokens, cached or not
    completion_tokens: int
    images: int
    cached_prompt_tokens: int  # of prompt_tokens, served from the tenant's prefix cache
    uncached_prompt_tokens: int  # prompt_tokens - cached_prompt_tokens
    billed_tokens: int  # what the daily token budget was charged

    @classmethod
    def from_counts(cls, day: str, tenant_id: str, model: str, counts: dict[str, int]) -> UsageRow:
        prompt, cached = counts["prompt_tokens"], counts["cached_prompt_tokens"]
        return cls(
            day=day,
            tenant_id=tenant_id,
            model=model,
            requests=counts["requests"],
            prompt_tokens=prompt,
            completion_tokens=counts["completion_tokens"],
            images=counts["images"],
            cached_prompt_tokens=cached,
            uncached_prompt_tokens=prompt - cached,
            billed_tokens=prompt + counts["completion_tokens"] - counts["cache_credit_tokens"],
        )


class UsageLedger:
    """Reads usage. It is written by the settle step of admission (lua/settle.lua), in the
    same Redis call that settles the request's tokens."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    async def rows(self, days: list[str], *, tenant_id: str | None = None) -> list[UsageRow]:
        """Usage rows for the given days; only `tenant_id`'s when it is set (then only that
        tenant's keys are read)."""
        if tenant_id is not None:
            wanted = [(day, tenant_id) for day in days]
        else:
            members = await self._read([("smembers", keys.usage_tenants(day)) for day in days])
            wanted = [(day, t) for day, tenants in zip(days, members, strict=True) for t in sorted(tenants)]
        hashes = await self._read([("hgetall", keys.tenant_usage(t, day)) for day, t in wanted])
        rows = []
        for (day, tenant), raw in zip(wanted, hashes, strict=True):
            grouped: dict[str, dict[str, int]] = {}
            for name, value in raw.items():
                model, field = name.rsplit("|", 1)
                grouped.setdefault(model, dict.fromkeys(FIELDS, 0))[field] = int(value)
            for model, counts in sorted(grouped.items()):
                rows.append(UsageRow.from_counts(day, tenant, model, counts))
        return rows

    async def _read(self, commands: list[tuple[str, str]]) -> list[Any]:
        """Read-only commands in one round trip (no MULTI: a report needs no snapshot)."""
        if not commands:
            return []
        async with self._store.pipeline(transaction=False) as pipe:
            for name, key in commands:
                getattr(pipe, name)(key)
            return await pipe.execute()

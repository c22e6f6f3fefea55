"""Usage per tenant, model and UTC day: requests, prompt/completion tokens, images."""

from __future__ import annotations

from dataclasses import dataclass

from services.tenancy import keys
from services.tenancy.redis_state import RedisState

USAGE_TTL_S = 90 * 86400
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "images")


@dataclass(frozen=True)
class UsageRow:
    day: str
    tenant_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    images: int


class UsageLedger:
    def __init__(self, state: RedisState) -> None:
        self._state = state

    async def record(
        self, *, day: str, tenant_id: str, model: str, prompt_tokens: int, completion_tokens: int, images: int
    ) -> None:
        key = keys.usage(day)
        base = f"{tenant_id}|{model}|"
        async with self._state.pipeline() as pipe:
            pipe.hincrby(key, base + "requests", 1)
            pipe.hincrby(key, base + "prompt_tokens", prompt_tokens)
            pipe.hincrby(key, base + "completion_tokens", completion_tokens)
            if images:
                pipe.hincrby(key, base + "images", images)
            pipe.expire(key, USAGE_TTL_S)
            await pipe.execute()

    async def rows(self, days: list[str], *, tenant_id: str | None = None) -> list[UsageRow]:
        """Usage rows for the given days; only `tenant_id`'s when it is set."""
        rows = []
        for day in days:
            raw = await self._state.run(self._state.redis.hgetall(keys.usage(day)))
            grouped: dict[tuple[str, str], dict[str, int]] = {}
            for name, value in raw.items():
                tenant, model, field = name.rsplit("|", 2)
                if tenant_id is not None and tenant != tenant_id:
                    continue
                grouped.setdefault((tenant, model), dict.fromkeys(FIELDS, 0))[field] = int(value)
            for (tenant, model), counts in sorted(grouped.items()):
                rows.append(UsageRow(day=day, tenant_id=tenant, model=model, **counts))
        return rows

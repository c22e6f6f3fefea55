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
    """Reads usage. It is written by the settle step of admission (lua/settle.lua), in the
    same Redis call that settles the request's tokens."""

    def __init__(self, state: RedisState) -> None:
        self._state = state

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

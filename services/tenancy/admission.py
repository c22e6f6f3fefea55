"""Admission priced before the call: one atomic Lua step per request, settled after it.

`admit()` checks RPM, reserves TPM and the daily budget for `prompt + max_tokens`, and
takes a concurrency slot with an expiring lease (a crashed gateway leaks nothing).
`settle()` moves the reservation to what was actually used and frees the slot; it runs
for every admitted request, including streams that end early and clients that leave.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.errors import RateLimited, ServiceUnavailable
from services.redis_store import RedisStore, Script, keys
from services.tenancy.models import Tenant
from services.tenancy.usage import USAGE_TTL_S


@dataclass(frozen=True)
class Usage:
    """What a finished request used, recorded under its canonical model name.

    `cached_prompt_tokens` are the engine's count of prompt tokens it served from the
    tenant's prefix cache (never a client's), part of `prompt_tokens`. The daily budget
    charges them at `cached_billing_factor` of a token (the pool's
    cached_prompt_billing_factor; issue 13): `cache_credit_tokens` is what it does not
    charge, rounded down, so rounding never makes a request cheaper than the factor."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    images: int = 0
    cached_prompt_tokens: int = 0
    cached_billing_factor: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.cached_prompt_tokens <= self.prompt_tokens:
            raise ValueError(
                f"cached_prompt_tokens must be within 0..prompt_tokens ({self.prompt_tokens}), "
                f"not {self.cached_prompt_tokens}"
            )
        if not 0 <= self.cached_billing_factor <= 1:
            raise ValueError(f"cached_billing_factor must be within 0..1, not {self.cached_billing_factor}")

    @property
    def cache_credit_tokens(self) -> int:
        return self.cached_prompt_tokens - math.ceil(self.cached_prompt_tokens * self.cached_billing_factor)

    @property
    def billed_tokens(self) -> int:
        """Tokens the daily budget charges for this request."""
        return self.prompt_tokens + self.completion_tokens - self.cache_credit_tokens


logger = logging.getLogger(__name__)

# How long a settled reservation's marker lives. It only has to outlive redis-py's retries
# of one call (3 retries, each after a socket timeout of a few seconds and a backoff of at
# most 0.5 s); a short TTL keeps one small key per request for minutes, not days.
SETTLED_MARKER_TTL_S = 300


@dataclass
class Reservation:
    tenant_id: str
    lease_id: str
    bucket_s: int
    reserved_tokens: int
    day: str
    headers: dict[str, str] = field(default_factory=dict)
    # Fail-open admissions (Redis down, limits configured to fail open) have nothing to settle.
    recorded: bool = True


@dataclass(frozen=True)
class AdmitCall:
    """One admission's step, named before it runs."""

    tenant: Tenant
    reserve_tokens: int
    lease_id: str
    day: str
    now_ms: int
    keys: list[str]
    args: list[Any]


def utc_day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def _reset(ms: int) -> str:
    # OpenAI's reset headers read like "1s" or "6m0s".
    seconds = max(ms, 0) / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


class Admission:
    def __init__(
        self,
        store: RedisStore,
        *,
        lease_ttl_s: float,
        fail_open: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._store = store
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        # None (production): windows and leases run on Redis's clock (TIME), shared by every
        # gateway; a test may pass a clock of its own to move time.
        self._fail_open = fail_open
        self._clock = clock

    async def admit(self, tenant: Tenant, reserve_tokens: int) -> Reservation:
        call = self.admit_call(tenant, reserve_tokens)
        try:
            result = await self._store.script(Script.ADMIT, keys=call.keys, args=call.args)
        except ServiceUnavailable:
            if not self._fail_open:
                raise
            return self.admitted_without_limits(call)
        return self.reservation(call, result)

    def admit_call(self, tenant: Tenant, reserve_tokens: int) -> AdmitCall:
        """admit.lua's KEYS and ARGV (run alone, or inside enter.lua)."""
        now = (self._clock or time.time)()
        # The budget's day key is named before the call, on this host's clock (a skew
        # matters only in the seconds around midnight).
        day = utc_day(now)
        limits = tenant.limits
        lease_id = secrets.token_hex(8)
        return AdmitCall(
            tenant=tenant,
            reserve_tokens=reserve_tokens,
            lease_id=lease_id,
            day=day,
            now_ms=int(now * 1000),
            keys=[
                keys.requests_window(tenant.id),
                keys.tokens_window(tenant.id),
                keys.concurrency_leases(tenant.id),
                keys.daily_tokens(tenant.id, day),
            ],
            args=[
                int(now * 1000) if self._clock is not None else "",
                limits.rpm or 0,
                limits.tpm or 0,
                limits.max_concurrent or 0,
                limits.daily_token_budget or 0,
                reserve_tokens,
                lease_id,
                self._lease_ttl_ms,
                2 * 86400,
            ],
        )

    @property
    def fail_open(self) -> bool:
        return self._fail_open

    def admitted_without_limits(self, call: AdmitCall) -> Reservation:
        """Redis is down and limits are configured to fail open: nothing to settle."""
        logger.warning("admission: Redis unavailable, admitting tenant %s without limits", call.tenant.id)
        return Reservation(
            call.tenant.id, call.lease_id, call.now_ms // 1000, call.reserve_tokens, call.day, recorded=False
        )

    def reservation(self, call: AdmitCall, result: list[Any]) -> Reservation:
        """The reservation admit.lua's reply grants, or the refusal it gives (RateLimited)."""
        admitted, reason, retry_ms, req_left, req_reset, tok_left, tok_reset, now_ms = result
        limits = call.tenant.limits
        headers = {}
        if limits.rpm:
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(int(req_left), 0))
            headers["x-ratelimit-reset-requests"] = _reset(int(req_reset))
        if limits.tpm:
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(int(tok_left), 0))
            headers["x-ratelimit-reset-tokens"] = _reset(int(tok_reset))
        if not admitted:
            raise RateLimited(
                _refusal_message(str(reason), call.tenant, call.reserve_tokens),
                code="rate_limit_exceeded",
                param=str(reason),
                retry_after_s=max(1, -(-int(retry_ms) // 1000)),
                headers=headers,
            )
        return Reservation(
            call.tenant.id, call.lease_id, int(now_ms) // 1000, call.reserve_tokens, call.day, headers
        )

    async def settle(self, reservation: Reservation, used_tokens: int, *, usage: Usage | None = None) -> None:
        """Move the reservation to `used_tokens` (the TPM window; the daily budget to that
        less `usage.cache_credit_tokens`), free the slot, and (when given) add the request
        to the tenant's daily usage: one Redis step, applied at most once per reservation
        (redis-py resends a script whose reply it lost; issue 9, item 5)."""
        if reservation.recorded:
            await self._store.script(Script.SETTLE, *self.settle_call(reservation, used_tokens, usage))

    def settle_call(
        self, reservation: Reservation, used_tokens: int, usage: Usage | None
    ) -> tuple[list[str], list[Any]]:
        """settle.lua's KEYS and ARGV (run alone, or inside leave.lua)."""
        usage_args: list[Any] = ["", 0, 0, 0, ""]
        cache_args: list[Any] = [0, 0]
        if usage is not None:
            usage_args = [
                f"{usage.model}|",
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.images,
                USAGE_TTL_S,
            ]
            cache_args = [usage.cached_prompt_tokens, usage.cache_credit_tokens]
        tenant_id = reservation.tenant_id
        return (
            [
                keys.tokens_window(tenant_id),
                keys.daily_tokens(tenant_id, reservation.day),
                keys.concurrency_leases(tenant_id),
                keys.settled(tenant_id, reservation.lease_id),
                keys.tenant_usage(tenant_id, reservation.day),
                keys.usage_tenants(reservation.day),
            ],
            [
                reservation.bucket_s,
                used_tokens - reservation.reserved_tokens,
                reservation.lease_id,
                SETTLED_MARKER_TTL_S,
                *usage_args,
                tenant_id,
                *cache_args,
            ],
        )

    async def renew(self, reservations: list[Reservation]) -> None:
        """Extend the concurrency leases of requests still running (long streams)."""
        live = [r for r in reservations if r.recorded]
        if live:
            await self._store.script(
                Script.RENEW_LEASES,
                keys=[keys.concurrency_leases(r.tenant_id) for r in live],
                args=[
                    int(self._clock() * 1000) if self._clock is not None else "",
                    self._lease_ttl_ms,
                    *(r.lease_id for r in live),
                ],
            )


def _refusal_message(reason: str, tenant: Tenant, reserve: int) -> str:
    limits = tenant.limits
    return {
        "requests_per_minute": f"Rate limit reached: {limits.rpm} requests per minute",
        "tokens_per_minute": (
            f"Rate limit reached: {limits.tpm} tokens per minute (this request reserves "
            f"{reserve} tokens: prompt + max_tokens for each choice)"
        ),
        "request_exceeds_tpm": (
            f"This request reserves {reserve} tokens (prompt + max_tokens for each choice), more than the "
            f"tenant's {limits.tpm} tokens per minute; lower max_tokens or n"
        ),
        "concurrency": f"Too many requests in flight: the limit is {limits.max_concurrent}",
        "daily_token_budget": f"Daily token budget of {limits.daily_token_budget} is used up",
    }.get(reason, "Rate limit reached")

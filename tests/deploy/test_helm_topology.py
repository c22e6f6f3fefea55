"""The chart's Ray topology checked against the code (issue 15, item 3): the deployments
phiserve itself builds from the rendered serveConfigV2 args and catalog must each fit some
worker group of the rendered RayService, and none may fit the head.

Placement is one mechanism (services/catalog/placement.py): phiserve's deployments require Ray
custom resources (`settings.pool_placement`, `settings.gateway_resources`) and the chart's
worker groups advertise them in `rayStartParams.resources`. Nothing here trusts the chart's
own naming: a group hosts a deployment only if Ray would place a replica there.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import SecretStr
from ray.serve import Application
from ray.serve.deployment import Deployment

from services.app import BATCH_DEPLOYMENT, GATEWAY_DEPLOYMENT, build_app, pool_deployment_name
from services.catalog.models import PoolConfig
from services.catalog.placement import pool_resource
from services.settings import Settings
from tests.deploy.tooling import (
    TEST_ADMIN_KEY,
    TEST_CACHE_SALT_SECRET,
    one,
    quantity,
    ray_container,
    ray_groups,
    ray_resources,
    rendered_catalog,
    serve_config,
)

# Ray's float resource arithmetic: 1 / 0.01 must count as 100 replicas, not 99.
EPSILON = 1e-9


def built_deployments(docs: list[dict[str, Any]]) -> dict[str, Deployment]:
    """Every deployment of the app phiserve builds from the rendered args and catalog: the
    gateway and all that its constructor arguments bind (pools, batch worker), by name."""
    args = serve_config(one(docs, "RayService"))["applications"][0]["args"]
    settings = Settings(
        **args, admin_key=SecretStr(TEST_ADMIN_KEY), cache_salt_secret=SecretStr(TEST_CACHE_SALT_SECRET)
    )
    found: dict[str, Deployment] = {}

    def walk(value: Any) -> None:
        if isinstance(value, Application):
            deployment = value._bound_deployment
            if deployment.name not in found:
                found[deployment.name] = deployment
                walk(deployment.init_args)
                walk(deployment.init_kwargs)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(build_app(settings, rendered_catalog(docs)))
    return found


def most_replicas(deployment: Deployment) -> int:
    autoscaling = deployment._deployment_config.autoscaling_config
    return int(autoscaling.max_replicas) if autoscaling else int(deployment.num_replicas)


def gpus_of(group: dict[str, Any]) -> int:
    return int(ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))


def replicas_per_pod(group: dict[str, Any], deployment: Deployment) -> int:
    """How many replicas of `deployment` Ray can place on one pod of `group`: its custom
    resources as advertised, its CPUs and GPUs as KubeRay derives them from the container
    limits. Serve reserves one CPU for a replica that names none."""
    options = deployment.ray_actor_options
    advertised = ray_resources(group)
    fits = [advertised.get(name, 0) / amount for name, amount in (options.get("resources") or {}).items()]
    cpus = float(options.get("num_cpus", 1))
    if cpus:
        fits.append(quantity(ray_container(group)["resources"]["limits"]["cpu"]) / cpus)
    gpus = float(options.get("num_gpus", 0))
    if gpus:
        fits.append(gpus_of(group) / gpus)
    return math.floor(min(fits) + EPSILON)


def test_every_deployment_fits_worker_groups_and_never_the_head(docs: list[dict[str, Any]]) -> None:
    """The head runs the GCS and the Serve controller: a tenant's load on a gateway, batch
    worker or pool replica there can take the whole cluster down (issue 9, item 4), and a pool
    on another pool's group takes its GPUs. Only custom resources can keep replicas that need
    no CPU off the head, so every deployment must require one. A TP>1 pool's GPU group holds
    exactly its tensor-parallel size: its `mp` workers run on the GPUs its replica reserves
    (parse_catalog refuses TP>1 without `mp` or with other num_gpus; tests/catalog)."""
    rayservice = one(docs, "RayService")
    autoscaling = rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    groups = dict(ray_groups(rayservice))
    head = groups.pop("head")
    assert head["rayStartParams"]["num-cpus"] == "0"  # no Ray task on the head either
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name

    deployments = built_deployments(docs)
    pools = {pool_deployment_name(pool): pool for pool in rendered_catalog(docs).enabled_pools}
    assert set(deployments) == {GATEWAY_DEPLOYMENT, BATCH_DEPLOYMENT, *pools}
    for name, deployment in deployments.items():
        needs = deployment.ray_actor_options.get("resources") or {}
        assert needs, f"{name}: requires no custom resource, so Ray may place it on the head"
        assert not set(needs) & set(ray_resources(head)), f"{name}: the head advertises {needs}"
        hosts = {g: replicas_per_pod(group, deployment) for g, group in groups.items()}
        hosts = {g: fit for g, fit in hosts.items() if fit >= 1}
        assert hosts, f"{name}: no worker group advertises {needs} with the CPUs and GPUs it needs"
        # Without the autoscaler KubeRay keeps `replicas` pods; with it, up to maxReplicas.
        pods = {g: groups[g]["maxReplicas" if autoscaling else "replicas"] for g in hosts}
        capacity = sum(fit * pods[g] for g, fit in hosts.items())
        assert capacity >= most_replicas(deployment), (name, hosts, pods, most_replicas(deployment))
        if name in pools:
            pool = pools[name]
            # Pinned by its own pool's resource, to its own group only (the chart names it
            # pool-<name>, like phiserve's deployment): no pool takes another pool's GPUs.
            assert pool_resource(pool.name) in needs, f"{name} is not pinned by {pool_resource(pool.name)}"
            assert set(hosts) == {name}, f"{name} fits groups {sorted(hosts)}, not only its own"
            replica = next(arg for arg in deployment.init_args if isinstance(arg, PoolConfig))
            gpus = gpus_of(groups[name])
            # Every GPU of the pod is reserved by a replica of its pool, or it would sit idle.
            assert gpus == deployment.ray_actor_options.get("num_gpus", 0) * hosts[name], f"{name}: idle GPUs"
            if replica.engine.tensor_parallel_size > 1:
                assert gpus == replica.engine.tensor_parallel_size, f"{name}: GPUs != TP size"

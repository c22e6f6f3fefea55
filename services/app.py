"""Builder: settings + catalog -> serve.Application. All `.bind()` wiring lives here."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from services.batch.deployment import BatchWorker
from services.catalog.models import Catalog, PoolConfig
from services.catalog.placement import pool_resource
from services.ingress import GatewayIngress
from services.pools.adapter_sources import ReplicaAdapterCheck
from services.pools.deployment import PoolReplica
from services.pools.prefix_router import PrefixAffinityRouter
from services.settings import Settings

GATEWAY_DEPLOYMENT = "gateway"
BATCH_DEPLOYMENT = "batch-worker"
APP_NAME = "phiserve"
# Serve's per-request access log costs each replica a record per call; phiserve writes its
# own line per generation (inference/gate.py) with what an operator needs.
LOGGING = {"enable_access_log": False}

# What every vLLM replica needs on the CPU; see docs/architecture.md. These are set
# per replica process through its runtime_env so they never leak into the gateway.
CPU_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def pool_deployment_name(pool: PoolConfig) -> str:
    return f"pool-{pool.name}"


def _actor_options(pool: PoolConfig, catalog: Catalog, settings: Settings) -> dict[str, Any]:
    options = dict(pool.deployment.ray_actor_options)
    if settings.pool_placement == "pool_nodes":
        # Only the pool's own nodes advertise this resource (services/catalog/placement.py).
        options["resources"] = {**(options.get("resources") or {}), pool_resource(pool.name): 1}
    runtime_env = dict(options.get("runtime_env") or {})
    env = dict(CPU_ENGINE_ENV) if catalog.platform.value == "cpu" else {}
    env.update(runtime_env.get("env_vars") or {})
    env.update(pool.env)
    runtime_env["env_vars"] = env
    options["runtime_env"] = runtime_env
    return options


def build_pool(pool: PoolConfig, catalog: Catalog, settings: Settings) -> Application:
    dep = pool.deployment
    options: dict[str, Any] = {
        "name": pool_deployment_name(pool),
        "max_ongoing_requests": dep.max_ongoing_requests,
        "health_check_period_s": dep.health_check_period_s,
        "health_check_timeout_s": dep.health_check_timeout_s,
        "graceful_shutdown_timeout_s": dep.graceful_shutdown_timeout_s,
        "ray_actor_options": _actor_options(pool, catalog, settings),
        "logging_config": LOGGING,
    }
    if dep.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": dep.autoscaling.min_replicas,
            "max_replicas": dep.autoscaling.max_replicas,
            "target_ongoing_requests": dep.autoscaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = dep.num_replicas
    if pool.routing.policy == "prefix_affinity":
        # Every handle to this deployment (gateway replicas, batch workers) routes with it;
        # least_loaded keeps Serve's default router (power of two choices).
        # Serve's RequestRouterConfig, as the dict serve.deployment takes.
        options["request_router_config"] = {
            "request_router_class": PrefixAffinityRouter,
            "request_router_kwargs": {"max_imbalance": pool.routing.max_imbalance, "pool": pool.name},
        }
    model_path = pool.resolve_model_path(settings.model_dir.resolve())
    # The replica checks an adapter's folder again before loading it: files on a shared
    # volume may have changed since registration (services/pools/adapter_sources.py).
    adapter_check = ReplicaAdapterCheck(
        settings.adapter_store_dir, settings.adapter_roots, max_bytes=settings.max_adapter_bytes
    )
    return serve.deployment(**options)(PoolReplica).bind(
        pool.for_replica(), model_path, adapter_check=adapter_check
    )


def edge_actor_options(settings: Settings) -> dict[str, Any]:
    """Gateway and batch-worker replicas: no CPU reserved, and the custom resources that keep
    them on worker nodes (never the Ray head) when the deployment asks for it."""
    options: dict[str, Any] = {"num_cpus": 0}
    if settings.gateway_resources:
        options["resources"] = dict(settings.gateway_resources)
    return options


def build_app(settings: Settings, catalog: Catalog) -> Application:
    pools = {pool.name: build_pool(pool, catalog, settings) for pool in catalog.enabled_pools}
    worker = None
    if settings.batch_workers:
        # serve.deployment(**options)(cls): the form Serve's annotations describe.
        worker = serve.deployment(
            name=BATCH_DEPLOYMENT,
            # Scaled by stream lag (services/batch/autoscaling.py), not by handle traffic.
            autoscaling_config={
                "min_replicas": settings.batch_workers,
                "max_replicas": max(settings.batch_workers, settings.batch_max_workers),
                "upscale_delay_s": 10,
                "downscale_delay_s": 120,
                "policy": {
                    "policy_function": "services.batch.autoscaling:BacklogPolicy",
                    "policy_kwargs": {"items_per_worker": settings.batch_items_per_worker},
                },
            },
            health_check_period_s=5,
            graceful_shutdown_timeout_s=5,
            ray_actor_options=edge_actor_options(settings),
            logging_config=LOGGING,
        )(BatchWorker).bind(catalog, settings, pools)
    gateway = serve.deployment(
        name=GATEWAY_DEPLOYMENT,
        num_replicas=settings.gateway_replicas,
        max_ongoing_requests=1024,
        ray_actor_options=edge_actor_options(settings),
        logging_config=LOGGING,
    )(GatewayIngress)
    return gateway.bind(catalog, settings, pools, batch_worker=worker)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files (KubeRay `serveConfigV2`, `serve run`):
    `import_path: services.app:app_builder`, `args: {profile: h100, ...}`.

    `args` override `PHISERVE_*` environment variables field by field; the catalog profile
    is loaded and validated here, so a bad catalog fails the deployment with its message.
    """
    from services.catalog.loader import load_catalog

    settings = Settings(**args)
    return build_app(settings, load_catalog(settings.profile))

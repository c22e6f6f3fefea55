"""Placement by node resources (issue 15): what replicas ask for and what nodes advertise."""

from __future__ import annotations

from services.app import build_pool
from services.catalog.loader import load_catalog
from services.catalog.placement import (
    GATEWAY_RESOURCE,
    gateway_node_resources,
    gateway_replica_resources,
    pool_node_resources,
    pool_resource,
)
from services.settings import Settings

H100 = load_catalog("h100")


def _options(pool_name: str, **settings: object) -> dict[str, object]:
    pool = next(p for p in H100.pools if p.name == pool_name)
    app = build_pool(
        pool, H100, Settings(profile="h100", admin_key="a" * 32, cache_salt_secret="s" * 32, **settings)
    )
    return dict(app._bound_deployment.ray_actor_options)


def test_a_pool_replica_asks_for_its_pools_resource_only_when_placed_on_pool_nodes() -> None:
    placed = _options("moe", pool_placement="pool_nodes")
    assert placed["resources"] == {"phiserve_pool_moe": 1}
    assert placed["num_gpus"] == 2  # the catalog's own options are kept
    assert "resources" not in _options("moe")  # any_node: wherever the GPUs fit


def test_nodes_advertise_room_for_every_replica() -> None:
    by_name = {pool.name: pool for pool in H100.pools}
    advertised = pool_node_resources(H100.enabled_pools)
    text = by_name["text"].deployment
    assert text.autoscaling is not None  # the h100 text pool autoscales: room for its most replicas
    assert advertised[pool_resource("text")] == text.autoscaling.max_replicas
    for pool in H100.enabled_pools:  # one unit per replica, the most the pool may run
        dep = pool.deployment
        assert advertised[pool_resource(pool.name)] == (
            dep.autoscaling.max_replicas if dep.autoscaling else dep.num_replicas
        )
    assert set(advertised) == {
        "phiserve_pool_text",
        "phiserve_pool_text_long",
        "phiserve_pool_vision",
        "phiserve_pool_moe",
    }
    # A gateway node takes 100 gateway or batch-worker replicas.
    share = gateway_replica_resources()[GATEWAY_RESOURCE]
    assert round(gateway_node_resources()[GATEWAY_RESOURCE] / share) == 100

"""Where replicas run: Ray custom resources that only the nodes meant for them advertise.

One mechanism for every topology (issue 15). A pool replica asks for one unit of its pool's
resource and a gateway or batch-worker replica for a share of the gateway resource
(`Settings.pool_placement`, `Settings.gateway_resources`); the nodes say what they host by
advertising them: the chart's worker groups in `rayStartParams.resources`, the nodes of
`phiserve up --nodes N` in `ray start --resources`. Ray does the placing.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.catalog.models import PoolConfig

GATEWAY_RESOURCE = "phiserve_gateway"
# What one gateway or batch-worker replica asks for: a node advertising 1 takes 100 of them
# (they reserve no CPU; the resource only says where they may run).
GATEWAY_SHARE = 0.01


def pool_resource(pool_name: str) -> str:
    """`phiserve_pool_<name>`: one unit per replica of that pool."""
    return "phiserve_pool_" + pool_name.replace("-", "_")


def most_replicas(pool: PoolConfig) -> int:
    dep = pool.deployment
    return dep.autoscaling.max_replicas if dep.autoscaling else (dep.num_replicas or 1)


def pool_node_resources(pools: Iterable[PoolConfig]) -> dict[str, float]:
    """What a node that may host every replica of `pools` advertises."""
    return {pool_resource(pool.name): float(most_replicas(pool)) for pool in pools}


def gateway_node_resources() -> dict[str, float]:
    """What a node that hosts gateway and batch-worker replicas advertises."""
    return {GATEWAY_RESOURCE: 1.0}


def gateway_replica_resources() -> dict[str, float]:
    """`Settings.gateway_resources` for a cluster placed by node resources."""
    return {GATEWAY_RESOURCE: GATEWAY_SHARE}

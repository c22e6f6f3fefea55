"""Two Ray nodes on this machine (issue 15): `phiserve up --nodes 2` run as a command, the
gateway and batch worker on the head, the text pool on a second `ray start` node, placed by
the node resources the chart's worker groups advertise on Kubernetes.

Its own cluster, Redis and ports, beside nothing else: the root conftest runs these tests
first, and the fixture (package scope) is gone before the session cluster starts, so the two
never share the machine's 2 cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import pytest
import yaml

from services.catalog.loader import load_catalog
from services.cli import pool_node_name, start_pool_node
from services.local.ray_cluster import (
    cluster_folder,
    cluster_pids,
    gcs_address,
    node_pids,
    stop_node,
)
from services.local.redis_server import LocalRedis
from services.settings import Settings
from tests.conftest import ADMIN_KEY, CACHE_DIR, CACHE_SALT_SECRET, REPO, free_port, wait_until

POOL_NODE_INDEX = 1
POOL_NODE = pool_node_name(POOL_NODE_INDEX)
UP_TIMEOUT_S = 900.0
RECOVERY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TwoNodes:
    url: str
    env: dict[str, str]  # what `phiserve` run as a command needs to reach this cluster
    settings: Settings
    folder: Path

    @property
    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def replica_pids(self, node: str, deployment: str) -> list[int]:
        """The processes of `deployment`'s replicas that run on `node` (Ray titles them)."""
        title = f"ray::ServeReplica:phiserve:{deployment}".encode()
        found = []
        for pid in node_pids(self.folder, node):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == title:
                    found.append(pid)
            except OSError:  # ended meanwhile
                continue
        return found

    def kill_pool_node(self) -> int:
        """SIGKILL the pool node's raylet and every process it started, as a machine that
        dies; returns once none is left (its agents and engine cores included)."""
        killed = stop_node(self.folder, POOL_NODE, signal.SIGKILL)
        wait_until(
            lambda: not node_pids(self.folder, POOL_NODE), timeout_s=30, interval_s=0.1, what="pool node gone"
        )
        return killed

    def start_pool_node(self) -> None:
        """The node comes back: `ray start --address` again, as `phiserve up` started it."""
        catalog = load_catalog(self.settings.profile)
        with mock.patch.dict(os.environ, self.env, clear=True):
            start_pool_node(self.settings, catalog, gcs_address(self.folder) or "", POOL_NODE_INDEX)

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/ready", timeout=10).status_code == 200


def _text_only_catalog(path: Path) -> Path:
    """The local profile's text pool alone (its long-context partner dropped): one engine
    to start, and to start again when its node comes back."""
    raw = yaml.safe_load((REPO / "services/catalog/profiles/local.yaml").read_text())
    pools = [pool for pool in raw["pools"] if pool["name"] == "text"]
    pools[0].pop("long_context_pool")
    path.write_text(yaml.safe_dump({"platform": raw["platform"], "pools": pools}))
    return path


def _phiserve(env: dict[str, str], *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,  # the caller asserts, with the output
    )


@pytest.fixture(scope="package")
def two_nodes(tiny_models: dict[str, Path]) -> Iterator[TwoNodes]:
    base = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))
    cache = base / "cache"
    cache.mkdir()
    # The tiny models and adapters the session built, not a second copy.
    (cache / "models").symlink_to(CACHE_DIR / "models")
    (cache / "adapters").symlink_to(CACHE_DIR / "adapters")
    redis = LocalRedis(port=free_port(), directory=base / "redis")
    redis.start()
    env = {
        key: value
        for key, value in os.environ.items()
        # Not the session's Ray, HAProxy ports or settings: this cluster's own, below.
        if not key.startswith(("RAY_SERVE_HAPROXY_", "PHISERVE_", "RAY_ADDRESS"))
    }
    env.update(
        {
            "PHISERVE_PROFILE": str(_text_only_catalog(base / "catalog.yaml")),
            "PHISERVE_CACHE_DIR": str(cache),
            "PHISERVE_PORT": str(free_port()),
            "PHISERVE_GRPC_PORT": str(free_port()),
            "PHISERVE_METRICS_EXPORT_PORT": str(free_port()),
            "PHISERVE_REDIS_URL": redis.url,
            "PHISERVE_ADMIN_KEY": ADMIN_KEY,
            "PHISERVE_CACHE_SALT_SECRET": CACHE_SALT_SECRET,
            "PHISERVE_GATEWAY_REPLICAS": "2",
            "PHISERVE_POOL_READY_TIMEOUT_S": "3",
            "PHISERVE_LEASE_TTL_S": "10",
            "PHISERVE_BATCH_VISIBILITY_TIMEOUT_S": "5",
            "PHISERVE_BATCH_SWEEP_INTERVAL_S": "1",
            "PHISERVE_BATCH_RETRY_BACKOFF_S": "0.5",
            "PHISERVE_BATCH_RETRY_MAX_BACKOFF_S": "3",
            "PHISERVE_BATCH_MAX_WORKERS": "1",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings()
    up = _phiserve(env, "up", "--nodes", "2", timeout_s=UP_TIMEOUT_S)
    try:
        assert up.returncode == 0, f"phiserve up --nodes 2 failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        nodes = TwoNodes(
            url=f"http://127.0.0.1:{settings.port}",
            env=env,
            settings=settings,
            folder=cluster_folder(settings),
        )
        wait_until(nodes.ready, timeout_s=60, what="two-node cluster ready")
        yield nodes
    finally:
        down = _phiserve(env, "down", timeout_s=120)
        redis.stop()
        assert down.returncode == 0, down.stderr[-2000:]
        # Nothing of this cluster may outlive it into the session cluster's tests.
        folder = cluster_folder(settings)
        wait_until(
            lambda: not cluster_pids(folder), timeout_s=30, interval_s=0.2, what="two-node cluster gone"
        )

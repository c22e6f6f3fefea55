"""The local cluster of `phiserve up` beside others (issue 9, item 10), on a real Ray head in
a private folder: the test suite's own cluster starts beside it, and `phiserve down` on it
half-stopped (the raylet killed, the GCS and an HAProxy left running) returns within a
bound, stops every process of that cluster and the local Redis, and touches nothing else
(other clusters run on this machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.local.ray_cluster import AUTH_ENV, MARKER, cluster_folder, cluster_pids, start_local_ray
from services.local.redis_server import LocalRedis
from services.settings import Settings
from tests.conftest import REPO, free_port, wait_until

# Starts Ray clusters of its own (minutes): not part of the fast layer.
pytestmark = pytest.mark.cluster

DOWN_BOUND_S = 30.0

# Run inside the cluster the way Serve's proxy actor starts HAProxy (its own Ray code, the
# environment the cluster's processes inherit), then leave HAProxy running.
_SPAWN_HAPROXY = textwrap.dedent(
    """
    import sys, ray
    from ray.serve.config import HTTPOptions

    @ray.remote(num_cpus=0)
    class Proxy:
        async def start(self, port):
            from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC
            from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
            self.api = HAProxyApi(
                cfg=HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=port)),
                config_file_path=RAY_SERVE_HAPROXY_CONFIG_FILE_LOC,
            )
            await self.api.start()
            return self.api._proc.pid

    ray.init(address=sys.argv[1], log_to_driver=False)
    proxy = Proxy.options(name="proxy", lifetime="detached").remote()
    print(ray.get(proxy.start.remote(int(sys.argv[2]))), flush=True)
    """
)

# The test suite's own cluster (tests/conftest.py), started while RAY_ADDRESS names another.
_TEST_SUITE_RAY = textwrap.dedent(
    """
    import ray
    from tests.conftest import free_port, init_private_ray
    init_private_ray(free_port())
    print(ray.get_runtime_context().gcs_address, flush=True)
    ray.shutdown()
    """
)


@dataclass(frozen=True)
class Head:
    settings: Settings
    env: dict[str, str]  # what `phiserve` run as a command needs to find this cluster
    folder: Path
    address: str
    redis: LocalRedis


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """What `phiserve up` starts before deploying: its Redis and its Ray head."""
    cache_dir = tmp_path_factory.mktemp("cache")
    redis_port = free_port()
    env = {"PHISERVE_CACHE_DIR": str(cache_dir), "PHISERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    settings = Settings(cache_dir=cache_dir, ray_num_cpus=1, metrics_export_port=free_port())
    folder = cluster_folder(settings)
    redis = LocalRedis(port=redis_port, directory=cache_dir / "redis")
    redis.start(appendonly=False)
    with pytest.MonkeyPatch.context() as patch:
        # HAProxy ports of its own: the session cluster (and `phiserve up`) use others.
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            patch.setenv(name, str(free_port()))
        try:
            yield Head(settings, env, folder, start_local_ray(settings), redis)
        finally:
            for pid in cluster_pids(folder):  # only if a test failed before `down` did its work
                os.kill(pid, 9)
            redis.stop()
            shutil.rmtree(folder, ignore_errors=True)


def test_the_test_suite_starts_its_own_cluster_beside_a_running_one(head: Head) -> None:
    """`bash scripts/test.sh` beside a `phiserve up` cluster failed with 109 errors: the
    suite's ray.init attached to that cluster and refused its num_cpus."""
    run = subprocess.run(
        [sys.executable, "-c", _TEST_SUITE_RAY],
        env={**os.environ, "RAY_ADDRESS": head.address},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,  # the assertion below reports stderr
    )
    assert run.returncode == 0, run.stderr[-3000:]
    own = run.stdout.split()[-1]
    assert own != head.address, "the suite attached to the running cluster"
    alive = [_cmdline(p) for p in cluster_pids(head.folder)]
    assert any("raylet/raylet" in c for c in alive) and any("gcs_server" in c for c in alive), alive


def test_down_stops_a_half_stopped_cluster_quickly_and_nothing_else(head: Head) -> None:
    # Decoys that `down` must leave alone: a near-miss marker, and no marker at all.
    decoys = [
        subprocess.Popen(["sleep", "120"], env={**os.environ, MARKER: f"{head.folder}x"}),
        subprocess.Popen(["sleep", "120"]),
    ]
    try:
        spawned = subprocess.run(
            [sys.executable, "-c", _SPAWN_HAPROXY, head.address, str(free_port())],
            env={**os.environ, **AUTH_ENV},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,  # the assertion below reports stderr
        )
        assert spawned.returncode == 0, spawned.stderr[-3000:]
        haproxy = int(spawned.stdout.split()[-1])
        pids = cluster_pids(head.folder)
        assert haproxy in pids, "HAProxy, started by a Ray worker, must carry the cluster's marker"
        (raylet,) = [p for p in pids if "raylet/raylet" in _cmdline(p)]
        (gcs,) = [p for p in pids if "gcs_server" in _cmdline(p)]
        os.kill(raylet, 9)  # the half-stopped state: no raylet, GCS and HAProxy alive
        wait_until(
            lambda: raylet not in cluster_pids(head.folder), timeout_s=10, interval_s=0.1, what="raylet"
        )
        assert {gcs, haproxy} <= set(cluster_pids(head.folder))
        status = subprocess.run(
            [sys.executable, "-m", "services.cli", "status"],
            env={**os.environ, **head.env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=DOWN_BOUND_S,
            check=False,  # must fail: the assertion below checks how
        )
        assert status.returncode != 0 and "half-stopped" in status.stderr, status.stderr

        started = time.monotonic()
        down = subprocess.run(
            [sys.executable, "-m", "services.cli", "down"],
            env={**os.environ, **head.env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,  # the assertion below reports stdout and stderr
        )
        elapsed = time.monotonic() - started
        print(f"phiserve down took {elapsed:.1f} s")
        assert down.returncode == 0, down.stdout + down.stderr
        assert elapsed < DOWN_BOUND_S, f"`phiserve down` took {elapsed:.1f} s"
        assert cluster_pids(head.folder) == [], [_cmdline(p) for p in cluster_pids(head.folder)]
        assert not head.redis.is_up()
        assert all(decoy.poll() is None for decoy in decoys), "down stopped a process not of its cluster"
    finally:
        for decoy in decoys:
            decoy.kill()
            decoy.wait()

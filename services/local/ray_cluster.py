"""The local Ray cluster of `phiserve up`, and how `phiserve down` finds and stops it.

`up` starts the head with a folder of its own (Ray's temp dir, HAProxy's files) derived from
the cache dir, and puts `PHISERVE_LOCAL_CLUSTER=<folder>` in the environment of `ray start`.
Every process of that cluster inherits it: the GCS, the raylet, the agents, every worker and
replica, vLLM's engine cores and HAProxy. `down` stops exactly those processes (SIGTERM, then
SIGKILL after a short grace), without connecting to Ray (issue 9, item 10):
* `ray.init(address="auto")` blocked for more than 12 minutes on a half-stopped cluster (the
  raylet gone, the GCS and HAProxy alive); reading /proc cannot block;
* `ray stop --force` stops every Ray process on the machine, including other clusters (test
  sessions, other users' clusters of the same account); the marker reaches only this one;
* a graceful Serve shutdown drained for 45-50 s; the Batch API's items are redelivered and
  written exactly once, so a local `down` does not need the drain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.ray_env import ray_process_env
from services.settings import Settings

MARKER = "PHISERVE_LOCAL_CLUSTER"
# Which node of that cluster a process belongs to: `head`, or the name given to `start_node`.
NODE_MARKER = "PHISERVE_LOCAL_NODE"
HEAD_NODE = "head"
# Ray enables token authentication on a new local cluster (token in ~/.ray/auth_token), but a
# driver given an explicit address only uses it when told: the head and every driver of it
# (`up`, `status`) run with this.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
STOP_GRACE_S = 5.0
KILL_WAIT_S = 5.0
START_ATTEMPTS = 2


def cluster_folder(settings: Settings) -> Path:
    """One folder per cache dir (so two checkouts keep two clusters apart). Short: HAProxy
    limits socket paths to ~97 characters and Serve appends a 56-character node id."""
    digest = hashlib.sha256(str(settings.cache_dir.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"phi-{os.getuid()}-{digest}"


def ray_binary() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def gcs_address(folder: Path) -> str | None:
    """The running cluster's GCS address (Ray writes it into its temp dir), if any."""
    path = folder / "ray" / "ray_current_cluster"
    if not cluster_pids(folder) or not path.is_file():
        return None
    return path.read_text().strip() or None


def start_local_ray(settings: Settings, *, resources: dict[str, float] | None = None) -> str:
    """Start the head (or find the one already running); return its GCS address. The caller
    connects with AUTH_ENV in its environment. `resources`: the custom Ray resources the
    head advertises (services/catalog/placement.py)."""
    folder = cluster_folder(settings)
    running = gcs_address(folder)
    if running is not None:
        return running
    folder.mkdir(mode=0o700, exist_ok=True)
    cmd = [
        ray_binary(),
        "start",
        "--head",
        "--port=0",  # a free GCS port: never another cluster's 6379
        f"--temp-dir={folder / 'ray'}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--metrics-export-port={settings.metrics_export_port}",
    ]
    if settings.ray_num_cpus:
        cmd.append(f"--num-cpus={settings.ray_num_cpus}")
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    for _ in range(START_ATTEMPTS):
        result = subprocess.run(
            cmd, env=_node_env(settings, folder, HEAD_NODE), capture_output=True, text=True, check=False
        )  # tried again
        address = gcs_address(folder)
        if result.returncode == 0 and address is not None:
            return address
        # A head that timed out (the raylet registers within a fixed 30 s; an overloaded
        # machine can miss it) leaves its GCS running: stop it before the next attempt.
        stop_cluster(folder)
    raise SystemExit(f"phiserve: `ray start` failed:\n{result.stdout}{result.stderr}")


def start_node(settings: Settings, address: str, node: str, resources: dict[str, float]) -> None:
    """Join a second Ray node (`ray start --address`) to the local head, on this machine,
    advertising `resources`; a node of that name already running is left as it is. Its
    processes carry both markers, so `down` stops them with the cluster and `node_pids`
    finds this node's alone. Ports of its own: the head's agent and metrics ports are taken."""
    folder = cluster_folder(settings)
    if node_pids(folder, node):
        return
    cmd = [
        ray_binary(),
        "start",
        f"--address={address}",
        "--disable-usage-stats",
        f"--resources={json.dumps(resources)}",
        f"--metrics-export-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    if settings.ray_num_cpus:
        cmd.append(f"--num-cpus={settings.ray_num_cpus}")
    for _ in range(START_ATTEMPTS):
        result = subprocess.run(
            cmd, env=_node_env(settings, folder, node), capture_output=True, text=True, check=False
        )  # tried again
        if result.returncode == 0:
            return
        stop_node(folder, node)
    raise SystemExit(f"phiserve: `ray start` of node {node} failed:\n{result.stdout}{result.stderr}")


def _node_env(settings: Settings, folder: Path, node: str) -> dict[str, str]:
    # Read by every Ray process at import: it must be in the environment of `ray start`.
    return {
        **os.environ,
        **ray_process_env(
            settings.proxy_mode, folder, throughput_optimized=settings.serve_throughput_optimized
        ),
        **AUTH_ENV,
        MARKER: str(folder),
        NODE_MARKER: node,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def has_raylet(folder: Path) -> bool:
    """A cluster without its raylet (killed, crashed) cannot take a driver: ray.init blocks."""
    for pid in cluster_pids(folder):
        try:
            if b"/raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def node_pids(folder: Path, node: str) -> list[int]:
    """The processes of one node of the cluster: its raylet, agents, workers, replicas and
    what they started (vLLM's engine cores)."""
    return cluster_pids(folder, node=node)


def stop_node(folder: Path, node: str, sig: signal.Signals = signal.SIGKILL) -> int:
    """Signal every process of one node (SIGKILL: the node dies as a machine would); returns
    how many there were."""
    pids = node_pids(folder, node)
    _signal(pids, sig)
    return len(pids)


def cluster_pids(folder: Path, *, node: str | None = None) -> list[int]:
    """This user's processes that carry the cluster's marker, and their descendants (never
    this process); with `node`, only that node's. Descendants because a process that sets its
    title over its environment (Ray's agents, vLLM's engine core) no longer shows the marker
    in /proc/<pid>/environ: a killed node's agents outlived its raylet by minutes."""
    needles = {f"{MARKER}={folder}".encode()}
    if node is not None:
        needles.add(f"{NODE_MARKER}={node}".encode())
    uid, me = os.getuid(), os.getpid()
    marked: set[int] = set()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != uid:
                continue
            # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(pid)
            if needles <= set((entry / "environ").read_bytes().split(b"\0")):
                marked.add(pid)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not readable
            continue
    found, todo = set(marked), list(marked)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def stop_cluster(folder: Path, *, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM every process of the cluster, SIGKILL what is left after `grace_s`; returns
    how many processes were found. Bounded: at most grace_s + KILL_WAIT_S."""
    found = set(cluster_pids(folder))
    _signal(found, signal.SIGTERM)
    if not _wait_gone(folder, grace_s):
        left = cluster_pids(folder)
        found.update(left)
        _signal(left, signal.SIGKILL)
        _wait_gone(folder, KILL_WAIT_S)
    return len(found)


def _signal(pids: list[int] | set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:  # already gone
            pass


def _wait_gone(folder: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while cluster_pids(folder):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def init_private_ray(name: str, **init_kwargs: object) -> None:
    """An in-process Ray cluster of its own (tests, benchmarks), even beside `phiserve up` or
    another session on this machine: "local" never attaches to a running cluster (which
    refuses num_cpus), and a private temp folder keeps its sockets and logs apart (short:
    socket paths are limited). Ray gives a new node a fixed 30 s to register with its GCS;
    on a loaded machine that can pass, and the start is tried again."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    for attempt in range(3):
        try:
            ray.init(
                address="local",
                _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"),
                namespace=f"phiserve-{name}-{os.getpid()}",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                **init_kwargs,  # type: ignore[arg-type]
            )
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()

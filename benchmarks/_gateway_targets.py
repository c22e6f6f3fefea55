"""The targets of `gateway_overhead.py`, all alive at once: vLLM's own OpenAI server (a process
of its own), and in one Ray Serve instance phiserve (route `/`) and, as a peer, Ray Serve LLM's
OpenAI app (route `/rayllm`). Every engine runs the same tiny model with the same settings.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from _common import CACHE_DIR, REPO, deploy, free_port, text_catalog, wait_http
from _gateway_measure import SERVED, Groups, Target, cmd, own_tree

BENCH_DIR = Path(__file__).resolve().parent
MODEL = CACHE_DIR / "models" / "phi-3.5-mini-tiny"
RAYLLM_APP, RAYLLM_PREFIX = "rayllm", "/rayllm"
ENGINE_ENV = {  # services.app.CPU_ENGINE_ENV, literal: importing services.app imports ray
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# The local profile's text pool (services/catalog/profiles/local.yaml), for all three engines.
ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "bfloat16",
    "max_model_len": 2048,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 268435456,
    "max_num_seqs": 32,
    "enable_chunked_prefill": False,
    "scheduling_policy": "priority",
}
# Serve processes that carry every application's HTTP traffic (cmdline prefixes; HAProxy by binary).
SHARED = ("ray::ProxyActor", "ray::HAProxyManager")


def configure_env(mode: str, source: Path, *, throughput_optimized: bool) -> Path | None:
    """Before `import ray` (every Ray process reads these at import and inherits them from the
    driver). Returns the HAProxy folder to delete afterwards."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(source))
    os.chdir(source)  # Ray workers get the driver's cwd; the PYTHONPATH also reaches them, and
    # BENCH_DIR on it lets Ray Serve LLM's replica import its server class (_gateway_rayllm).
    path = [str(source), str(BENCH_DIR), os.environ.get("PYTHONPATH")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    if throughput_optimized:  # Ray Serve's best configuration for both apps (issue 12)
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if mode == "default":
        # Throughput-optimized mode would turn direct ingress on; "default" is Serve's proxy.
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
        return None
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    # Replica ports come from 30000 up in every Ray cluster on the host; a block of our own keeps a
    # parallel cluster from taking a port our HAProxy still points at when a replica is replaced.
    base = 30100 + 100 * random.randrange(9)
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(base))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(base + 99))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")  # fast shutdown
    if mode != "haproxy":
        return None
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    # Short: Serve adds a 56-character node id to each path, HAProxy takes socket paths <= 97.
    hp = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    for key, name in [
        ("CONFIG_FILE_LOC", "haproxy.cfg"),
        ("SOCKET_PATH", "admin.sock"),
        ("SERVER_STATE_FILE", "server-state"),
        ("METRICS_SOCKET_PATH", "metrics.sock"),
        ("SERVER_STATE_BASE", ""),
    ]:
        os.environ[f"RAY_SERVE_HAPROXY_{key}"] = str(hp / name)
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))  # else 8404, 9101
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))  # on all interfaces
    return hp


def direct_argv(port: int) -> list[str]:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL)]
    argv += ["--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in ENGINE_KWARGS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


@contextlib.contextmanager
def direct_vllm(tmp: Path) -> Iterator[Target]:
    """vLLM's OpenAI server, a process group of its own; stopped on exit."""
    port = free_port()
    with open(tmp / "vllm-server.log", "wb") as log:
        proc = subprocess.Popen(
            direct_argv(port),
            env={**os.environ, **ENGINE_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        wait_http(f"http://127.0.0.1:{port}/health", 600, "vLLM server", proc)
        print(f"direct: vLLM OpenAI server ready on :{port} after {time.monotonic() - t0:.1f} s", flush=True)
        server = psutil.Process(proc.pid)
        groups = {"frontend": [server], "engine": server.children(recursive=True)}
        yield Target("direct", f"http://127.0.0.1:{port}/v1/chat/completions", groups)
    except BaseException:
        print((tmp / "vllm-server.log").read_text()[-3000:], file=sys.stderr)  # why it failed
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        proc.wait()


def serve_groups(app: str, ingress: tuple[str, ...], server: str, extra: list[psutil.Process]) -> Groups:
    """One Serve application's processes, searched in our own process tree only (a parallel Ray
    cluster is never counted): `gateway_path` = the shared front door + the app's ingress
    replica (+ `extra`, e.g. Redis); `pool_frontend` = the replica holding the engine;
    `engine` = that replica's children (vLLM's engine core)."""
    groups: Groups = {"gateway_path": [], "pool_frontend": [], "engine": []}
    for p in own_tree()[1:] + extra:
        c = cmd(p)
        short = next(
            (k for k in (*SHARED, *(f"ray::ServeReplica:{app}:{i}" for i in ingress)) if c.startswith(k)),
            None,
        )
        short = short or ("haproxy" if "bin/haproxy " in c else "redis" if p in extra else None)
        if short:
            groups["gateway_path"].append(p)
            groups.setdefault(f"gw/{short.rpartition(':')[2]}", []).append(p)
        elif c.startswith(f"ray::ServeReplica:{app}:{server}"):
            groups["pool_frontend"].append(p)
            groups["engine"].extend(p.children(recursive=True))
    return groups


def direct_ingress_base(app_name: str) -> str:
    """The app's ingress replica's own HTTP port (direct ingress, no proxy in front)."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller  # type: ignore[union-attr]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for group in ray.get(controller.get_target_groups.remote(app_name)):
            targets = [t for t in group.targets if "proxy" not in t.name.lower()]
            if str(group.protocol).upper().endswith("HTTP") and targets:
                return f"http://127.0.0.1:{targets[0].port}"
        time.sleep(0.5)
    raise TimeoutError(f"no direct-ingress target for {app_name}")


def start_tenancy(tmp: Path) -> tuple[dict[str, Any], Any]:
    """A gateway with tenancy needs Redis and a key: a private Redis, and the local profile's
    demo tenant (no limits) with a fresh key, sent to every target (the others ignore it)."""
    try:
        from services.local.redis_server import LocalRedis
        from services.tenancy.store import new_plain_key
    except ImportError:  # --source of a commit before tenancy
        return {}, None
    redis = LocalRedis(port=free_port(), directory=tmp / "redis")
    redis.start(appendonly=False)
    return {"redis_url": redis.url, "api_key": new_plain_key()[1]}, redis


def deploy_phiserve(port: int, proxy_mode: str, tenancy: dict[str, Any]) -> Target:
    """phiserve's application; its processes are found by `count_processes` once every app is
    up (HAProxy is replaced by a new process when an application is added)."""
    from services.app import APP_NAME
    from services.settings import Settings

    settings = Settings(port=port, cache_dir=REPO / ".cache", **tenancy)
    t0 = time.monotonic()
    base = deploy(settings, text_catalog())
    if proxy_mode == "direct":
        base = direct_ingress_base(APP_NAME)
        wait_http(f"{base}/ready", 120, "phiserve (replica port)")
    print(f"phiserve[{proxy_mode}]: ready after {time.monotonic() - t0:.1f} s at {base}", flush=True)
    return Target("phiserve", f"{base}/v1/chat/completions", {})


def deploy_rayllm(port: int, proxy_mode: str) -> Target:
    """Ray Serve LLM's OpenAI app beside phiserve in the same Serve instance."""
    from _gateway_rayllm import rayllm_app
    from ray import serve

    t0 = time.monotonic()
    app = rayllm_app(MODEL, SERVED, ENGINE_KWARGS, ENGINE_ENV)
    serve.run(app, name=RAYLLM_APP, route_prefix=RAYLLM_PREFIX, blocking=False)
    base = f"http://127.0.0.1:{port}"
    if proxy_mode == "direct":
        base = direct_ingress_base(RAYLLM_APP)
    wait_http(f"{base}{RAYLLM_PREFIX}/v1/models", 900, "Ray Serve LLM")
    print(
        f"rayllm[{proxy_mode}]: ready after {time.monotonic() - t0:.1f} s at {base}{RAYLLM_PREFIX}",
        flush=True,
    )
    return Target("rayllm", f"{base}{RAYLLM_PREFIX}/v1/chat/completions", {})


def settled_haproxy(timeout_s: float = 60.0, quiet_s: float = 5.0) -> None:
    """Serve replaces HAProxy with a new process when an application is added, some time after
    the application is ready: wait until one HAProxy has been running for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [p for p in own_tree() if "bin/haproxy " in cmd(p)]
        if len(found) == 1 and time.time() - found[0].create_time() > quiet_s:
            return
        time.sleep(0.5)
    print(f"WARNING: HAProxy did not settle in {timeout_s:.0f} s; its CPU may be missed", flush=True)


def count_processes(targets: list[Target], redis: Any, proxy_mode: str) -> None:
    """Fill in the groups of the Serve targets, after the last application is deployed."""
    from services.app import APP_NAME

    if proxy_mode == "haproxy":
        settled_haproxy()
    extra = [psutil.Process(int(redis.pidfile.read_text()))] if redis else []
    for target in targets:
        if target.name == "phiserve":
            target.groups = serve_groups(APP_NAME, ("gateway",), "pool-", extra)
        elif target.name == "rayllm":
            target.groups = serve_groups(RAYLLM_APP, ("OpenAiIngress",), "UniExecutorLLMServer", [])


def show(target: Target) -> None:
    for name, procs in target.groups.items():
        if "/" not in name:
            print("".join(f"  [{target.name} {name}] pid {p.pid}: {cmd(p)[:90]}\n" for p in procs), end="")

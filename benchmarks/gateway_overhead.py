"""What the phiserve gateway adds on top of calling the same vLLM engine directly.

One after the other (never both at once: 2 cores): `direct` = vLLM's OpenAI server on the tiny
Phi-3.5-mini model; `gateway` = phiserve (Ray Serve, the local profile's text pool only), same
model and engine settings. Same workload: POST /v1/chat/completions, fixed prompt, max_tokens=16,
ignore_eos, temperature 0; unary and streaming, at concurrency 1 and 16, after a warm-up.
Per mode: p50/p99 latency, TTFT (first SSE event with content), req/s, CPU-ms per request
(psutil user+system before/after) of `gateway_path` = ray::ProxyActor (+ ray::HAProxyManager,
haproxy), ray::ServeReplica:phiserve:gateway and, with tenancy, Redis; the pool replica (it holds
the engine, as the direct server does) is shown apart. Chunks of 250 requests during which other
jobs used more than --max-other-load cores are redone when the machine is quiet.
  RESULT gateway_overhead p50_ratio=X p99_ratio=Y throughput_ratio=Z cpu_ms_per_req=W
p50/p99_ratio: gateway/direct latency, unary c=1; throughput_ratio: gateway/direct req/s, unary
c=16; cpu_ms_per_req: gateway_path CPU-ms per request, unary c=1.
--proxy-mode: default = Serve's Python proxy on the HTTP port (http_options.port); direct =
RAY_SERVE_ENABLE_DIRECT_INGRESS=1, the gateway replica serves on its own port (30000-31000, from
the target groups; the HTTP port keeps a fallback proxy); haproxy = RAY_SERVE_ENABLE_HA_PROXY=1,
HAProxy on the HTTP port forwards to the replica's port. Tenancy (services.tenancy): a private
Redis and the demo tenant's fresh key, sent to both targets. --source DIR: the `services`
package to benchmark. --profile-seconds S: py-spy the gateway path under unary c=1 load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import uvloop
from _common import CACHE_DIR, REPO, deploy, free_port, pct, serve_session, text_catalog, wait_http
from _profile import summarise

MODEL_DIR = CACHE_DIR / "models"
SERVED, MAX_TOKENS, PROMPT = "phi-3.5-mini", 16, "Write one sentence about the sea."
CHUNK = 250  # requests measured between two CPU snapshots
MODES = [(False, 1), (False, 16), (True, 1), (True, 16)]  # (stream, concurrency)
ENGINE_ENV = {  # services.app.CPU_ENGINE_ENV, literal: importing services.app imports ray
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
Groups = dict[str, list[psutil.Process]]
HEADERS = {"content-type": "application/json"}  # + the tenant's key when the gateway has tenancy


def configure_env(mode: str, source: Path) -> Path | None:
    """Before `import ray`. Returns the HAProxy folder to delete afterwards."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(source))  # and for Ray workers (which also get the driver's cwd):
    os.chdir(source)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    if mode == "default":
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


def own_tree() -> list[psutil.Process]:
    return [psutil.Process(), *psutil.Process().children(recursive=True)]


def cmd(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline()).strip() or p.name()
    return ""


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])  # user + system
    return total


def snapshot(groups: Groups) -> dict[str, float]:
    snap = {name: cpu_s(procs) for name, procs in groups.items()}
    snap["client"] = cpu_s([psutil.Process()])
    snap["own"] = cpu_s(list(set(own_tree()).union(*groups.values())))  # + the daemonised Redis
    t = psutil.cpu_times()
    snap["machine_busy"] = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    snap["wall"] = time.monotonic()
    return snap


def other_load(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds the rest of the machine (other users' jobs) used between two snapshots."""
    return (after["machine_busy"] - before["machine_busy"]) - (after["own"] - before["own"])


async def one(session: Any, url: str, body: bytes, stream: bool) -> tuple[float, float | None]:
    t0, ttft = time.perf_counter(), None
    async with session.post(url, data=body, headers=HEADERS) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        if not stream:
            usage = json.loads(await r.read())["usage"]
        else:
            last = b""
            async for line in r.content:
                data = line[6:].strip() if line.startswith(b"data: ") else None
                if data == b"[DONE]":
                    break
                if (
                    data
                    and ttft is None
                    and (json.loads(data).get("choices") or [{}])[0].get("delta", {}).get("content")
                ):
                    ttft = time.perf_counter() - t0
                last = data or last
            usage = json.loads(last)["usage"]
    if usage["completion_tokens"] != MAX_TOKENS:
        raise RuntimeError(f"expected {MAX_TOKENS} tokens, got {usage['completion_tokens']}")
    return time.perf_counter() - t0, ttft


async def drive(
    url: str, n: int, conc: int, stream: bool, warmup: int, groups: Groups, max_other: float = float("inf")
) -> dict[str, Any]:
    """`n` requests at concurrency `conc` in chunks; a chunk during which other jobs used more
    than `max_other` cores is thrown away and redone once it is quiet (at most ~3x a chunk)."""
    import aiohttp

    request: dict[str, Any] = {
        "model": SERVED,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }
    body, errors = json.dumps(request).encode(), []
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def run(count: int, lat: list[float], ttft: list[float]) -> None:
            left = [count]

            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    try:
                        latency, first = await one(s, url, body, stream)
                    except Exception as exc:  # noqa: BLE001 (counted and reported)
                        errors.append(repr(exc)[:200])
                        continue
                    lat.append(latency)
                    ttft.extend([first] if first is not None else [])

            await asyncio.gather(*(worker() for _ in range(conc)))

        await run(warmup, [], [])
        errors.clear()
        lat: list[float] = []
        ttft: list[float] = []
        cpu: Counter[str] = Counter()
        done, wall, other, redone = 0, 0.0, 0.0, 0
        while done < n:
            chunk_lat: list[float] = []
            chunk_ttft: list[float] = []
            m = min(CHUNK, n - done)
            before = snapshot(groups)
            await run(m, chunk_lat, chunk_ttft)
            after = snapshot(groups)
            if other_load(before, after) > max_other * (after["wall"] - before["wall"]) and redone < 3 * (
                n // CHUNK + 1
            ):
                redone += 1
                for _ in range(30):  # wait (up to ~60 s) for a quiet machine
                    quiet = snapshot({})
                    await asyncio.sleep(2.0)
                    if other_load(quiet, snapshot({})) < 2.0 * max_other:
                        break
                continue
            done, lat, ttft = done + m, lat + chunk_lat, ttft + chunk_ttft
            wall, other = wall + after["wall"] - before["wall"], other + other_load(before, after)
            cpu.update({k: after[k] - before[k] for k in [*groups, "client"]})
    return {
        "stream": stream,
        "concurrency": conc,
        "requests": n,
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall,
        "req_s": len(lat) / wall,
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "cpu_ms_per_req": {k: v * 1e3 / n for k, v in cpu.items()},
        "foreign_cpu_pct": 100.0 * other / wall,
        "rejected_chunks": redone,
        "lost": sorted({f"{p.pid} {k}" for k, ps in groups.items() for p in ps if not p.is_running()}),
    }


def run_modes(url: str, args: argparse.Namespace, groups: Groups) -> list[dict]:
    out = []
    for stream, conc in MODES:
        warmup = max(4 * conc, args.requests // 10)
        out.append(
            res := uvloop.run(drive(url, args.requests, conc, stream, warmup, groups, args.max_other_load))
        )
        print(
            f"  {'stream' if stream else 'unary'} c={conc}: p50 {res['p50_ms']:.1f} ms, "
            f"{res['req_s']:.1f} req/s, errors {res['errors']} {res['first_errors'][:1]}, "
            f"{res['rejected_chunks']} chunk(s) redone for other load",
            flush=True,
        )
        if res["lost"]:  # e.g. a replica killed or replaced: its CPU is missing, the row is void
            print(f"  WARNING: processes gone during this phase: {res['lost']}", flush=True)
    return out


def bench_direct(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL_DIR / "phi-3.5-mini-tiny"),
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        "268435456",
        "--max-num-seqs",
        "32",
        "--scheduling-policy",
        "priority",
    ]  # the local profile's pools use priority too
    with open(tmp / "vllm-server.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **ENGINE_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        wait_http(f"http://127.0.0.1:{port}/health", 300, "vLLM server", proc)
        print(f"direct: vLLM OpenAI server ready on :{port} after {time.monotonic() - t0:.1f} s", flush=True)
        server = psutil.Process(proc.pid)
        groups = {"frontend": [server], "engine": server.children(recursive=True)}
        modes = run_modes(f"http://127.0.0.1:{port}/v1/chat/completions", args, groups)
        return {"url": f"http://127.0.0.1:{port}", "modes": modes}
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


def gateway_groups(redis: psutil.Process | None) -> Groups:
    """Searched in our own process tree only, so a parallel Ray cluster is never counted."""
    groups: Groups = {"gateway_path": [], "pool_frontend": [], "engine": []}
    for p in own_tree()[1:] + ([redis] if redis else []):
        c = cmd(p)
        short = next(
            (
                k
                for k in ("ray::ServeReplica:phiserve:gateway", "ray::ProxyActor", "ray::HAProxyManager")
                if c.startswith(k)
            ),
            "haproxy" if "bin/haproxy " in c else "redis" if p is redis else None,
        )
        if short:
            groups["gateway_path"].append(p)
            groups.setdefault(f"gw/{short.rpartition(':')[2]}", []).append(p)
        elif c.startswith("ray::ServeReplica:phiserve:pool-"):
            groups["pool_frontend"].append(p)
            groups["engine"].extend(p.children(recursive=True))
    return groups


def direct_ingress_url(app_name: str) -> str:
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
    raise TimeoutError("no direct-ingress target for the gateway")


def start_tenancy(tmp: Path) -> tuple[dict[str, Any], Any]:
    """A gateway with tenancy needs Redis and a key: a private Redis, and the local profile's
    demo tenant (no limits) with a fresh key; both targets get the same header."""
    try:
        from services.local.redis_server import LocalRedis
        from services.tenancy.store import new_plain_key
    except ImportError:
        return {}, None
    redis = LocalRedis(port=free_port(), directory=tmp / "redis")
    redis.start(appendonly=False)
    key = new_plain_key()[1]
    HEADERS["authorization"] = f"Bearer {key}"
    return {"redis_url": redis.url, "api_key": key}, redis


def bench_gateway(args: argparse.Namespace, tmp: Path, tenancy: dict[str, Any], redis: Any) -> dict[str, Any]:
    from services.app import APP_NAME
    from services.settings import Settings

    port = free_port()
    settings = Settings(port=port, cache_dir=REPO / ".cache", **tenancy)
    t0 = time.monotonic()
    with serve_session(port):
        base = deploy(settings, text_catalog())
        if args.proxy_mode == "direct":
            base = direct_ingress_url(APP_NAME)
            wait_http(f"{base}/ready", 120, "phiserve (replica port)")
        print(
            f"gateway[{args.proxy_mode}]: ready after {time.monotonic() - t0:.1f} s; requests to {base}"
            f" (HTTP port {port})",
            flush=True,
        )
        groups = gateway_groups(psutil.Process(int(redis.pidfile.read_text())) if redis else None)
        for name, procs in groups.items():
            print(
                "".join(f"  [{name}] pid {p.pid}: {cmd(p)[:90]}\n" for p in procs if "/" not in name), end=""
            )
        modes = run_modes(f"{base}/v1/chat/completions", args, groups)
        if args.profile_seconds:
            profile(f"{base}/v1/chat/completions", args, groups, modes[0]["req_s"], tmp)
        return {
            "url": base,
            "http_port": port,
            "modes": modes,
            "counted": {k: [f"{p.pid} {cmd(p)[:80]}" for p in v] for k, v in groups.items()},
        }


def profile(url: str, args: argparse.Namespace, groups: Groups, rate: float, tmp: Path) -> None:
    """py-spy on each Python process of the gateway path under unary c=1 load, sampling at 200 Hz
    the thread that holds the GIL: where the Python CPU goes (C++ core-worker threads are not seen)."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    spies = [(p, tmp / f"pyspy-{p.pid}.txt") for p in groups["gateway_path"] if cmd(p).startswith("ray::")]
    procs = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(p.pid),
                "--rate",
                "200",
                "--nonblocking",
                "--nolineno",
                "--gil",
                "-f",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p, out in spies
    ]
    time.sleep(1.0)  # py-spy attaches
    n = max(20, int(rate * args.profile_seconds))
    uvloop.run(drive(url, n, 1, False, 0, {}))
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        proc.wait(60)
    for p, out in spies:
        print(f"\nprofile of pid {p.pid} {cmd(p)[:50]}, {n} unary requests at c=1:")
        summarise(out, args.profile_top, n)


LAT_KEYS = ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "req_s")


def label(m: dict[str, Any]) -> str:
    return f"{'stream' if m['stream'] else 'unary'} c={m['concurrency']}"


def cols(values: list[Any], spec: str = ">8.1f") -> str:
    return " ".join(format(v, spec) if isinstance(v, float) else format(v or "-", spec[:2]) for v in values)


def report(results: dict[str, Any]) -> dict[str, float]:
    print(
        f"\n{'target':8} {'mode':10} {'n':>5} {cols(['p50 ms', 'p99 ms', 'ttft50', 'ttft99', 'req/s'])}"
        " err  CPU-ms/req by process group; other load on the machine"
    )
    for target in ("direct", "gateway"):
        for m in results[target]["modes"]:
            cpu = m["cpu_ms_per_req"]
            print(
                f"{target:8} {label(m):10} {m['requests']:5d} {cols([m[k] for k in LAT_KEYS])} "
                f"{m['errors']:3d}  "
                + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if "/" not in k)
                + f"; other {m['foreign_cpu_pct']:.0f}% of a core ({m['rejected_chunks']} redone)"
                + (f"; INVALID, processes gone: {m['lost']}" if m["lost"] else "")
            )
            if target == "gateway":
                print(
                    f"{'':86}gateway_path = "
                    + " + ".join(f"{k[3:]} {v:.2f}" for k, v in cpu.items() if k.startswith("gw/"))
                )
    print(
        f"\nratios gateway/direct:\n{'mode':10} {cols(['p50', 'p99', 'ttft50', 'ttft99', 'req/s'])}"
        " +ms p50 +ms p99"
    )
    for d, g in zip(results["direct"]["modes"], results["gateway"]["modes"], strict=True):
        results.setdefault("ratios", {})[label(d)] = r = {
            k: g[k] / d[k] if d[k] and g[k] else None for k in LAT_KEYS
        }
        print(
            f"{label(d):10} {cols([r[k] for k in LAT_KEYS], '>8.2f')} {g['p50_ms'] - d['p50_ms']:7.1f} "
            f"{g['p99_ms'] - d['p99_ms']:7.1f}"
        )
    (d0, d1), (g0, g1) = results["direct"]["modes"][:2], results["gateway"]["modes"][:2]
    return {
        "p50_ratio": g0["p50_ms"] / d0["p50_ms"],
        "p99_ratio": g0["p99_ms"] / d0["p99_ms"],
        "throughput_ratio": g1["req_s"] / d1["req_s"],
        "cpu_ms_per_req": g0["cpu_ms_per_req"]["gateway_path"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="measured requests per mode")
    parser.add_argument("--quick", action="store_true", help="smoke run: --requests 150")
    parser.add_argument("--proxy-mode", choices=["default", "direct", "haproxy"], default="default")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="redo a chunk when other jobs used more cores than this meanwhile",
    )
    parser.add_argument("--source", type=Path, default=REPO, help="folder holding the services package")
    parser.add_argument("--profile-seconds", type=int, default=0, help="py-spy the gateway path ~this long")
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    args.requests = 150 if args.quick else args.requests
    tmp = Path(tempfile.mkdtemp(prefix="phiserve-bench-"))
    hp = configure_env(args.proxy_mode, args.source.resolve())

    from services.local.tiny_models import build_tiny_models

    build_tiny_models(MODEL_DIR, log=lambda m: print(f"tiny models: {m}", flush=True))
    started = time.monotonic()
    results: dict[str, Any] = {
        "proxy_mode": args.proxy_mode,
        "requests": args.requests,
        "source": str(args.source),
        "loadavg_start": os.getloadavg(),
    }
    tenancy, redis = start_tenancy(tmp)
    results["tenancy"] = redis is not None
    try:
        results["direct"] = bench_direct(args, tmp)
        results["gateway"] = bench_gateway(args, tmp, tenancy, redis)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(hp or "", ignore_errors=True)
        if not args.profile_seconds:
            shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"], results["elapsed_s"] = os.getloadavg(), time.monotonic() - started
    results["result"] = result = report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"\nproxy mode {args.proxy_mode}, {args.requests} requests/mode, services from {args.source}"
        f"{' (tenancy on, Redis counted in gateway_path)' if redis else ''}, "
        f"{results['elapsed_s']:.0f} s, load average {results['loadavg_start'][0]:.1f} -> "
        f"{results['loadavg_end'][0]:.1f}" + (f", py-spy files in {tmp}" if args.profile_seconds else "")
    )
    print("RESULT gateway_overhead " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()

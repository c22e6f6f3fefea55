"""What the phiserve gateway adds on top of calling the same vLLM engine directly.

In one run, one after the other (never both at once: 2 cores): `direct` = vLLM's own OpenAI
server (subprocess) on the tiny Phi-3.5-mini model; `gateway` = phiserve (Ray Serve gateway +
the local profile's text pool only) on the same model with the same engine settings. Identical
workloads: POST /v1/chat/completions, fixed short prompt, max_tokens=16, ignore_eos, temperature
0; unary and streaming (with usage), at concurrency 1 and 16; `--requests` per mode after a
warm-up; aiohttp client on uvloop.

Per mode: p50/p99 latency, time to first token (first SSE event whose delta has content),
req/s, CPU-ms per request (psutil user+system, sampled before and after the measured phase).
`gateway_path` = the Serve processes a request crosses before the pool: ray::ProxyActor (plus
ray::HAProxyManager and haproxy in HAProxy mode) and ray::ServeReplica:phiserve:gateway. The
pool replica, which holds the engine as the direct server does, is shown apart, as are the
direct server's process, both engine cores, the client and the machine's other load.

  RESULT gateway_overhead p50_ratio=X p99_ratio=Y throughput_ratio=Z cpu_ms_per_req=W
p50/p99_ratio: gateway / direct latency, unary c=1; throughput_ratio: gateway / direct req/s,
unary c=16; cpu_ms_per_req: gateway_path CPU-ms per request in the unary c=1 phase.

--proxy-mode (exported before Ray starts; each Serve process reads it at import):
  default  Serve's Python proxy listens on the HTTP port (serve.start http_options.port).
  direct   RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the gateway replica serves HTTP on its own port
           (30000-31000, from the controller's target groups), where requests are sent; the
           HTTP port keeps only a fallback Python proxy.
  haproxy  RAY_SERVE_ENABLE_HA_PROXY=1 (implies direct ingress): HAProxy on the HTTP port
           forwards to the replica's port; an idle fallback proxy stays.
--source DIR: benchmark the `services` package under DIR (e.g. a `git archive` of a commit).
--profile-seconds S: py-spy the gateway path's Python processes under unary c=1 load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import uvloop

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / ".cache" / "models"
SERVED, MAX_TOKENS, PROMPT = "phi-3.5-mini", 16, "Write one sentence about the sea."
MODES = [(False, 1), (False, 16), (True, 1), (True, 16)]  # (stream, concurrency)
ENGINE_ENV = {  # services.app.CPU_ENGINE_ENV, literal: importing services.app imports ray
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
}
Groups = dict[str, list[psutil.Process]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 (not up yet)
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{what}: {url} not ready after {timeout_s:.0f} s ({last})")


def configure_env(mode: str, source: Path) -> Path | None:
    """Before `import ray`. Returns the HAProxy folder to delete afterwards."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(source))  # and for Ray workers (which also get the driver's cwd):
    os.chdir(source)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    if mode == "default":
        return None
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")  # fast shutdown
    if mode != "haproxy":
        return None
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    # Short: Serve adds a 56-character node id to each path, HAProxy takes socket paths <= 97.
    hp = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    for key, name in [("CONFIG_FILE_LOC", "haproxy.cfg"), ("SOCKET_PATH", "admin.sock"),
                      ("SERVER_STATE_FILE", "server-state"), ("METRICS_SOCKET_PATH", "metrics.sock"),
                      ("SERVER_STATE_BASE", "")]:
        os.environ[f"RAY_SERVE_HAPROXY_{key}"] = str(hp / name)
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))  # else 8404, 9101
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))  # on all interfaces
    return hp


def own_tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).strip() or p.name()
    except psutil.Error:
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
    snap["own_tree"] = cpu_s(own_tree())
    t = psutil.cpu_times()
    snap["machine_busy"] = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    snap["wall"] = time.monotonic()
    return snap


def idle_rate(groups: Groups, seconds: float = 3.0) -> dict[str, float]:
    """CPU-ms per second of each group without traffic (health checks, metrics pushes)."""
    before = snapshot(groups)
    time.sleep(seconds)
    after = snapshot(groups)
    return {k: (after[k] - before[k]) * 1000.0 / seconds for k in groups}


def pct(values: list[float], q: float) -> float | None:  # in ms, linear interpolation
    v, k = sorted(values), (len(values) - 1) * q
    return 1e3 * (v[int(k)] + (v[min(int(k) + 1, len(v) - 1)] - v[int(k)]) * (k - int(k))) if v else None


def body_for(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": SERVED, "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def one(session: Any, url: str, body: bytes, stream: bool) -> tuple[float, float | None]:
    t0, ttft = time.perf_counter(), None
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        if not stream:
            usage = json.loads(await r.read())["usage"]
        else:
            last = b""
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                if ttft is None and ((json.loads(data).get("choices") or [{}])[0]
                                     .get("delta", {}).get("content")):
                    ttft = time.perf_counter() - t0
                last = data
            usage = json.loads(last)["usage"]
    if usage["completion_tokens"] != MAX_TOKENS:
        raise RuntimeError(f"expected {MAX_TOKENS} tokens, got {usage['completion_tokens']}")
    return time.perf_counter() - t0, ttft


async def drive(url: str, n: int, conc: int, stream: bool, warmup: int, groups: Groups) -> dict[str, Any]:
    import aiohttp

    body, lat, ttft, errors = body_for(stream), [], [], []
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def run(count: int, record: bool) -> None:
            left = [count]

            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    try:
                        latency, first = await one(s, url, body, stream)
                    except Exception as exc:  # noqa: BLE001 (counted and reported)
                        errors.append(repr(exc)[:200])
                        continue
                    if record:
                        lat.append(latency)
                        ttft.extend([first] if first is not None else [])

            await asyncio.gather(*(worker() for _ in range(conc)))

        await run(warmup, record=False)
        errors.clear()
        before = snapshot(groups)
        await run(n, record=True)
        after = snapshot(groups)
    wall = after["wall"] - before["wall"]
    foreign = (after["machine_busy"] - before["machine_busy"]) - (after["own_tree"] - before["own_tree"])
    return {"stream": stream, "concurrency": conc, "requests": n, "errors": len(errors),
            "first_errors": errors[:3], "wall_s": wall, "req_s": len(lat) / wall,
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "cpu_ms_per_req": {k: (after[k] - before[k]) * 1e3 / n for k in [*groups, "client"]},
            "foreign_cpu_pct": 100.0 * foreign / wall}


def run_modes(url: str, args: argparse.Namespace, groups: Groups) -> list[dict]:
    out = []
    for stream, conc in MODES:
        warmup = max(4 * conc, args.requests // 10)
        res = uvloop.run(drive(url, args.requests, conc, stream, warmup, groups))
        print(f"  {'stream' if stream else 'unary'} c={conc}: p50 {res['p50_ms']:.1f} ms, "
              f"{res['req_s']:.1f} req/s, errors {res['errors']} {res['first_errors'][:1]}", flush=True)
        out.append(res)
    return out


def bench_direct(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(MODEL_DIR / "phi-3.5-mini-tiny"), "--served-model-name", SERVED,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
            "--enforce-eager", "--kv-cache-memory-bytes", "268435456", "--max-num-seqs", "32",
            "--scheduling-policy", "priority"]  # the local profile's pools use priority too
    with open(tmp / "vllm-server.log", "wb") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **ENGINE_ENV}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    print(f"direct: vLLM OpenAI server on :{port}", flush=True)
    try:
        t0 = time.monotonic()
        wait_http(f"http://127.0.0.1:{port}/health", 300, "vLLM server", proc)
        print(f"direct: ready after {time.monotonic() - t0:.1f} s", flush=True)
        server = psutil.Process(proc.pid)
        groups = {"frontend": [server], "engine": server.children(recursive=True)}
        idle = idle_rate(groups)
        modes = run_modes(f"http://127.0.0.1:{port}/v1/chat/completions", args, groups)
        return {"url": f"http://127.0.0.1:{port}", "modes": modes, "idle_cpu_ms_per_s": idle}
    except BaseException:
        print((tmp / "vllm-server.log").read_text()[-3000:], file=sys.stderr)  # why it failed
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gateway_groups() -> Groups:
    """Searched in our own process tree only, so a parallel Ray cluster is never counted."""
    groups: Groups = {"gateway_path": [], "pool_frontend": [], "engine": []}
    for p in own_tree()[1:]:
        c = cmd(p)
        short = next((k for k in ("ray::ServeReplica:phiserve:gateway", "ray::ProxyActor",
                                  "ray::HAProxyManager") if c.startswith(k)),
                     "haproxy" if "bin/haproxy " in c else None)
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

    controller = _get_global_client()._controller
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for group in ray.get(controller.get_target_groups.remote(app_name)):
            targets = [t for t in group.targets if "proxy" not in t.name.lower()]
            if str(group.protocol).upper().endswith("HTTP") and targets:
                return f"http://127.0.0.1:{targets[0].port}"
        time.sleep(0.5)
    raise TimeoutError("no direct-ingress target for the gateway")


def bench_gateway(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ray
    from ray import serve

    from services.app import APP_NAME, build_app
    from services.catalog.loader import load_catalog
    from services.settings import Settings

    port = free_port()
    catalog = load_catalog("local")
    catalog = catalog.model_copy(update={"pools": [p for p in catalog.pools if p.name == "text"]})
    settings = Settings(port=port, cache_dir=REPO / ".cache")
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, catalog), name=APP_NAME, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/ready", 600, "phiserve (HTTP port)")
        if args.proxy_mode == "direct":
            base = direct_ingress_url(APP_NAME)
            wait_http(f"{base}/ready", 120, "phiserve (replica port)")
        print(f"gateway[{args.proxy_mode}]: ready after {time.monotonic() - t0:.1f} s; requests to {base}"
              f" (HTTP port {port})", flush=True)
        groups = gateway_groups()
        for name, procs in groups.items():
            print("".join(f"  [{name}] pid {p.pid}: {cmd(p)[:90]}\n" for p in procs), end="")
        idle = idle_rate(groups)
        print("  idle CPU-ms/s: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()), flush=True)
        modes = run_modes(f"{base}/v1/chat/completions", args, groups)
        if args.profile_seconds:
            profile(f"{base}/v1/chat/completions", args, groups, modes[0]["req_s"], tmp)
        return {"url": base, "http_port": port, "modes": modes, "idle_cpu_ms_per_s": idle,
                "counted": {k: [f"{p.pid} {cmd(p)[:80]}" for p in v] for k, v in groups.items()}}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def profile(url: str, args: argparse.Namespace, groups: Groups, rate: float, tmp: Path) -> None:
    """py-spy on each Python process of the gateway path under unary c=1 load, sampling at 200 Hz
    the thread that holds the GIL: where the Python CPU goes (C++ core-worker threads are not seen)."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    spies = [(p, tmp / f"pyspy-{p.pid}.txt") for p in groups["gateway_path"] if cmd(p).startswith("ray::")]
    procs = [subprocess.Popen([spy, "record", "--pid", str(p.pid), "--rate", "200", "--nonblocking",
                               "--nolineno", "--gil", "-f", "raw", "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p, out in spies]
    time.sleep(1.0)  # py-spy attaches
    n = max(20, int(rate * args.profile_seconds))
    uvloop.run(drive(url, n, 1, False, 0, {}))
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        proc.wait(60)
    for p, out in spies:
        print(f"\nprofile of pid {p.pid} {cmd(p)[:50]}, {n} unary requests at c=1:")
        summarise(out, args.profile_top, n)


AREAS = [("services/", "phiserve code"), ("fastapi/", "fastapi"), ("starlette/", "starlette"),
         ("pydantic", "pydantic"), ("uvicorn/", "uvicorn"), ("h11", "h11"), ("ray/serve/", "ray serve"),
         ("ray/", "ray core"), ("logging/", "logging"), ("asyncio/", "asyncio"), ("json/", "json")]


def summarise(path: Path, top: int, requests: int) -> None:
    self_n, area, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, n = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if not n.isdigit() or not frames:
            continue
        total += int(n)
        self_n[frames[-1]] += int(n)
        area[next((name for f in reversed(frames) for key, name in AREAS if key in f), "other")] += int(n)
    if not total:
        print("  (no samples)")
        return
    print(f"  {total} samples = {5.0 * total / requests:.2f} ms holding the GIL per request; by area of"
          " the innermost recognised frame: "
          + ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in area.most_common()))
    print(f"  top {top} functions by own samples:")
    for f, n in self_n.most_common(top):
        print(f"    {100 * n / total:5.1f}%  {f[:140]}")


LAT_KEYS = ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "req_s")


def label(m: dict[str, Any]) -> str:
    return f"{'stream' if m['stream'] else 'unary'} c={m['concurrency']}"


def cols(values: list[Any], spec: str = ">8.1f") -> str:
    return " ".join(format(v, spec) if isinstance(v, float) else format(v or "-", spec[:2]) for v in values)


def report(results: dict[str, Any]) -> dict[str, float]:
    print(f"\n{'target':8} {'mode':10} {'n':>5} {cols(['p50 ms', 'p99 ms', 'ttft50', 'ttft99', 'req/s'])}"
          " err  CPU-ms/req by process group; other load on the machine")
    for target in ("direct", "gateway"):
        for m in results[target]["modes"]:
            cpu = m["cpu_ms_per_req"]
            print(f"{target:8} {label(m):10} {m['requests']:5d} {cols([m[k] for k in LAT_KEYS])} "
                  f"{m['errors']:3d}  " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if "/" not in k)
                  + f"; other {m['foreign_cpu_pct']:.0f}% of a core")
            if target == "gateway":
                print(f"{'':86}gateway_path = " + " + ".join(
                    f"{k[3:]} {v:.2f}" for k, v in cpu.items() if k.startswith("gw/")))
    print(f"\nratios gateway/direct:\n{'mode':10} {cols(['p50', 'p99', 'ttft50', 'ttft99', 'req/s'])}"
          " +ms p50 +ms p99")
    ratios = {}
    for d, g in zip(results["direct"]["modes"], results["gateway"]["modes"], strict=True):
        ratios[label(d)] = r = {k: g[k] / d[k] if d[k] and g[k] else None for k in LAT_KEYS}
        print(f"{label(d):10} {cols([r[k] for k in LAT_KEYS], '>8.2f')} {g['p50_ms'] - d['p50_ms']:7.1f} "
              f"{g['p99_ms'] - d['p99_ms']:7.1f}")
    results["ratios"] = ratios
    (d0, d1), (g0, g1) = results["direct"]["modes"][:2], results["gateway"]["modes"][:2]
    return {"p50_ratio": g0["p50_ms"] / d0["p50_ms"], "p99_ratio": g0["p99_ms"] / d0["p99_ms"],
            "throughput_ratio": g1["req_s"] / d1["req_s"],
            "cpu_ms_per_req": g0["cpu_ms_per_req"]["gateway_path"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="measured requests per mode")
    parser.add_argument("--quick", action="store_true", help="smoke run: --requests 150")
    parser.add_argument("--proxy-mode", choices=["default", "direct", "haproxy"], default="default")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--source", type=Path, default=REPO, help="folder holding the services package")
    parser.add_argument("--profile-seconds", type=int, default=0, help="py-spy the gateway path ~this long")
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    args.requests = 150 if args.quick else args.requests
    tmp = Path(tempfile.mkdtemp(prefix="phiserve-bench-"))
    hp = configure_env(args.proxy_mode, args.source.resolve())

    from services.catalog.tiny import build_tiny_models

    build_tiny_models(MODEL_DIR, log=lambda m: print(f"tiny models: {m}", flush=True))
    started = time.monotonic()
    results: dict[str, Any] = {"proxy_mode": args.proxy_mode, "requests": args.requests,
                               "source": str(args.source), "loadavg_start": os.getloadavg()}
    try:
        results["direct"] = bench_direct(args, tmp)
        results["gateway"] = bench_gateway(args, tmp)
    finally:
        shutil.rmtree(hp or "", ignore_errors=True)
        if not args.profile_seconds:
            shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"], results["elapsed_s"] = os.getloadavg(), time.monotonic() - started
    results["result"] = result = report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\nproxy mode {args.proxy_mode}, {args.requests} requests/mode, services from {args.source}, "
          f"{results['elapsed_s']:.0f} s, load average {results['loadavg_start'][0]:.1f} -> "
          f"{results['loadavg_end'][0]:.1f}" + (f", py-spy files in {tmp}" if args.profile_seconds else ""))
    print("RESULT gateway_overhead " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()

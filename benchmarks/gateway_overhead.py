"""What the phiserve gateway adds on top of calling the same vLLM engine directly, and what Ray
Serve LLM's OpenAI app adds, measured interleaved in one run.

Targets, all alive at once (one engine each, same tiny Phi-3.5-mini model and engine settings:
the local profile's text pool, `_gateway_targets.ENGINE_KWARGS`):
- `direct`: vLLM's own OpenAI server, a process of its own;
- `phiserve`: the local profile's text pool behind phiserve's gateway (auth, admission and fair
  queue in a private Redis; the demo tenant's fresh key), Serve application `phiserve` on `/`;
- `rayllm` (`--peer rayllm`, the default; `--peer none` leaves it out): Ray Serve LLM's OpenAI
  app (`ray.serve.llm.build_openai_app`, needs the `bench` extra: pyarrow, jsonref) on the CPU
  backend, one `{"CPU": 1}` bundle, no replica CPU, with vLLM's `uni` executor as phiserve and
  `vllm serve` run it (`_gateway_rayllm.py`; Ray Serve LLM would force `mp`), Serve application
  `rayllm` on `/rayllm` in the same Serve instance. Its stream batching is its default (50 ms).
Workload: POST /v1/chat/completions, fixed prompt, max_tokens=16, ignore_eos, temperature 0;
unary and streaming, at concurrency 1 and 16, after a warm-up per target. Each mode is measured
in alternating chunks (--chunk requests: direct, phiserve, rayllm, then from the next target
on), so the machine's drift hits all alike. Per target and mode: p50/p99 latency, TTFT (first
SSE event with content), req/s, CPU-ms per request (psutil user+system around each chunk) of
- `gateway_path`: every Serve process but the one holding the engine: HAProxy (+ its manager,
  + Serve's fallback proxy; shared by both apps and counted for the one whose chunk ran: chunks
  never overlap) or Serve's proxy, the app's ingress replica, and for phiserve its Redis;
- `pool_frontend`: the replica holding the engine (phiserve's pool, Ray Serve LLM's LLMServer);
- `engine`: that replica's children (vLLM's engine core); direct: `frontend` + `engine`.
gw/engine = gateway_path CPU / engine CPU in the same chunks: it repeats between runs where the
machine's speed does not. Chunks during which other jobs used more than --max-other-load cores
are redone when the machine is quiet.
  RESULT gateway_overhead p50_ratio=X p99_ratio=Y throughput_ratio=Z cpu_ms_per_req=W
  RESULT gateway_vs_rayllm p50_ratio=X cpu_ratio=Y ttft_ratio=Z
  RESULT gw_engine phiserve=X rayllm=Y
  RESULT rayllm_overhead p50_ratio=X throughput_ratio=Y ttft_ratio=Z cpu_ms_per_req=W
gateway_overhead: phiserve/direct; p50/p99 latency at unary c=1, req/s at unary c=16,
cpu_ms_per_req = phiserve's gateway_path CPU-ms per request at unary c=1. gateway_vs_rayllm:
phiserve/Ray Serve LLM; p50 unary c=1, gateway_path CPU-ms/req unary c=1, TTFT p50 stream c=1.
gw_engine: unary c=1. rayllm_overhead: Ray Serve LLM/direct, as gateway_overhead (+ TTFT).
Env: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the whole Ray cluster (both apps) unless
--no-throughput-optimized. --proxy-mode: default = Serve's Python proxy on the HTTP port;
direct = RAY_SERVE_ENABLE_DIRECT_INGRESS=1, clients call each app's ingress replica on its own
port; haproxy = RAY_SERVE_ENABLE_HA_PROXY=1, HAProxy on the HTTP port forwards to the replicas.
--source DIR: the `services` package to benchmark. --profile-seconds S: py-spy phiserve's
gateway path under unary c=1 load after the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from _common import CACHE_DIR, REPO, free_port, serve_session
from _gateway_measure import Target, cmd, load, measure_mode
from _gateway_targets import (
    configure_env,
    count_processes,
    deploy_phiserve,
    deploy_rayllm,
    direct_vllm,
    show,
    start_tenancy,
)
from _profile import summarise

MODES = [(False, 1), (False, 16), (True, 1), (True, 16)]  # (stream, concurrency)
LAT_KEYS = ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "req_s")


def run_modes(targets: list[Target], headers: dict[str, str], args: argparse.Namespace) -> None:
    """Every mode on every target, interleaved; results go to `args.results[target]`."""
    for stream, conc in MODES:
        warmup = max(4 * conc, args.requests // 10)
        by_target = uvloop.run(
            measure_mode(
                targets,
                headers,
                stream=stream,
                conc=conc,
                n=args.requests,
                chunk=args.chunk,
                warmup=warmup,
                max_other=args.max_other_load,
            )
        )
        for name, res in by_target.items():
            args.results[name]["modes"].append(res)
            print(
                f"  {name:8} {'stream' if stream else 'unary'} c={conc}: p50 {res['p50_ms'] or 0:.1f} ms, "
                f"{res['req_s']:.1f} req/s, errors {res['errors']} {res['first_errors'][:1]}, "
                f"{res['rejected_chunks']} chunk(s) redone for other load",
                flush=True,
            )
            if res["lost"]:  # e.g. a replica killed or replaced: its CPU is missing, the row is void
                print(f"  WARNING: {name}: processes gone during this phase: {res['lost']}", flush=True)


def profile(
    target: Target, headers: dict[str, str], args: argparse.Namespace, rate: float, tmp: Path
) -> None:
    """py-spy on each Python process of the gateway path under unary c=1 load, sampling at 200 Hz
    the thread that holds the GIL: where the Python CPU goes (C++ core-worker threads are not seen)."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    spies = [
        (p, tmp / f"pyspy-{p.pid}.txt") for p in target.groups["gateway_path"] if cmd(p).startswith("ray::")
    ]
    flags = ["--rate", "200", "--nonblocking", "--nolineno", "--gil", "-f", "raw"]
    procs = [
        subprocess.Popen(
            [spy, "record", "--pid", str(p.pid), *flags, "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p, out in spies
    ]
    time.sleep(1.0)  # py-spy attaches
    n = max(20, int(rate * args.profile_seconds))
    uvloop.run(load(target.url, headers, n, 1, False))
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        proc.wait(60)
    for p, out in spies:
        print(f"\nprofile of pid {p.pid} {cmd(p)[:50]}, {n} unary requests at c=1:")
        summarise(out, args.profile_top, n)


def label(m: dict[str, Any]) -> str:
    return f"{'stream' if m['stream'] else 'unary'} c={m['concurrency']}"


def cols(values: list[Any], spec: str = ">8.1f") -> str:
    return " ".join(format(v, spec) if isinstance(v, float) else format(v or "-", spec[:2]) for v in values)


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def report(results: dict[str, Any], names: list[str]) -> dict[str, dict[str, float | None]]:
    print(
        f"\n{'target':8} {'mode':10} {'n':>5} {cols(['p50 ms', 'p99 ms', 'ttft50', 'ttft99', 'req/s'])}"
        " err  CPU-ms/req by process group; gw/engine; other load on the machine"
    )
    for target in names:
        for m in results[target]["modes"]:
            cpu = m["cpu_ms_per_req"]
            gw_engine = div(cpu.get("gateway_path"), cpu.get("engine"))
            print(
                f"{target:8} {label(m):10} {m['requests']:5d} {cols([m[k] for k in LAT_KEYS])} "
                f"{m['errors']:3d}  "
                + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if "/" not in k)
                + (f"; gw/engine {gw_engine:.3f}" if gw_engine else "")
                + f"; other {m['foreign_cpu_pct']:.0f}% of a core ({m['rejected_chunks']} redone)"
                + (f"; INVALID, processes gone: {m['lost']}" if m["lost"] else "")
            )
            if "gateway_path" in cpu:
                print(
                    f"{'':86}gateway_path = "
                    + " + ".join(f"{k[3:]} {v:.2f}" for k, v in cpu.items() if k.startswith("gw/"))
                )
    pairs = [("phiserve", "direct")] + (
        [("rayllm", "direct"), ("phiserve", "rayllm")] if "rayllm" in names else []
    )
    for a, b in pairs:
        print(
            f"\nratios {a}/{b}:\n{'mode':10} {cols(['p50', 'p99', 'ttft50', 'ttft99', 'req/s'])} +ms p50 +ms p99"
        )
        for ma, mb in zip(results[a]["modes"], results[b]["modes"], strict=True):
            r = {k: div(ma[k], mb[k]) for k in LAT_KEYS}
            results.setdefault("ratios", {}).setdefault(f"{a}/{b}", {})[label(ma)] = r
            print(
                f"{label(ma):10} {cols([r[k] for k in LAT_KEYS], '>8.2f')} "
                f"{(ma['p50_ms'] or 0) - (mb['p50_ms'] or 0):7.1f} {(ma['p99_ms'] or 0) - (mb['p99_ms'] or 0):7.1f}"
            )
    modes = {name: results[name]["modes"] for name in names}  # [unary 1, unary 16, stream 1, stream 16]
    gw = {name: m[0]["cpu_ms_per_req"].get("gateway_path") for name, m in modes.items()}
    gw_engine = {name: div(gw[name], m[0]["cpu_ms_per_req"].get("engine")) for name, m in modes.items()}
    out: dict[str, dict[str, float | None]] = {
        "gateway_overhead": {
            "p50_ratio": div(modes["phiserve"][0]["p50_ms"], modes["direct"][0]["p50_ms"]),
            "p99_ratio": div(modes["phiserve"][0]["p99_ms"], modes["direct"][0]["p99_ms"]),
            "throughput_ratio": div(modes["phiserve"][1]["req_s"], modes["direct"][1]["req_s"]),
            "cpu_ms_per_req": gw["phiserve"],
        }
    }
    if "rayllm" in names:
        out["gateway_vs_rayllm"] = {
            "p50_ratio": div(modes["phiserve"][0]["p50_ms"], modes["rayllm"][0]["p50_ms"]),
            "cpu_ratio": div(gw["phiserve"], gw["rayllm"]),
            "ttft_ratio": div(modes["phiserve"][2]["ttft_p50_ms"], modes["rayllm"][2]["ttft_p50_ms"]),
        }
        out["gw_engine"] = {"phiserve": gw_engine["phiserve"], "rayllm": gw_engine["rayllm"]}
        out["rayllm_overhead"] = {
            "p50_ratio": div(modes["rayllm"][0]["p50_ms"], modes["direct"][0]["p50_ms"]),
            "throughput_ratio": div(modes["rayllm"][1]["req_s"], modes["direct"][1]["req_s"]),
            "ttft_ratio": div(modes["rayllm"][2]["ttft_p50_ms"], modes["direct"][2]["ttft_p50_ms"]),
            "cpu_ms_per_req": gw["rayllm"],
        }
    else:
        out["gw_engine"] = {"phiserve": gw_engine["phiserve"]}
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="measured requests per mode and target")
    parser.add_argument("--quick", action="store_true", help="smoke run: --requests 150")
    parser.add_argument("--chunk", type=int, default=100, help="requests per chunk (targets alternate)")
    parser.add_argument("--proxy-mode", choices=["default", "direct", "haproxy"], default="default")
    parser.add_argument(
        "--peer", choices=["rayllm", "none"], default="rayllm", help="Ray Serve LLM beside phiserve"
    )
    parser.add_argument(
        "--no-throughput-optimized",
        dest="throughput_optimized",
        action="store_false",
        help="leave RAY_SERVE_THROUGHPUT_OPTIMIZED unset",
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="redo a chunk when other jobs used more cores than this meanwhile",
    )
    parser.add_argument("--source", type=Path, default=REPO, help="folder holding the services package")
    parser.add_argument(
        "--profile-seconds", type=int, default=0, help="py-spy phiserve's gateway path ~this long"
    )
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    args.requests = 150 if args.quick else args.requests
    return args


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="phiserve-bench-"))
    hp = configure_env(args.proxy_mode, args.source.resolve(), throughput_optimized=args.throughput_optimized)

    from services.local.tiny_models import build_tiny_models

    build_tiny_models(CACHE_DIR / "models", log=lambda m: print(f"tiny models: {m}", flush=True))
    started = time.monotonic()
    names = ["direct", "phiserve"] + (["rayllm"] if args.peer == "rayllm" else [])
    results: dict[str, Any] = {
        "proxy_mode": args.proxy_mode,
        "throughput_optimized": args.throughput_optimized,
        "requests": args.requests,
        "chunk": args.chunk,
        "source": str(args.source),
        "loadavg_start": os.getloadavg(),
        **{name: {"modes": []} for name in names},
    }
    args.results = results
    tenancy, redis = start_tenancy(tmp)
    headers = {"content-type": "application/json"}
    if tenancy:
        headers["authorization"] = f"Bearer {tenancy['api_key']}"
    port = free_port()
    try:
        with direct_vllm(tmp) as direct, serve_session(port):
            targets = [direct, deploy_phiserve(port, args.proxy_mode, tenancy)]
            if args.peer == "rayllm":
                targets.append(deploy_rayllm(port, args.proxy_mode))
            count_processes(targets, redis, args.proxy_mode)
            for target in targets:
                show(target)
                results[target.name]["url"] = target.url
                results[target.name]["counted"] = {
                    k: [f"{p.pid} {cmd(p)[:80]}" for p in v] for k, v in target.groups.items()
                }
            run_modes(targets, headers, args)
            if args.profile_seconds:
                profile(targets[1], headers, args, results["phiserve"]["modes"][0]["req_s"], tmp)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(hp or "", ignore_errors=True)
        if not args.profile_seconds:
            shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"], results["elapsed_s"] = os.getloadavg(), time.monotonic() - started
    results["result"] = result = report(results, names)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"\nproxy mode {args.proxy_mode}, throughput-optimized {'on' if args.throughput_optimized else 'off'}, "
        f"{args.requests} requests/mode/target in chunks of {args.chunk}, services from {args.source}"
        f"{' (tenancy on, Redis counted in gateway_path)' if redis else ''}, "
        f"{results['elapsed_s']:.0f} s, load average {results['loadavg_start'][0]:.1f} -> "
        f"{results['loadavg_end'][0]:.1f}" + (f", py-spy files in {tmp}" if args.profile_seconds else "")
    )
    for name, values in result.items():
        print(
            f"RESULT {name} "
            + " ".join(f"{k}={v:.3f}" if v is not None else f"{k}=nan" for k, v in values.items())
        )


if __name__ == "__main__":
    main()

"""Streaming tokens/s through the phiserve gateway against bare vLLM `AsyncLLM`, in one run.

Workload: `--streams` (16) concurrent chat streams of `--tokens` (128) tokens each (fixed prompt,
temperature 0, ignore_eos), started together; one such batch is a round.
* bare: vLLM's `AsyncLLM` in a subprocess of its own (this script with --bare-worker), on the
  tiny Phi-3.5-mini with the local profile's text-pool engine settings (read from the catalog,
  plus the structured-output backend the pool sets), the same environment as the pool replica
  (services.app.CPU_ENGINE_ENV) and delta outputs, as the pool asks for them. The prompt is the
  chat template's rendering of the same message, so both prefill the same tokens.
* gateway: phiserve as `phiserve up` runs it (`services.ray_env.ray_process_env("haproxy")`:
  HAProxy in front, a private Redis, tenancy on; --throughput-optimized: Serve's opt-in mode), REST SSE
  with include_usage, through `_common.local_phiserve`.
Rounds alternate (bare, gateway, bare, gateway, ...) after a warm-up round of each, so the
machine's drift hits both alike. Per round: tokens/s (tokens / wall time of the round), TTFT
p50 (request start to the first chunk with text). CPU-ms per streamed token by process (psutil
user+system around each round): bare = its frontend (the AsyncLLM process) and engine core;
gateway = gateway replica, pool replica, engine core, and the rest of the path (HAProxy,
Redis, Serve's proxy and its HAProxy manager).
  RESULT streaming tokens_per_s_ratio=X ttft_p50_ratio=Y
X = gateway / bare tokens/s summed over all rounds; Y = gateway / bare TTFT p50 over all streams.

  .venv/bin/python benchmarks/streaming.py [--rounds 20] [--profile-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import uvloop
from _common import CACHE_DIR, REPO, ChatSession, free_port, local_phiserve, pct, sse_data

sys.path.insert(0, str(REPO))
SERVED, PROMPT = "phi-3.5-mini", "Write a long story about the sea."
ENGINE_ENV = {  # services.app.CPU_ENGINE_ENV, literal: importing services.app imports ray
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
PREFIX = f"phiserve-stream-{os.getpid()}-"
Groups = dict[str, list[psutil.Process]]


# -- the bare engine (runs in its own process) -------------------------------------------------


async def bare_worker() -> None:
    """Build the AsyncLLM, say `ready <prompt tokens>`, then run one round per stdin line
    (`<streams> <tokens>`), answering with one JSON line on stdout (vLLM logs to stdout too: its
    logs go to stderr instead)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from services.catalog.loader import load_catalog

    pool = next(p for p in load_catalog("local").pools if p.name == "text")
    args = AsyncEngineArgs(
        model=str(CACHE_DIR / "models" / "phi-3.5-mini-tiny"),
        served_model_name=SERVED,
        disable_log_stats=False,
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        **pool.engine.to_engine_kwargs(),
    )
    engine = AsyncLLM.from_engine_args(args)
    tokenizer = engine.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    print(f"ready {len(tokenizer.encode(prompt, add_special_tokens=False))}", file=answers, flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        streams, tokens = map(int, line.split())
        params = SamplingParams(
            max_tokens=tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )

        async def one(params: Any = params) -> tuple[float | None, int]:
            t0, first, count = time.perf_counter(), None, 0
            async for out in engine.generate({"prompt": prompt}, params, uuid.uuid4().hex):
                for completion in out.outputs:
                    if first is None and completion.text:
                        first = time.perf_counter() - t0
                    count += len(completion.token_ids)
            return first, count

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(streams)))
        wall = time.perf_counter() - t0
        answer = {"wall": wall, "ttft": [r[0] for r in results], "tokens": [r[1] for r in results]}
        print(json.dumps(answer), file=answers, flush=True)
    engine.shutdown()


class Bare:
    def __init__(self, log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bare-worker"],
            env={**os.environ, **ENGINE_ENV},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"bare AsyncLLM did not start (log: {log})")
        self.prompt_tokens = int(line.split()[1])
        me = psutil.Process(self.proc.pid)
        self.groups: Groups = {"frontend": [me], "engine_core": me.children(recursive=True)}

    def round(self, streams: int, tokens: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{streams} {tokens}\n".encode())
        self.proc.stdin.flush()
        out: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return out

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


# -- the gateway (REST SSE client) -------------------------------------------------------------


class Gateway(ChatSession):
    async def one(self, tokens: int) -> tuple[float | None, int, int]:
        body = {
            "model": SERVED,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0, first, last = time.perf_counter(), None, b""
        async with self._session.post(self._url, data=json.dumps(body), headers=self._headers) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
            async for data in sse_data(r.content):
                if first is None and b'"content":"' in data and b'"content":""' not in data:
                    first = time.perf_counter() - t0
                last = data
        usage = json.loads(last)["usage"]
        return first, usage["completion_tokens"], usage["prompt_tokens"]

    async def round(self, streams: int, tokens: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self.one(tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
        return {
            "wall": wall,
            "ttft": [r[0] for r in results],
            "tokens": [r[1] for r in results],
            "prompt_tokens": results[0][2],
        }


def gateway_groups(prefix: str) -> Groups:
    groups: Groups = {"gateway": [], "pool": [], "engine_core": [], "rest_of_path": []}
    for p in psutil.Process().children(recursive=True):
        c = cmd(p)
        if c.startswith("ray::ServeReplica:phiserve:gateway"):
            groups["gateway"].append(p)
        elif c.startswith("ray::ServeReplica:phiserve:pool-"):
            groups["pool"].append(p)
            groups["engine_core"].extend(p.children(recursive=True))
        elif c.startswith(("ray::ProxyActor", "ray::HAProxyManager")) or "bin/haproxy " in c:
            groups["rest_of_path"].append(p)
    for pidfile in glob.glob(f"{tempfile.gettempdir()}/{prefix}*/redis/redis.pid"):
        groups["rest_of_path"].append(psutil.Process(int(Path(pidfile).read_text())))
    return groups


# -- measuring -----------------------------------------------------------------------------------


def cmd(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline()).strip() or p.name()
    return ""


def cpu(groups: Groups) -> dict[str, float]:
    out = {}
    for name, procs in groups.items():
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += sum(p.cpu_times()[:2])
        out[name] = total
    return out


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.wall = 0.0
        self.tokens = 0
        self.ttft: list[float] = []
        self.missing_ttft = 0
        self.cpu: Counter[str] = Counter()

    def add(self, result: dict[str, Any], before: dict[str, float], after: dict[str, float]) -> str:
        tokens = sum(result["tokens"])
        self.wall += result["wall"]
        self.tokens += tokens
        self.ttft += [t for t in result["ttft"] if t is not None]
        self.missing_ttft += sum(t is None for t in result["ttft"])
        self.cpu.update({k: after[k] - before[k] for k in after})
        p50 = pct([t for t in result["ttft"] if t is not None], 0.5) or 0.0
        per_token = ", ".join(f"{k} {1e3 * (after[k] - before[k]) / tokens:.3f}" for k in after)
        return f"{tokens / result['wall']:7.1f} tok/s, TTFT p50 {p50:6.1f} ms; CPU-ms/token: {per_token}"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall


def measure(name: str, groups: Groups, run: Any, expect: int, tally: Tally | None) -> dict[str, Any]:
    """One round; a round with a failed stream (e.g. a 503 when the loaded machine delays the
    pool's assignment) is reported and run again, at most 3 times."""
    for attempt in range(3):
        before = cpu(groups)
        try:
            result: dict[str, Any] = run()
        except Exception as exc:  # reported; the round is redone
            print(f"  {name:8} round failed ({'redone' if attempt < 2 else 'giving up'}): {exc!r}"[:300])
            if attempt == 2:
                raise
            continue
        after = cpu(groups)
        break
    if any(t != expect for t in result["tokens"]):
        raise RuntimeError(f"{name}: expected {expect} tokens per stream, got {result['tokens']}")
    line = (tally or Tally(name)).add(result, before, after)
    print(f"  {name:8} {'warm-up' if tally is None else ''} {line}", flush=True)
    return result


def profile(pids: dict[str, int], seconds: float, drive: Any, tmp: Path) -> None:
    """py-spy (GIL holder, 200 Hz) on the gateway and pool replicas while `drive` streams."""
    from _profile import summarise

    spy = str(Path(sys.executable).with_name("py-spy"))
    files = {name: tmp / f"pyspy-{name}.txt" for name in pids}
    argv = ["record", "--rate", "200", "--nonblocking", "--nolineno", "--gil", "-f", "raw"]
    procs = [
        subprocess.Popen(
            [spy, *argv, "--pid", str(pid), "-o", str(files[name])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(1.0)  # py-spy attaches
    deadline, tokens = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        tokens += sum(drive()["tokens"])
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        proc.wait(60)
    for name, out in files.items():
        print(f"\nprofile of the {name} replica (pid {pids[name]}), per 1,000 streamed tokens:")
        summarise(out, 25, max(1, tokens // 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds per target")
    parser.add_argument("--quick", action="store_true", help="smoke run: --rounds 4")
    parser.add_argument(
        "--throughput-optimized", action="store_true", help="Serve's throughput-optimized mode (opt-in)"
    )
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--profile-seconds", type=float, default=0, help="then py-spy both replicas")
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        asyncio.run(bare_worker())
        return
    rounds = 4 if args.quick else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix=PREFIX))
    # `phiserve up`'s Ray environment (HAProxy; Serve's throughput-optimized mode when asked
    # for, as PHISERVE_SERVE_THROUGHPUT_OPTIMIZED does), before Ray is imported.
    from services.ray_env import ray_process_env

    hp = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    os.environ.update(
        ray_process_env(
            "haproxy",
            hp,
            drain_period_s=1.0,
            haproxy_stats_port=free_port(),
            haproxy_metrics_port=free_port(),
            throughput_optimized=args.throughput_optimized,
        )
    )
    load_start = os.getloadavg()[0]
    bare = Bare(tmp / "bare-vllm.log")
    print(f"bare AsyncLLM ready (pid {bare.proc.pid}); prompt {bare.prompt_tokens} tokens", flush=True)
    loop = uvloop.new_event_loop()
    try:
        with local_phiserve(PREFIX) as phi:
            session = Gateway(phi.base, phi.key)
            loop.run_until_complete(session.open(args.streams))
            groups = gateway_groups(PREFIX)
            for name, procs in groups.items():
                print(f"  [{name}] " + ", ".join(f"{p.pid} {cmd(p)[:60]}" for p in procs))

            def bare_round() -> dict[str, Any]:
                return bare.round(args.streams, args.tokens)

            def gateway_round() -> dict[str, Any]:
                result: dict[str, Any] = loop.run_until_complete(session.round(args.streams, args.tokens))
                return result

            tallies = {"bare": Tally("bare"), "gateway": Tally("gateway")}
            runs = {"bare": (bare.groups, bare_round), "gateway": (groups, gateway_round)}
            for name, (g, run) in runs.items():
                prompt_tokens = measure(name, g, run, args.tokens, None).get("prompt_tokens", 0)
            for r in range(rounds):
                print(f"round {r + 1}/{rounds}")
                for name, (g, run) in runs.items():
                    measure(name, g, run, args.tokens, tallies[name])
            if args.profile_seconds:
                pids = {k: groups[k][0].pid for k in ("gateway", "pool")}
                profile(pids, args.profile_seconds, gateway_round, tmp)
            loop.run_until_complete(session.close())
    finally:
        bare.stop()
    report(tallies, args, rounds, prompt_tokens, bare.prompt_tokens, load_start)


def report(
    tallies: dict[str, Tally],
    args: argparse.Namespace,
    rounds: int,
    gw_prompt: int,
    bare_prompt: int,
    load: float,
) -> None:
    print(
        f"\n{args.streams} streams x {args.tokens} tokens, {rounds} rounds per target; prompt tokens: "
        f"gateway {gw_prompt}, bare {bare_prompt}; load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    for t in tallies.values():
        per_token = ", ".join(f"{k} {1e3 * v / t.tokens:.3f}" for k, v in t.cpu.items())
        print(
            f"{t.name:8} {t.tokens_per_s:7.1f} tok/s, TTFT p50 {pct(t.ttft, 0.5):6.1f} ms "
            f"p99 {pct(t.ttft, 0.99):6.1f} ms ({t.missing_ttft} streams without text); "
            f"CPU-ms/token: {per_token}, all {1e3 * sum(t.cpu.values()) / t.tokens:.3f}"
        )
    bare, gw = tallies["bare"], tallies["gateway"]
    ratio = gw.tokens_per_s / bare.tokens_per_s
    ttft = (pct(gw.ttft, 0.5) or 0.0) / (pct(bare.ttft, 0.5) or 1.0)
    print(f"RESULT streaming tokens_per_s_ratio={ratio:.3f} ttft_p50_ratio={ttft:.3f}")


if __name__ == "__main__":
    main()

"""Driving the targets of `gateway_overhead.py` and counting their CPU.

A target is a URL plus the processes that serve it, in named groups (`gateway_path`,
`engine`, ...). One mode (unary/stream at a concurrency) is measured on all targets in
alternating chunks: target A's chunk, then B's, then C's, then again from the next target on,
so a drift of the machine's speed hits every target alike. Chunks never overlap, so processes
two targets share (HAProxy, its manager, Serve's fallback proxy) are counted in the groups of
the target whose chunk was running. CPU = user + system time from psutil before and after each
chunk; a chunk during which other jobs on the machine used more than `max_other` cores is
thrown away and redone once it is quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil
from _common import pct, sse_data

SERVED, MAX_TOKENS, PROMPT = "phi-3.5-mini", 16, "Write one sentence about the sea."
Groups = dict[str, list[psutil.Process]]


@dataclass
class Target:
    name: str
    url: str  # POST here: .../v1/chat/completions
    groups: Groups  # what to count for it; `gateway_path` and `engine` at least (direct: frontend, engine)


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


def snapshot(groups: Groups, everyone: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds of each group, of this client, of all our processes (`everyone`: our own
    tree plus what lives outside it, such as the daemonised Redis), and of the machine."""
    snap = {name: cpu_s(procs) for name, procs in groups.items()}
    snap["client"] = cpu_s([psutil.Process()])
    snap["own"] = cpu_s(list(set(own_tree()).union(everyone)))
    t = psutil.cpu_times()
    snap["machine_busy"] = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    snap["wall"] = time.monotonic()
    return snap


def other_load(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds the rest of the machine (other users' jobs) used between two snapshots."""
    return (after["machine_busy"] - before["machine_busy"]) - (after["own"] - before["own"])


def request_body(stream: bool) -> bytes:
    request: dict[str, Any] = {
        "model": SERVED,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }
    return json.dumps(request).encode()


async def one(
    session: Any, url: str, body: bytes, headers: dict[str, str], stream: bool
) -> tuple[float, float | None]:
    """One request: its latency and, streaming, its time to the first content delta."""
    t0, ttft = time.perf_counter(), None
    async with session.post(url, data=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        if not stream:
            usage = json.loads(await r.read())["usage"]
        else:
            last = b""
            async for data in sse_data(r.content):
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


@dataclass
class Tally:
    """What one target's measured chunks of one mode add up to."""

    done: int = 0
    lat: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    other: float = 0.0
    redone: int = 0


async def burst(
    session: Any,
    url: str,
    headers: dict[str, str],
    body: bytes,
    stream: bool,
    count: int,
    conc: int,
    tally: Tally,
) -> None:
    """`count` requests with `conc` in flight; results and errors go into `tally`."""
    left = [count]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            try:
                latency, first = await one(session, url, body, headers, stream)
            except Exception as exc:  # noqa: BLE001 (counted and reported)
                tally.errors.append(repr(exc)[:200])
                continue
            tally.lat.append(latency)
            tally.ttft.extend([first] if first is not None else [])

    await asyncio.gather(*(worker() for _ in range(conc)))


async def wait_quiet(everyone: list[psutil.Process], max_other: float) -> None:
    for _ in range(30):  # up to ~60 s
        quiet = snapshot({}, everyone)
        await asyncio.sleep(2.0)
        if other_load(quiet, snapshot({}, everyone)) < 2.0 * max_other:
            return


async def measure_mode(
    targets: list[Target],
    headers: dict[str, str],
    *,
    stream: bool,
    conc: int,
    n: int,
    chunk: int,
    warmup: int,
    max_other: float = float("inf"),
) -> dict[str, dict[str, Any]]:
    """`n` measured requests per target at concurrency `conc`, after `warmup` unmeasured ones
    each, in chunks of `chunk` taken from the targets in turn (the first target of each round
    moves on by one, so no target always follows the same one)."""
    import aiohttp

    body = request_body(stream)
    everyone = [p for t in targets for procs in t.groups.values() for p in procs]
    tallies = {t.name: Tally() for t in targets}
    sessions = {
        t.name: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=conc), timeout=aiohttp.ClientTimeout(total=120)
        )
        for t in targets
    }
    try:
        for t in targets:
            warm = Tally()
            await burst(sessions[t.name], t.url, headers, body, stream, warmup, conc, warm)
            if warm.errors:
                print(f"  {t.name}: {len(warm.errors)} warm-up errors, e.g. {warm.errors[0]}", flush=True)
        turn = 0
        while any(tally.done < n for tally in tallies.values()):
            for t in targets[turn % len(targets) :] + targets[: turn % len(targets)]:
                tally = tallies[t.name]
                if tally.done >= n:
                    continue
                part, m = Tally(), min(chunk, n - tally.done)
                before = snapshot(t.groups, everyone)
                await burst(sessions[t.name], t.url, headers, body, stream, m, conc, part)
                after = snapshot(t.groups, everyone)
                busy = other_load(before, after) > max_other * (after["wall"] - before["wall"])
                if busy and tally.redone < 3 * (n // chunk + 1):
                    tally.redone += 1
                    await wait_quiet(everyone, max_other)
                    continue
                tally.done += m
                tally.lat += part.lat
                tally.ttft += part.ttft
                tally.errors += part.errors
                tally.wall += after["wall"] - before["wall"]
                tally.other += other_load(before, after)
                tally.cpu.update({k: after[k] - before[k] for k in [*t.groups, "client"]})
            turn += 1
    finally:
        for session in sessions.values():
            await session.close()
    return {t.name: summary(tallies[t.name], t.groups, stream, conc, n) for t in targets}


def summary(tally: Tally, groups: Groups, stream: bool, conc: int, n: int) -> dict[str, Any]:
    return {
        "stream": stream,
        "concurrency": conc,
        "requests": n,
        "errors": len(tally.errors),
        "first_errors": tally.errors[:3],
        "wall_s": tally.wall,
        "req_s": len(tally.lat) / tally.wall if tally.wall else 0.0,
        "p50_ms": pct(tally.lat, 0.5),
        "p99_ms": pct(tally.lat, 0.99),
        "ttft_p50_ms": pct(tally.ttft, 0.5),
        "ttft_p99_ms": pct(tally.ttft, 0.99),
        "cpu_ms_per_req": {k: v * 1e3 / n for k, v in tally.cpu.items()},
        "foreign_cpu_pct": 100.0 * tally.other / tally.wall if tally.wall else 0.0,
        "rejected_chunks": tally.redone,
        "lost": sorted({f"{p.pid} {k}" for k, ps in groups.items() for p in ps if not p.is_running()}),
    }


async def load(url: str, headers: dict[str, str], n: int, conc: int, stream: bool) -> None:
    """Unmeasured load (for a profiler); errors are ignored."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
        await burst(session, url, headers, request_body(stream), stream, n, conc, Tally())

"""The same requests over gRPC and over REST, through the same phiserve gateway, in one run.

Starts a private Redis, Ray Serve with the local profile's text pool (tiny Phi-3.5-mini on
vLLM's CPU backend) and one gateway replica serving both REST (Serve's HTTP proxy) and gRPC
(the replica's own port, issue 5). Workload: chat, fixed short prompt, max_tokens=16,
ignore_eos, temperature 0; unary and streaming (with usage), at concurrency 1 and 8.
REST: aiohttp to /v1/chat/completions. gRPC: `services.grpc.client.AsyncClient` (one
HTTP/2 channel). Both transports run in alternating blocks of `--block` requests per mode,
so drift on the shared 2 cores hits both alike.

Per mode and transport: p50/p99 latency and, for streams, p50/p99 time to first token (the
first chunk with text). Ends with
  RESULT grpc p50_ratio_vs_rest=X ttft_ratio_vs_rest=Y
X = gRPC / REST p50 latency of unary c=1; Y = gRPC / REST p50 TTFT of streaming c=1.

  .venv/bin/python benchmarks/grpc_vs_rest.py [--requests 200] [--block 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from _common import REPO, ChatSession, local_phiserve, pct, sse_data

sys.path.insert(0, str(REPO))
SERVED, MAX_TOKENS, PROMPT = "phi-3.5-mini", 16, "Write one sentence about the sea."
MODES = [(False, 1), (True, 1), (False, 8), (True, 8)]  # (stream, concurrency)


class Rest(ChatSession):
    name = "rest"

    async def one(self, stream: bool) -> tuple[float, float | None]:
        body: dict[str, Any] = {
            "model": SERVED,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0, ttft = time.perf_counter(), None
        async with self._session.post(self._url, data=json.dumps(body), headers=self._headers) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
            if not stream:
                usage = json.loads(await r.read())["usage"]
            else:
                last = b""
                async for data in sse_data(r.content):
                    choices = json.loads(data).get("choices") or [{}]
                    if ttft is None and choices[0].get("delta", {}).get("content"):
                        ttft = time.perf_counter() - t0
                    last = data
                usage = json.loads(last)["usage"]
        if usage["completion_tokens"] != MAX_TOKENS:
            raise RuntimeError(f"expected {MAX_TOKENS} tokens, got {usage['completion_tokens']}")
        return time.perf_counter() - t0, ttft


class Grpc:
    name = "grpc"

    def __init__(self, target: str, key: str) -> None:
        self._target, self._key = target, key
        self._client: Any = None

    async def open(self, concurrency: int) -> None:
        from services.grpc.client import AsyncClient

        self._client = AsyncClient(self._target, api_key=self._key, timeout_s=120)

    async def close(self) -> None:
        await self._client.close()

    async def one(self, stream: bool) -> tuple[float, float | None]:
        from services.grpc.client import user

        messages = [user(PROMPT)]
        t0, ttft = time.perf_counter(), None
        if not stream:
            response = await self._client.chat(
                SERVED, messages, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
            )
            usage = response.usage
        else:
            usage = None
            async for chunk in self._client.chat_stream(
                SERVED, messages, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, include_usage=True
            ):
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
                if chunk.HasField("usage"):
                    usage = chunk.usage
        if usage is None or usage.completion_tokens != MAX_TOKENS:
            raise RuntimeError(f"expected {MAX_TOKENS} tokens, got {usage}")
        return time.perf_counter() - t0, ttft


async def run_block(
    transport: Any, count: int, concurrency: int, stream: bool, out: dict[str, list[float]]
) -> None:
    left = [count]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            latency, ttft = await transport.one(stream)
            out["latency"].append(latency)
            if ttft is not None:
                out["ttft"].append(ttft)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def bench(transports: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for stream, concurrency in MODES:
        samples = {t.name: {"latency": [], "ttft": []} for t in transports}
        for t in transports:
            await t.open(concurrency)
            await run_block(t, args.warmup, concurrency, stream, {"latency": [], "ttft": []})
        t0 = time.monotonic()
        for _ in range(max(1, args.requests // args.block)):
            for t in transports:  # alternate blocks: the same conditions for both
                await run_block(t, args.block, concurrency, stream, samples[t.name])
        for t in transports:
            await t.close()
        for t in transports:
            s = samples[t.name]
            rows.append(
                {
                    "transport": t.name,
                    "stream": stream,
                    "concurrency": concurrency,
                    "n": len(s["latency"]),
                    "p50_ms": pct(s["latency"], 0.5),
                    "p99_ms": pct(s["latency"], 0.99),
                    "ttft_p50_ms": pct(s["ttft"], 0.5),
                    "ttft_p99_ms": pct(s["ttft"], 0.99),
                }
            )
        print(f"  mode stream={stream} c={concurrency}: {time.monotonic() - t0:.1f} s", flush=True)
    return rows


def report(rows: list[dict[str, Any]]) -> tuple[float, float]:
    def fmt(v: float | None) -> str:
        return f"{v:8.1f}" if v is not None else "       -"

    print("\n| transport | mode | c | n | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = "stream" if r["stream"] else "unary"
        print(
            f"| {r['transport']} | {mode} | {r['concurrency']} | {r['n']} | {fmt(r['p50_ms'])} | "
            f"{fmt(r['p99_ms'])} | {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} |"
        )

    def get(transport: str, stream: bool, key: str) -> float:
        row = next(
            r for r in rows if r["transport"] == transport and r["stream"] == stream and r["concurrency"] == 1
        )
        return float(row[key])

    p50_ratio = get("grpc", False, "p50_ms") / get("rest", False, "p50_ms")
    ttft_ratio = get("grpc", True, "ttft_p50_ms") / get("rest", True, "ttft_p50_ms")
    return p50_ratio, ttft_ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="measured requests per mode and transport")
    parser.add_argument("--block", type=int, default=20, help="requests per alternating block")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up requests per mode and transport")
    args = parser.parse_args()

    with local_phiserve("grpc-bench-") as phiserve:
        print(
            f"phiserve ready: REST {phiserve.base}, gRPC {phiserve.grpc_target}; {args.requests} requests "
            f"per mode and transport, blocks of {args.block}",
            flush=True,
        )
        transports = [Rest(phiserve.base, phiserve.key), Grpc(phiserve.grpc_target, phiserve.key)]
        rows = asyncio.run(bench(transports, args))
    p50_ratio, ttft_ratio = report(rows)
    print(f"\nRESULT grpc p50_ratio_vs_rest={p50_ratio:.3f} ttft_ratio_vs_rest={ttft_ratio:.3f}")


if __name__ == "__main__":
    main()

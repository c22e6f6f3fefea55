"""How a running batch changes interactive streaming TTFT on the same pool, in one run.

A real local phiserve (the tiny text pool, tenancy on, one batch worker). The interactive
load is `--concurrency` chat streams sent back to back. Phases alternate in the same run:

    quiet   no batch, for `--seconds`;
    batch   a batch of `--items` chats is uploaded and created through the Files and Batches
            APIs; the worker runs it at the `batch` priority class while the interactive load
            goes on, until the batch is completed.

A request's TTFT (sent -> first content token) counts for the phase it started and ended
in; one that straddles a phase change is dropped. A warm-up phase is not counted.

    .venv/bin/python benchmarks/batch_interference.py [--rounds 3] [--items 200] [--concurrency 3]

Ends with: RESULT batch_interference ttft_p99_ratio=X ttft_p50_ratio=Y batch_items_per_s=Z
(ratios: with the batch running / without).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ChatSession, local_phiserve, pct

MODEL = "phi-3.5-mini"
FINAL = {"completed", "failed", "cancelled", "expired"}


@dataclass
class Phases:
    """The phase now, and the TTFTs (s) of the requests that began and ended in each."""

    now: str = "warmup"
    ttfts: dict[str, list[float]] = field(default_factory=dict)
    batch_rates: list[float] = field(default_factory=list)


class Client(ChatSession):
    """The interactive streams and the Batches API calls, on one aiohttp session."""

    def __init__(self, base: str, key: str, max_tokens: int) -> None:
        super().__init__(base, key)
        self._base = base
        self._auth = {"authorization": self._headers["authorization"]}
        self._max_tokens = max_tokens

    async def ttft(self, prompt: str) -> float:
        """One streamed chat; seconds until its first content token (the rest is read)."""
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self._max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        first: float | None = None
        started = time.perf_counter()
        async with self._session.post(self._url, json=body, headers=self._headers) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            async for raw in resp.content:
                line = raw.strip()
                if first is not None or not line.startswith(b"data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - started
        assert first is not None, "the stream had no content"
        return first

    async def run_batch(self, items: int, max_tokens: int) -> float:
        """Upload, create, wait until completed; the batch's items per second."""
        import aiohttp

        lines = [
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"summarise report {i}"}],
                        "max_tokens": max_tokens,
                        "ignore_eos": True,
                    },
                }
            )
            for i in range(items)
        ]
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", ("\n".join(lines) + "\n").encode(), filename="batch.jsonl")
        async with self._session.post(f"{self._base}/v1/files", data=form, headers=self._auth) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            file_id = (await resp.json())["id"]
        started = time.perf_counter()
        create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        async with self._session.post(f"{self._base}/v1/batches", json=create, headers=self._auth) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            batch = await resp.json()
        while batch["status"] not in FINAL:
            await asyncio.sleep(0.25)
            async with self._session.get(
                f"{self._base}/v1/batches/{batch['id']}", headers=self._auth
            ) as resp:
                batch = await resp.json()
        elapsed = time.perf_counter() - started
        assert batch["status"] == "completed", batch
        assert batch["request_counts"]["completed"] == items, batch["request_counts"]
        return items / elapsed


async def interactive(client: Client, phases: Phases, stop: asyncio.Event, worker: int) -> None:
    n = 0
    while not stop.is_set():
        phase, n = phases.now, n + 1
        ttft = await client.ttft(f"user {worker} question {n}: what does the report say?")
        if phases.now == phase:
            phases.ttfts.setdefault(phase, []).append(ttft)


async def measure(base: str, key: str, args: argparse.Namespace) -> Phases:
    client = Client(base, key, args.max_tokens)
    await client.open(args.concurrency + 4)
    phases, stop = Phases(), asyncio.Event()
    load = [asyncio.create_task(interactive(client, phases, stop, w)) for w in range(args.concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        for round_ in range(args.rounds):
            phases.now = "quiet"
            await asyncio.sleep(args.seconds)
            phases.now = "batch"
            rate = await client.run_batch(args.items, args.batch_max_tokens)
            phases.batch_rates.append(rate)
            phases.now = "between"  # the batch's last generations are leaving the engine
            await asyncio.sleep(1.0)
            quiet, batch = phases.ttfts.get("quiet", []), phases.ttfts.get("batch", [])
            print(
                f"round {round_ + 1}: quiet n={len(quiet)} p99 {pct(quiet, 0.99):.0f} ms, "
                f"batch n={len(batch)} p99 {pct(batch, 0.99):.0f} ms, {rate:.1f} items/s",
                flush=True,
            )
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
        await client.close()
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="quiet/batch phase pairs")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each quiet phase")
    parser.add_argument("--items", type=int, default=200, help="items per batch")
    parser.add_argument("--concurrency", type=int, default=3, help="interactive streams at once")
    parser.add_argument("--max-tokens", type=int, default=16, help="interactive tokens per request")
    parser.add_argument("--batch-max-tokens", type=int, default=32, help="tokens per batch item")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load not counted")
    parser.add_argument("--batch-concurrency", type=int, default=None, help="Settings.batch_concurrency")
    args = parser.parse_args()

    overrides: dict[str, Any] = {"batch_workers": 1}
    if args.batch_concurrency is not None:
        overrides["batch_concurrency"] = args.batch_concurrency
    with local_phiserve("batch-interference-", **overrides) as phiserve:
        phases = asyncio.run(measure(phiserve.base, phiserve.key, args))
    quiet, batch = phases.ttfts["quiet"], phases.ttfts["batch"]
    rate = sum(phases.batch_rates) / len(phases.batch_rates)
    print(f"{'phase':<8}{'requests':>10}{'TTFT p50 ms':>14}{'TTFT p99 ms':>14}")
    for name, values in (("quiet", quiet), ("batch", batch)):
        print(f"{name:<8}{len(values):>10}{pct(values, 0.5):>14.1f}{pct(values, 0.99):>14.1f}")
    print(f"batch items/s (mean of {len(phases.batch_rates)}): {rate:.1f}")
    p99 = (pct(batch, 0.99) or 0) / (pct(quiet, 0.99) or 1)
    p50 = (pct(batch, 0.5) or 0) / (pct(quiet, 0.5) or 1)
    print(
        f"RESULT batch_interference ttft_p99_ratio={p99:.2f} ttft_p50_ratio={p50:.2f} batch_items_per_s={rate:.1f}"
    )


if __name__ == "__main__":
    main()

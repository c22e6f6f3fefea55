"""Token-weighted fairness between tenants on one saturated pool, against plain FCFS.

Setup: a real cluster (text pool only, the tiny vLLM model), its fair queue capped at
`--capacity` requests in flight so the pool saturates. Tenants (created through the admin API):

  heavy    weight 1  floods: 10x the concurrency of its fair share
  steady   weight 1  backlogged at 2x its share
  premium  weight 2  backlogged at 2x its share
  light    weight 1  one request at a time with a pause (well under its share): the latency probe

Every request asks for the same number of tokens (`ignore_eos`), so token shares are exact.
Phases, each `--seconds` long after a warm-up: light alone; all four with the fair queue;
all four with `queue_policy=fcfs` (arrival order, the baseline).

    .venv/bin/python benchmarks/fairness.py [--seconds 25] [--capacity 8]

Prints each backlogged tenant's share of generated tokens against its weight's share, the
light tenant's p99 against its p99 alone, throughput against FCFS, and ends with:
RESULT fairness max_share_error=X light_p99_ratio=Y throughput_vs_fcfs=Z
(share error = max over heavy/steady/premium of |share - weight share| / weight share).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import CACHE_DIR, deploy, free_port, serve_session, text_catalog
from pydantic import SecretStr

from services.local.redis_server import LocalRedis
from services.local.tiny_models import build_tiny_models
from services.settings import Settings

ADMIN_KEY = "fairness-bench-admin-key-0123456789"
MAX_TOKENS = 32
WARMUP_S = 5.0
TENANTS = {  # name: (weight, concurrency as a multiple of its share, think time s)
    "heavy": (1, 10.0, 0.0),
    "steady": (1, 2.0, 0.0),
    "premium": (2, 2.0, 0.0),
}
LIGHT_THINK_S = 0.3


@dataclass
class Record:
    tenant: str
    started: float
    ended: float
    tokens: int
    status: int


@dataclass
class Phase:
    records: list[Record] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)

    def in_window(self, tenant: str | None = None) -> list[Record]:
        lo, hi = self.window
        return [
            r
            for r in self.records
            if lo <= r.ended <= hi and r.status == 200 and (tenant is None or r.tenant == tenant)
        ]

    def tokens(self, tenant: str | None = None) -> int:
        return sum(r.tokens for r in self.in_window(tenant))

    def p99(self, tenant: str) -> float:
        lat = sorted(r.ended - r.started for r in self.in_window(tenant))
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    tenant: str,
    think_s: float,
    stop: float,
    out: list[Record],
) -> None:
    body = {
        "model": "phi-3.5-mini",
        "messages": [{"role": "user", "content": f"Tell me about {tenant}"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < stop:
        started = time.monotonic()
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
            data = await resp.json()
            tokens = data.get("usage", {}).get("completion_tokens", 0) if resp.status == 200 else 0
            out.append(Record(tenant, started, time.monotonic(), tokens, resp.status))
        if think_s:
            await asyncio.sleep(think_s)


async def run_phase(
    url: str, keys: dict[str, str], capacity: int, seconds: float, *, with_load: bool
) -> Phase:
    phase = Phase()
    start = time.monotonic()
    stop = start + WARMUP_S + seconds
    phase.window = (start + WARMUP_S, stop)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        tasks = [
            asyncio.create_task(
                worker(session, url, keys["light"], "light", LIGHT_THINK_S, stop, phase.records)
            )
        ]
        if with_load:
            total_weight = sum(w for w, _, _ in TENANTS.values())
            for name, (weight, multiple, think) in TENANTS.items():
                share = capacity * weight / total_weight
                for _ in range(max(1, round(share * multiple))):
                    tasks.append(
                        asyncio.create_task(
                            worker(session, url, keys[name], name, think, stop, phase.records)
                        )
                    )
        await asyncio.gather(*tasks)
    return phase


def create_tenants(url: str) -> dict[str, str]:
    import httpx

    keys = {}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for name in [*TENANTS, "light"]:
        weight = TENANTS.get(name, (1, 0, 0))[0]
        httpx.post(
            f"{url}/admin/tenants", json={"id": name, "weight": weight}, headers=admin
        ).raise_for_status()
        keys[name] = httpx.post(f"{url}/admin/tenants/{name}/keys", json={}, headers=admin).json()["key"]
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="measured seconds per phase")
    parser.add_argument("--capacity", type=int, default=8, help="fair-queue slots of the pool")
    args = parser.parse_args()

    cache = CACHE_DIR
    build_tiny_models(cache / "models")
    tmp = Path(tempfile.mkdtemp())
    redis = LocalRedis(port=free_port(), directory=tmp / "redis")
    redis.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = {
        "port": port,
        "grpc_port": None,
        "cache_dir": cache,
        "redis_url": redis.url,
        "admin_key": SecretStr(ADMIN_KEY),
        "batch_workers": 0,
        "files_dir": tmp / "files",
        "queue_timeout_s": 120.0,
    }
    catalog = text_catalog(max_in_flight=args.capacity)
    try:
        with serve_session(port):
            deploy(Settings(**base, queue_policy="fair"), catalog)
            keys = create_tenants(url)
            alone = asyncio.run(run_phase(url, keys, args.capacity, args.seconds, with_load=False))
            fair = asyncio.run(run_phase(url, keys, args.capacity, args.seconds, with_load=True))
            deploy(Settings(**base, queue_policy="fcfs"), catalog)
            fcfs = asyncio.run(run_phase(url, keys, args.capacity, args.seconds, with_load=True))
    finally:
        redis.stop()

    total_weight = sum(w for w, _, _ in TENANTS.values())
    backlogged = fair.tokens() - fair.tokens("light")
    print(f"{'tenant':<10}{'weight share':>14}{'fair share':>12}{'fcfs share':>12}")
    errors = []
    for name, (weight, _, _) in TENANTS.items():
        target = weight / total_weight
        share = fair.tokens(name) / backlogged if backlogged else 0.0
        fcfs_total = fcfs.tokens() - fcfs.tokens("light")
        fcfs_share = fcfs.tokens(name) / fcfs_total if fcfs_total else 0.0
        errors.append(abs(share - target) / target)
        print(f"{name:<10}{target:>14.3f}{share:>12.3f}{fcfs_share:>12.3f}")
    light_ratio = fair.p99("light") / alone.p99("light")
    fair_tps = fair.tokens() / args.seconds
    fcfs_tps = fcfs.tokens() / args.seconds
    print(
        f"light p99: alone {alone.p99('light') * 1000:.0f} ms, with the flood {fair.p99('light') * 1000:.0f} ms "
        f"(fcfs {fcfs.p99('light') * 1000:.0f} ms)"
    )
    print(f"throughput: fair {fair_tps:.0f} tok/s, fcfs {fcfs_tps:.0f} tok/s")
    refused = sum(1 for r in fair.records + fcfs.records if r.status != 200)
    print(
        f"non-200 answers: {refused}; light median alone {statistics.median(r.ended - r.started for r in alone.in_window('light')) * 1000:.0f} ms"
    )
    print(
        f"RESULT fairness max_share_error={max(errors):.3f} light_p99_ratio={light_ratio:.2f} "
        f"throughput_vs_fcfs={fair_tps / fcfs_tps:.2f}"
    )


if __name__ == "__main__":
    main()

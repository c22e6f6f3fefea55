"""A real Prometheus server scrapes the running cluster: gateway and vLLM metrics read back,
and the recording rules of deploy/prometheus/alerts.yml evaluated on them."""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, Cluster, free_port, wait_until
from tests.deploy.tooling import ALERTS


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (scripts/install.sh installs it)"
    work: Path = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{cluster.metrics_port}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
            timeout_s=60,
            what="prometheus ready",
        )
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query(prom: str, expr: str) -> list[dict]:  # type: ignore[type-arg]
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    resp.raise_for_status()
    return resp.json()["data"]["result"]  # type: ignore[no-any-return]


def _counted(series: list[dict], *, at_least: float) -> list[dict] | None:  # type: ignore[type-arg]
    return series if sum(float(r["value"][1]) for r in series) >= at_least else None


def test_gateway_and_vllm_metrics_reach_prometheus(cluster: Cluster, prometheus: str) -> None:
    body = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for _ in range(3):
        assert (
            httpx.post(
                f"{cluster.base_url}/chat/completions", json=body, headers=AUTH, timeout=60
            ).status_code
            == 200
        )

    # Selected by the replica's own `deployment` label: the test process also exports this
    # counter (the in-process app tests build the same metrics while connected to Ray).
    gateway_200 = 'ray_phiserve_requests_total{model="phi-3.5-mini",status="200",deployment="gateway"}'
    requests = wait_until(
        lambda: _counted(_query(prometheus, gateway_200), at_least=3),
        timeout_s=90,
        interval_s=1,
        what="gateway request counter scraped",
    )
    assert {r["metric"]["deployment"] for r in requests} == {"gateway"}

    running = wait_until(
        lambda: _query(prometheus, 'ray_vllm_num_requests_running{model_name="text"}'),
        timeout_s=90,
        interval_s=1,
        what="vLLM engine gauge scraped",
    )
    assert running
    generated = wait_until(
        lambda: _query(prometheus, 'ray_vllm_generation_tokens_total{model_name="text"}'),
        timeout_s=90,
        interval_s=1,
        what="vLLM token counter scraped",
    )
    assert sum(float(r["value"][1]) for r in generated) >= 15
    tokens = _query(
        prometheus, 'ray_phiserve_completion_tokens_total{model="phi-3.5-mini",deployment="gateway"}'
    )
    assert tokens and sum(float(r["value"][1]) for r in tokens) >= 15


def _chat(cluster: Cluster, system: str, user: str) -> dict:  # type: ignore[type-arg]
    body = {
        "model": "phi-3.5-mini",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 4,
    }
    resp = httpx.post(f"{cluster.base_url}/chat/completions", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _sums_by_pool(prom: str, metric: str) -> dict[str, float]:
    query = f"sum by (model_name) ({metric})"
    return {r["metric"]["model_name"]: float(r["value"][1]) for r in _query(prom, query)}


def _seen_in(prom: str, metric: str, pools: set[str]) -> dict[str, float] | None:
    """The metric's sums by pool once every pool in `pools` has a series, else None."""
    found = _sums_by_pool(prom, metric)
    return found if pools <= found.keys() else None


def test_prefix_cache_hit_rate_per_pool(cluster: Cluster, prometheus: str) -> None:
    """vLLM's prefix cache counters come per pool, the short (text) and the long (text-long)
    pool of phi-3.5-mini apart, and the recording rule turns them into a hit rate per pool."""
    words = random.Random(13).choices(["alpha", "river", "stone", "maple", "copper", "violet"], k=600)
    short_system, long_system = " ".join(words[:120]), " ".join(words)
    moe = {"model": "phi-3.5-moe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def send_round(turn: int) -> None:
        # The same system prompts every round: from the second on, their blocks are hits.
        assert _chat(cluster, short_system, f"question {turn}")["usage"]["prompt_tokens"] < 1024
        # prompt + max_tokens beyond the text pool's 1024: the long pool runs it.
        assert _chat(cluster, long_system, f"question {turn}")["usage"]["prompt_tokens"] > 1024
        resp = httpx.post(f"{cluster.base_url}/chat/completions", json=moe, headers=AUTH, timeout=120)
        assert resp.status_code == 200, resp.text

    queries_total, hits_total = "ray_vllm_prefix_cache_queries_total", "ray_vllm_prefix_cache_hits_total"
    # The session cluster's earlier tests count too: measure this round's growth.
    before = _sums_by_pool(prometheus, queries_total)

    def grown() -> dict[str, float] | None:
        now = _seen_in(prometheus, queries_total, {"text", "text-long", "moe"})
        if now is None:
            return None
        delta = {pool: value - before.get(pool, 0.0) for pool, value in now.items()}
        return delta if delta["text-long"] > 1024 and delta["text"] > 0 and delta["moe"] > 0 else None

    send_round(0)
    queries = wait_until(
        grown,
        timeout_s=90,
        interval_s=1,
        what="this round's prefix cache queries of text, text-long (> 1024 tokens) and moe scraped",
    )
    # One series per pool, named by the pool: never the served model name.
    assert set(queries) <= {p.name for p in cluster.catalog.pools}, queries
    series = _query(prometheus, f'{queries_total}{{model_name="text"}}')
    assert all(r["metric"].get("ReplicaId") for r in series), series

    # vLLM counts no hit of 0 (a Ray counter takes no increment of 0), so the hit series
    # start with the second round; rate() needs them to move after their first scrape.
    send_round(1)
    hits = wait_until(
        lambda: _seen_in(prometheus, hits_total, {"text", "text-long"}),
        timeout_s=90,
        interval_s=1,
        what="prefix cache hits of text and text-long scraped",
    )
    # The long pool found the long system prompt of the first round (most of ~1,600 tokens).
    assert hits["text-long"] > 1024, hits
    send_round(2)

    def recorded() -> dict[str, float] | None:
        rows = _query(prometheus, "pool:phiserve_prefix_cache_hit_ratio:rate5m")
        found = {r["metric"]["pool"]: float(r["value"][1]) for r in rows}
        return found if all(found.get(pool, 0) > 0 for pool in ("text", "text-long")) else None

    ratios = wait_until(
        recorded, timeout_s=90, interval_s=1, what="hit ratio recorded for text and text-long"
    )
    assert all(0 < ratio <= 1 for ratio in ratios.values()), ratios
    assert set(ratios) <= {p.name for p in cluster.catalog.pools}, ratios

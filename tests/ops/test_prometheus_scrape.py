"""A real Prometheus server scrapes the running cluster: gateway and vLLM metrics read back."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, Cluster, free_port, wait_until


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (scripts/install.sh installs it)"
    work: Path = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
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
        lambda: _query(prometheus, 'ray_vllm_num_requests_running{model_name="phi-3.5-mini"}'),
        timeout_s=90,
        interval_s=1,
        what="vLLM engine gauge scraped",
    )
    assert running
    generated = wait_until(
        lambda: _query(prometheus, 'ray_vllm_generation_tokens_total{model_name="phi-3.5-mini"}'),
        timeout_s=90,
        interval_s=1,
        what="vLLM token counter scraped",
    )
    assert sum(float(r["value"][1]) for r in generated) >= 15
    tokens = _query(prometheus, 'ray_phiserve_completion_tokens_total{model="phi-3.5-mini",deployment="gateway"}')
    assert tokens and sum(float(r["value"][1]) for r in tokens) >= 15

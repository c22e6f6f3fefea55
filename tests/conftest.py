"""Session fixtures: tiny models built once, one real Ray Serve cluster for the suite."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from pydantic import SecretStr

from services.catalog.loader import load_catalog
from services.catalog.models import Catalog
from services.local.redis_server import LocalRedis
from services.ray_env import ray_process_env
from services.redis_store import RedisStore
from services.settings import Settings

if TYPE_CHECKING:
    from tests.fakes.gateway import InProcessGateway

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".cache"

CLUSTER_READY_TIMEOUT_S = 900.0
ADMIN_KEY = "test-admin-key-0123456789abcdef"
DEMO_KEY = "psk-demo0000-test-demo-key-for-the-suite"
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
CACHE_SALT_SECRET = "test-cache-salt-secret-0123456789"


# Fixtures that bring up the real parts: Ray + vLLM, or the tiny models (torch) they load.
REAL_PARTS_FIXTURES = {"cluster", "tiny_models"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the real parts (directly or through another fixture), so
    `pytest -m "not cluster"` runs the fast, in-process layer alone. Tests that start a Ray
    cluster of their own or build the models carry the marker themselves (tests/local/)."""
    for item in items:
        if REAL_PARTS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
    # The two-node cluster's tests (tests/multinode) first: their cluster is stopped before
    # the session cluster starts, so the two never share the machine.
    items.sort(key=lambda item: 0 if item.get_closest_marker("multinode") else 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Serve's proxy mode is read when Ray is imported: set it before any test module imports
# ray, the same mode `phiserve up` uses (HAProxy in front of direct-ingress replicas).
_HAPROXY_DIR = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
# Ports of its own for HAProxy's stats and metrics listeners (127.0.0.1 only), so test
# clusters and `phiserve up` (8404, 9101) can run side by side.
_RAY_ENV = ray_process_env(
    "haproxy",
    _HAPROXY_DIR,
    drain_period_s=1.0,
    haproxy_stats_port=free_port(),
    haproxy_metrics_port=free_port(),
)
os.environ.update(_RAY_ENV)


def wait_until(predicate, *, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling; the timeout reports the last failure
            last_exc = exc
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s} s (last error: {last_exc!r})")


def init_private_ray(metrics_port: int) -> None:
    """The session's own Ray cluster (issue 9, item 10), exporting metrics on `metrics_port`."""
    from services.local.ray_cluster import init_private_ray as start

    start("tests", _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 2000})


@dataclass(frozen=True)
class Cluster:
    url: str
    settings: Settings
    catalog: Catalog
    redis: LocalRedis
    metrics_port: int

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from services.local.tiny_adapters import build_tiny_adapters
    from services.local.tiny_models import build_tiny_models

    models = build_tiny_models(CACHE_DIR / "models")
    # The tiny LoRA adapters (issue 14) in the cluster's adapter store (cache_dir/adapters).
    build_tiny_adapters(CACHE_DIR / "adapters", CACHE_DIR / "models")
    return models


@pytest.fixture(scope="session")
def tiny_adapters(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """{"tiny/phi-3.5-mini-1": folder, ...}: the tiny adapters in the cluster's adapter store."""
    from services.local.tiny_adapters import build_tiny_adapters

    return build_tiny_adapters(CACHE_DIR / "adapters", CACHE_DIR / "models")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A private redis-server on a free port for the whole session (AOF on)."""
    server = LocalRedis(port=free_port(), directory=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pausable_redis(tmp_path: Path) -> Iterator[tuple[LocalRedis, int]]:
    """A redis-server of the test's own (no AOF) and its pid, so the test can SIGSTOP it to
    stand for a hung or half-open Redis; it is resumed and stopped afterwards."""
    server = LocalRedis(port=free_port(), directory=tmp_path / "redis")
    server.start(appendonly=False)
    pid = int(server.pidfile.read_text())
    try:
        yield server, pid
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


UNIT_DB = 3  # unit tests flush their own Redis database, never the cluster's (0)


@pytest.fixture
async def state(redis_server: LocalRedis) -> AsyncIterator[RedisStore]:
    """A clean Redis database on the session's real redis-server, for unit tests."""
    st = RedisStore(f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}")
    await st.redis.flushdb()
    try:
        yield st
    finally:
        await st.redis.flushdb()
        await st.close()


INPROCESS_DB = 4  # the in-process gateway's own database, flushed around each test


@pytest.fixture
async def inprocess_gateway(redis_server: LocalRedis, tmp_path: Path) -> AsyncIterator[InProcessGateway]:
    """The real gateway in-process, no Ray (issue 10, item 6): `build_core` over fake pool
    handles (real `PoolReplica`s with a `FakeEngine` each), the real batch APIs and the real
    FastAPI app, served through `httpx.ASGITransport` with its lifespan running, on a clean
    database of the session's redis-server. A tenant `gw.tenant` with the key `gw.api_key`
    (headers `gw.auth`) is created through the admin API (headers `gw.admin`).

    Other settings or catalogs: `tests.fakes.gateway.run_inprocess_gateway` directly, with
    `inprocess_redis_url(redis_server)`. See tests/fakes/gateway.py."""
    # Imported here: it imports Ray, which must not happen before the proxy mode is set above.
    from tests.fakes.gateway import run_inprocess_gateway

    async with run_inprocess_gateway(inprocess_redis_url(redis_server), tmp_path) as gateway:
        yield gateway


def inprocess_redis_url(redis_server: LocalRedis) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{INPROCESS_DB}"


@pytest.fixture(scope="session")
def cluster(tiny_models: dict[str, Path], redis_server: LocalRedis) -> Iterator[Cluster]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from services.app import APP_NAME, build_app

    port = free_port()
    settings = Settings(
        port=port,
        grpc_port=free_port(),
        cache_dir=CACHE_DIR,
        pool_ready_timeout_s=5.0,
        redis_url=redis_server.url,
        admin_key=SecretStr(ADMIN_KEY),
        api_key=SecretStr(DEMO_KEY),
        cache_salt_secret=SecretStr(CACHE_SALT_SECRET),
        # Two gateway replicas: limits and fairness must hold across replicas.
        gateway_replicas=2,
        lease_ttl_s=10.0,
        files_dir=CACHE_DIR / "test-files",
        batch_visibility_timeout_s=5.0,
        batch_concurrency=8,
        batch_sweep_interval_s=1.0,
        batch_retry_backoff_s=0.5,
        batch_max_workers=1,  # 2 cores: the crash tests need the one worker they kill
    )
    catalog = load_catalog("local")
    metrics_port = free_port()
    init_private_ray(metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings, catalog), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: httpx.get(f"{url}/ready", timeout=10).status_code == 200,
        timeout_s=CLUSTER_READY_TIMEOUT_S,
        interval_s=1.0,
        what="all pools ready",
    )
    try:
        yield Cluster(
            url=url, settings=settings, catalog=catalog, redis=redis_server, metrics_port=metrics_port
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def openai_client(cluster: Cluster):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    client = OpenAI(base_url=cluster.base_url, api_key=DEMO_KEY, max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=cluster.url, timeout=120, headers={"Authorization": f"Bearer {DEMO_KEY}"}
    ) as client:
        yield client


@pytest.fixture(scope="session")
def admin(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=cluster.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as client:
        yield client

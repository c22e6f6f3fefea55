"""What every benchmark needs: free ports, readiness polling, percentiles, and a local
phiserve cluster (in-process Ray, Serve on a port, the local profile's text pool)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".cache"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str, timeout_s: float, what: str = "service", proc: subprocess.Popen | None = None
) -> None:  # type: ignore[type-arg]
    """Poll `url` until it answers 200 (or `proc` exits, or the deadline passes)."""
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


async def sse_data(lines: Any) -> AsyncIterator[bytes]:
    """The `data:` payloads of a Server-Sent Events body (aiohttp's `response.content`), up to
    the "[DONE]" that ends an OpenAI stream."""
    async for line in lines:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return
        yield data


def pct(values: list[float], q: float) -> float | None:
    """Percentile `q` (0-1) of seconds, in ms, by linear interpolation."""
    v, k = sorted(values), (len(values) - 1) * q
    if not v:
        return None
    lo = int(k)
    return 1e3 * (v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo))


def text_catalog(**pool_updates: Any) -> Any:
    """The local profile with its text pool only (the benchmarks' one engine), without its
    long_context_pool (text-long is another engine): requests are held to the text pool's
    context. Validated afresh: a model_copy would keep the long pool's context (2048) that
    the catalog derived for it, and name a pool that is not there."""
    from services.catalog.loader import load_catalog
    from services.catalog.models import Catalog

    catalog = load_catalog("local")
    text = next(p for p in catalog.pools if p.name == "text").model_dump()
    text.update(long_context_pool=None, **pool_updates)
    return Catalog.model_validate({"platform": catalog.platform, "pools": [text]})


def deploy(settings: Any, catalog: Any, *, timeout_s: float = 600) -> str:
    """Deploy (or redeploy) the application and wait until /ready; returns the base URL."""
    from ray import serve

    from services.app import APP_NAME, build_app

    serve.run(build_app(settings, catalog), name=APP_NAME, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{settings.port}"
    wait_http(f"{base}/ready", timeout_s, "phiserve")
    return base


@contextmanager
def serve_session(port: int, **ray_init: Any) -> Iterator[None]:
    """In-process Ray on 2 CPUs with Serve's HTTP port at `port`; shut down on exit.
    `ray_init` goes to `ray.init` (e.g. `_metrics_export_port`).

    A cluster of its own even beside `phiserve up` or a test session (issue 9, item 10)."""
    import ray
    from ray import serve

    from services.local.ray_cluster import init_private_ray

    init_private_ray("bench", **ray_init)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@dataclass(frozen=True)
class LocalPhiserve:
    base: str  # REST, http://127.0.0.1:<port>
    grpc_target: str  # 127.0.0.1:<port>
    key: str  # the bootstrap tenant's API key


@contextmanager
def local_phiserve(prefix: str, **settings: Any) -> Iterator[LocalPhiserve]:
    """The tiny models, a private Redis and phiserve with the local text pool on free ports,
    ready; everything stopped on exit. `settings` override the defaults (no batch workers,
    files under the run's temporary folder)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.chdir(REPO)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    from services.local.redis_server import LocalRedis
    from services.local.tiny_models import build_tiny_models
    from services.settings import Settings
    from services.tenancy.store import new_plain_key

    build_tiny_models(CACHE_DIR / "models")
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    redis = LocalRedis(port=free_port(), directory=tmp / "redis")
    redis.start(appendonly=False)
    key = new_plain_key()[1]
    port, grpc_port = free_port(), free_port()
    config = Settings(
        **{
            "port": port,
            "grpc_port": grpc_port,
            "cache_dir": CACHE_DIR,
            "redis_url": redis.url,
            "api_key": key,
            "batch_workers": 0,
            "files_dir": tmp / "files",
            **settings,
        }
    )
    try:
        with serve_session(port):
            yield LocalPhiserve(deploy(config, text_catalog()), f"127.0.0.1:{grpc_port}", key)
    finally:
        redis.stop()


class ChatSession:
    """An aiohttp session posting to a gateway's /v1/chat/completions with a tenant key."""

    timeout_s = 120.0

    def __init__(self, base: str, key: str) -> None:
        self._url = f"{base}/v1/chat/completions"
        self._headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        self._session: Any = None

    async def open(self, concurrency: int) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )

    async def close(self) -> None:
        await self._session.close()

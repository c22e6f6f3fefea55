"""What `helm template` renders for each values file: objects, Ray pods, Redis, network
policies, monitors and the chart's copies of the rules and dashboard."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from services.catalog.loader import load_catalog, parse_catalog
from services.settings import Settings
from services.tenancy.models import TenantsFile
from tests.deploy.tooling import (
    ALERTS,
    CATALOG_PATH,
    CHART,
    DASHBOARD,
    NAMESPACE,
    RELEASE,
    REPO,
    TEST_ADMIN_KEY,
    TEST_CACHE_SALT_SECRET,
    byte_size,
    env_of,
    find,
    one,
    ray_container,
    ray_groups,
    rendered_catalog,
    run,
    serve_config,
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
        # The gateway validates registered adapters and every pool replica loads them.
        assert args["adapters_dir"] in mounts, f"{name}: adapters_dir {args['adapters_dir']} is not mounted"
    assert set(args) <= set(Settings.model_fields), set(args) - set(Settings.model_fields)
    # The pods' env supplies the secrets; the args must validate as phiserve's Settings.
    settings = Settings(
        **args, admin_key=SecretStr(TEST_ADMIN_KEY), cache_salt_secret=SecretStr(TEST_CACHE_SALT_SECRET)
    )
    assert settings.profile == CATALOG_PATH and not settings.is_local
    assert config["http_options"]["port"] == 8000 and config["http_options"]["host"] == "0.0.0.0"
    # The whole document is what `serve deploy` accepts (Ray Serve's own schema; no Ray start).
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


def test_rendered_catalog_is_the_values_catalog_as_written(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The chart adds nothing to a pool's entry: placement is phiserve's own
    (settings.pool_placement, test_helm_topology.py), not a resource the chart injects."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    entries = [
        {**pool["catalog"], "name": name, "enabled": pool["enabled"]}
        for name, pool in values["pools"].items()
    ]
    written = parse_catalog(
        {"platform": values["catalog"]["platform"], "pools": entries}, source="values.yaml"
    )
    catalog = rendered_catalog(rendered["default"])
    assert catalog.platform == written.platform
    assert {p.name: p for p in catalog.pools} == {p.name: p for p in written.pools}


def test_h100_values_render_the_h100_profile(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["h100"]
    # The chart renders the catalog entries as written (placement is phiserve's: the topology
    # test), in the order Helm ranges over the pools' names.
    rendered_h100, profile = rendered_catalog(docs), load_catalog("h100")
    assert rendered_h100.platform == profile.platform
    assert {p.name: p for p in rendered_h100.pools} == {p.name: p for p in profile.pools}
    rayservice = one(docs, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # How many GPUs each group holds is checked against the pools in test_helm_topology.py.
    for name, group in ray_groups(rayservice):
        spec = group["template"]["spec"]
        resources = ray_container(group)["resources"]
        if name == "head":
            assert "nvidia.com/gpu" not in resources["limits"]
            continue
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], name
        assert spec["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


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
        # Each tenant's prefix-cache salt is keyed by a secret the chart keeps (issue 9, item 6).
        salt = env["PHISERVE_CACHE_SALT_SECRET"]["valueFrom"]["secretKeyRef"]
        assert salt["name"] in secrets and salt["key"] in secrets[salt["name"]]["data"]
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
    # Full Redis refuses writes (OOM error -> 503) instead of being OOM-killed by the kernel,
    # which would take every tenant down (issue 9, item 2): maxmemory below the limit, with
    # room for the AOF rewrite's fork and client buffers.
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = byte_size(args[args.index("--maxmemory") + 1])
    assert 0 < maxmemory <= 0.8 * byte_size(container["resources"]["limits"]["memory"])
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


def test_extra_adapter_roots_are_mounted_read_only_and_allowed(helm: str) -> None:
    extra = ["--set", "adapters.extraRoots.finetunes.claimName=ft-out"]
    extra += ["--set", "adapters.extraRoots.finetunes.mountPath=/mnt/finetunes"]
    base = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    docs = [d for d in yaml.safe_load_all(run([*base, *extra])) if d]
    service = one(docs, "RayService")
    (app,) = serve_config(service)["applications"]
    assert app["args"]["adapter_roots"] == ["/mnt/finetunes"]
    for name, group in ray_groups(service):
        mounts = {m["mountPath"]: m for m in ray_container(group)["volumeMounts"]}
        assert mounts["/mnt/finetunes"].get("readOnly") is True, name
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in group["template"]["spec"]["volumes"]}
        assert claims["adapters-finetunes"] == {"claimName": "ft-out", "readOnly": True}, name


def test_redis_maxmemory_is_configurable_and_validated(helm: str) -> None:
    base = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    docs = [d for d in yaml.safe_load_all(run([*base, "--set", "redis.maxmemory=300mb"])) if d]
    args = one(docs, "StatefulSet", f"{RELEASE}-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == "300mb"
    refused = subprocess.run(
        [*base, "--set", "redis.maxmemory=lots"], capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0 and "maxmemory" in refused.stderr

"""The Grafana dashboard and its provisioning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.deploy.tooling import (
    COMPOSE_FILE,
    DASHBOARD,
    DASHBOARD_REQUIRED,
    REPO,
    base_metric,
    contract_metric,
    dashboard_exprs,
    promql_metric_names,
    recording_rules,
    run,
)

# ---------------------------------------------------------------------------------- Grafana


def test_dashboard_queries_only_contract_metrics_and_shows_them_all(promtool: str, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = dashboard_exprs(dashboard)
    recorded = recording_rules()
    used: set[str] = set()
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        for name in names:
            # A series recorded by alerts.yml stands for the contract metrics its rule reads.
            sources = promql_metric_names(recorded[name]) if name in recorded else {name}
            for source in sources:
                assert contract_metric(source), (
                    f"panel {title!r} queries {source}, not in the metrics contract"
                )
                used.add(base_metric(source))
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

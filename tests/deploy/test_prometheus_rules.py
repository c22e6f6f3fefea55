"""Prometheus: the config, the alerting rules (promtool) and the chart's PrometheusRule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tooling import (
    ALERTS,
    ALERTS_TEST,
    CHART,
    DEPLOY_DOC,
    PROMETHEUS_DIR,
    RELEASE,
    alert_rules,
    contract_metric,
    one,
    promql_metric_names,
    recording_rules,
    run,
)


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


def test_recording_rules_read_only_contract_metrics() -> None:
    recorded = recording_rules()
    # Per pool from vLLM's counters (their model_name is the pool's name); its values per pool
    # are unit-tested in alerts_test.yml ("prefix cache hit ratio per pool").
    assert promql_metric_names(recorded["pool:phiserve_prefix_cache_hit_ratio:rate5m"]) == {
        "ray_vllm_prefix_cache_hits_total",
        "ray_vllm_prefix_cache_queries_total",
    }
    for record, expr in recorded.items():
        assert re.fullmatch(r"\w+:\w+:\w+", record), f"{record}: not named level:metric:operations"
        names = promql_metric_names(expr)
        assert names, record
        for name in names:
            assert contract_metric(name), f"{record} reads {name}, which is not in the metrics contract"

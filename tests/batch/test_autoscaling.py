"""The batch workers' autoscaling policy: one worker per N waiting items."""

from __future__ import annotations

from types import SimpleNamespace

from services.batch.autoscaling import BACKLOG_METRIC, BacklogPolicy


def _ctx(reports: dict[str, float], current: int = 1) -> SimpleNamespace:
    return SimpleNamespace(aggregated_metrics={BACKLOG_METRIC: reports}, current_num_replicas=current)


def test_workers_follow_the_backlog() -> None:
    policy = BacklogPolicy(items_per_worker=100)
    assert policy(_ctx({"r1": 0.0}))[0] == 1
    assert policy(_ctx({"r1": 100.0}))[0] == 1
    assert policy(_ctx({"r1": 101.0}))[0] == 2
    target, state = policy(_ctx({"r1": 950.0, "r2": 930.0}))
    assert target == 10 and state == {"backlog": 950.0}


def test_no_reports_keeps_the_current_size() -> None:
    policy = BacklogPolicy(items_per_worker=100)
    assert policy(SimpleNamespace(aggregated_metrics=None, current_num_replicas=3))[0] == 3

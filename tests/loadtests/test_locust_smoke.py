"""Smoke runs of loadtests/run.sh (a real locust process) against the session cluster.

One ~20 s run with REST, gRPC, vision and batch users over two new tenants' keys must pass
with no failure and show every user type in its CSV; a short run against a tenant limited to
3 requests a minute must show the 429s as their own entries and still pass, and the verdict
must turn to FAIL when the 429s are counted or the p99 threshold is below what was measured.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from tests.conftest import REPO, Cluster

RUN_SH = REPO / "loadtests" / "run.sh"
CHECK = REPO / "loadtests" / "check_report.py"


def _new_key(admin: httpx.Client, **fields: object) -> str:
    tenant_id = f"lt-{uuid.uuid4().hex[:10]}"
    created = admin.post("/admin/tenants", json={"id": tenant_id, **fields})
    assert created.status_code == 201, created.text
    key = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "locust"})
    assert key.status_code == 201, key.text
    return str(key.json()["key"])


def _run(cluster: Cluster, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCUST": str(Path(sys.executable).parent / "locust")}
    env.pop("PHISERVE_API_KEY", None)
    command = [
        "bash",
        str(RUN_SH),
        "--host",
        cluster.url,
        "-o",
        str(out),
        "--grpc-port",
        str(cluster.settings.grpc_port),
        "--max-tokens",
        "8",
        *args,
    ]
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    print(result.stdout[-6000:], result.stderr[-3000:], sep="\n")
    return result


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "locust_stats.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _count(rows: list[dict[str, str]], predicate) -> int:  # type: ignore[no-untyped-def]
    return sum(int(row["Request Count"]) for row in rows if row["Name"] != "Aggregated" and predicate(row))


def test_smoke_every_user_type_two_tenants(cluster: Cluster, admin: httpx.Client, tmp_path: Path) -> None:
    keys = [_new_key(admin) for _ in range(2)]
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# two tenants, one key each\n" + "\n".join(keys) + "\n")
    out = tmp_path / "report"
    started = time.monotonic()
    result = _run(
        cluster, out, "-u", "4", "-r", "4", "-t", "20s", "--keys-file", str(keys_file), "--stats-by-key",
        "--user-weights", "rest=1,grpc=1,vision=1,batch=1", "--batch-poll-interval", "0.5",
        "--max-error-rate", "0", "--max-p99-ms", "60000",
    )  # fmt: skip
    print(f"smoke run took {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "LOADTEST PASS" in result.stdout
    assert (out / "verdict.txt").read_text().startswith("LOADTEST PASS")
    html = (out / "report.html").read_text()
    assert "TTFT chat stream" in html and "batch job" in html

    rows = _rows(out)
    base = [dict(row, Name=row["Name"].split(" @")[0]) for row in rows]  # --stats-by-key suffix off
    counts = {
        "REST": _count(base, lambda r: r["Type"] == "POST" and r["Name"] in ("chat", "chat stream")),
        "REST stream": _count(base, lambda r: r["Name"] == "chat stream"),
        "TTFT": _count(base, lambda r: r["Type"] == "TTFT" and r["Name"] == "TTFT chat stream"),
        "gRPC": _count(base, lambda r: r["Type"] == "gRPC" and r["Name"] in ("Chat", "ChatStream")),
        "gRPC TTFT": _count(base, lambda r: r["Type"] == "TTFT" and r["Name"] == "TTFT gRPC ChatStream"),
        "vision": _count(base, lambda r: r["Type"] == "POST" and r["Name"].startswith("vision chat")),
        "batch upload": _count(base, lambda r: r["Name"] == "batch upload"),
        "batch create": _count(base, lambda r: r["Name"] == "batch create"),
        "batch poll": _count(base, lambda r: r["Type"] == "GET" and r["Name"] == "batch poll"),
        "batch job": _count(base, lambda r: r["Type"] == "BATCH" and r["Name"] == "batch job"),
    }
    assert all(counts.values()), counts
    total = next(row for row in rows if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and total["Failure Count"] == "0", total
    assert not _count(rows, lambda r: r["Type"] == "429"), "no limits on these tenants"
    # Users took the two tenants' keys round-robin: both appear, by their non-secret prefixes.
    labels = {row["Name"].rsplit(" @", 1)[1] for row in rows if " @" in row["Name"]}
    assert labels == {"-".join(key.split("-")[:2]) for key in keys}, labels
    assert not any(key in (out / "report.html").read_text() for key in keys), "no secret in the report"


def test_refusals_are_their_own_entries_and_thresholds_fail(
    cluster: Cluster, admin: httpx.Client, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.json"
    key = _new_key(admin, limits={"rpm": 3})
    keys_file.write_text(json.dumps({"keys": [{"key": key, "name": "tight", "weight": 1}]}))
    out = tmp_path / "report"
    result = _run(
        cluster, out, "-u", "2", "-r", "2", "-t", "6s", "--keys-file", str(keys_file), "--stats-by-key",
        "--think-time", "0.2", "--stream-ratio", "0.5", "--max-error-rate", "0", "RestUser", "GrpcUser",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _rows(out)
    refused = {row["Name"]: int(row["Request Count"]) for row in rows if row["Type"] == "429"}
    assert any(name.startswith("chat") and "[rate_limit_exceeded] @tight" in name for name in refused), (
        refused
    )
    assert any(name.startswith("gRPC Chat") and "[rate_limit_exceeded]" in name for name in refused), refused
    assert all(row["Failure Count"] == "0" for row in rows), rows

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(CHECK), str(out / "locust"), *args]
        return subprocess.run(command, check=False, capture_output=True, text=True)

    counted = check("--count-429-as-errors")
    assert counted.returncode == 1 and counted.stdout.startswith("LOADTEST FAIL: error rate"), counted.stdout
    slow = check("--max-p99-ms", "0.5")
    assert slow.returncode == 1 and "p99" in slow.stdout and "> 0.5 ms" in slow.stdout, slow.stdout
    assert check("--max-p99-ms", "600000").returncode == 0

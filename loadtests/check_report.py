"""Pass/fail verdict on a locust run, from its CSV reports (standard library only).

    python loadtests/check_report.py OUT/locust --max-error-rate 0.01 --max-p99-ms 2000

Reads OUT/locust_stats.csv (and OUT/locust_exceptions.csv), prints one verdict line,
"LOADTEST PASS: ..." or "LOADTEST FAIL: ...", and exits 0 or 1. The rules:

- error rate = failures / requests over every entry except the type-429 ones (refusals for
  load are an expected outcome; with --count-429-as-errors they count as failed requests);
- p99 (--max-p99-ms), by default per entry: every entry's 99th percentile, except type 429
  and type BATCH (a batch job's turnaround is not a request latency); TTFT entries are held to
  --max-ttft-p99-ms when it is given. --p99-scope aggregated checks locust's Aggregated row;
- the run fails as well when it recorded no request at all, or when user code raised
  (locust_exceptions.csv has rows: a bug in the load test, not in the server).
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

RATE_LIMITED = "429"
NOT_LATENCY = {RATE_LIMITED, "BATCH"}


@dataclass(frozen=True)
class Row:
    type: str
    name: str
    requests: int
    failures: int
    p99_ms: float | None

    @property
    def label(self) -> str:
        return self.name if self.name.startswith(self.type) else f"{self.type} {self.name}".strip()


def read_rows(stats_csv: Path) -> tuple[list[Row], Row | None]:
    rows, total = [], None
    with stats_csv.open(newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            p99 = record.get("99%", "N/A")
            row = Row(
                type=record["Type"],
                name=record["Name"],
                requests=int(record["Request Count"]),
                failures=int(record["Failure Count"]),
                p99_ms=None if p99 in ("", "N/A") else float(p99),
            )
            if row.name == "Aggregated" and not row.type:
                total = row
            else:
                rows.append(row)
    return rows, total


def count_exceptions(exceptions_csv: Path) -> int:
    if not exceptions_csv.exists():
        return 0
    with exceptions_csv.open(newline="", encoding="utf-8") as handle:
        return sum(int(record.get("Count") or 1) for record in csv.DictReader(handle))


def verdict(args: argparse.Namespace) -> tuple[bool, str]:
    prefix = Path(args.prefix)
    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.exists():
        return False, f"no stats file {stats_csv} (did locust run?)"
    rows, total = read_rows(stats_csv)
    refused = sum(r.requests for r in rows if r.type == RATE_LIMITED)
    counted = [r for r in rows if r.type != RATE_LIMITED or args.count_429_as_errors]
    requests = sum(r.requests for r in counted)
    failures = sum(r.failures for r in counted) + (refused if args.count_429_as_errors else 0)
    problems: list[str] = []
    facts: list[str] = []

    if requests == 0:
        problems.append("no requests recorded")
    error_rate = failures / requests if requests else 0.0
    facts.append(f"{requests} requests, {failures} failed ({error_rate:.2%}, max {args.max_error_rate:.2%})")
    if error_rate > args.max_error_rate:
        problems.append(f"error rate {error_rate:.2%} > {args.max_error_rate:.2%}")
    facts.append(
        f"{refused} refused with 429 ({'counted as errors' if args.count_429_as_errors else 'not errors'})"
    )

    if args.max_p99_ms is None and args.max_ttft_p99_ms is None:
        if total is not None and total.p99_ms is not None:
            facts.append(f"p99 {total.p99_ms:g} ms overall (not checked)")
    elif args.p99_scope == "aggregated":
        limit = args.max_p99_ms
        p99 = total.p99_ms if total else None
        shown = f"{p99:g}" if p99 is not None else "n/a"
        facts.append(
            f"p99 {shown} ms overall ({f'max {limit:g} ms' if limit is not None else 'not checked'})"
        )
        if limit is not None and p99 is not None and p99 > limit:
            problems.append(f"p99 {p99:g} ms > {limit:g} ms (Aggregated)")
    else:
        checked = []
        for row in rows:
            if row.type in NOT_LATENCY or row.p99_ms is None or row.requests == 0:
                continue
            limit = (
                args.max_ttft_p99_ms
                if row.type == "TTFT" and args.max_ttft_p99_ms is not None
                else args.max_p99_ms
            )
            if limit is None:
                continue
            checked.append((row.p99_ms, limit, row))
            if row.p99_ms > limit:
                problems.append(f"p99 {row.p99_ms:g} ms > {limit:g} ms on '{row.label}'")
        if checked:
            p99, limit, worst = max(checked, key=lambda item: item[0] / item[1])
            facts.append(f"worst p99 {p99:g} ms on '{worst.label}' (max {limit:g} ms)")

    exceptions = count_exceptions(Path(f"{prefix}_exceptions.csv"))
    if exceptions:
        problems.append(f"{exceptions} exceptions in user code (see {prefix}_exceptions.csv)")
    if problems:
        return False, "; ".join(problems) + " | " + ", ".join(facts)
    return True, ", ".join(facts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "prefix", help="locust's --csv prefix (reads PREFIX_stats.csv, PREFIX_exceptions.csv)"
    )
    parser.add_argument(
        "--max-error-rate", type=float, default=0.01, help="largest failed fraction (0.01 = 1%%)"
    )
    parser.add_argument("--max-p99-ms", type=float, default=None, help="largest p99 response time, ms")
    parser.add_argument("--max-ttft-p99-ms", type=float, default=None, help="largest p99 of TTFT entries, ms")
    parser.add_argument(
        "--p99-scope",
        choices=("each", "aggregated"),
        default="each",
        help="each request entry (default) or locust's Aggregated row",
    )
    parser.add_argument("--count-429-as-errors", action="store_true", help="429 refusals count as failures")
    args = parser.parse_args(argv)
    ok, text = verdict(args)
    print(f"LOADTEST {'PASS' if ok else 'FAIL'}: {text}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Headless locust run against phiserve: CSV + HTML reports, then a pass/fail verdict.
#
#   bash loadtests/run.sh --host http://127.0.0.1:8000 -u 20 -r 5 -t 2m \
#       --max-error-rate 0.01 --max-p99-ms 5000 [--max-ttft-p99-ms MS] [--p99-scope each|aggregated] \
#       [--count-429-as-errors] [-o OUT_DIR] [locust options and user classes...]
#
# Every other argument goes to locust as it is: the locustfile's own options (--keys-file,
# --chat-model, --user-weights, ...; `locust -f loadtests/locustfile.py --help`) and user class
# names (RestUser GrpcUser VisionUser BatchUser; default: all, by --user-weights).
# Writes OUT_DIR/locust_stats.csv, locust_stats_history.csv, locust_failures.csv,
# locust_exceptions.csv, report.html, locust.log and verdict.txt. OUT_DIR defaults to
# .cache/loadtests/<timestamp>. Exit status: 0 PASS, 1 FAIL (thresholds, no requests,
# exceptions in user code), or locust's own status when locust itself failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

users=10 rate=2 duration=1m host=${PHISERVE_URL:-http://127.0.0.1:8000} out=""
check=() passthrough=()
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    -u|--users) users=$2; shift 2 ;;
    -r|--spawn-rate) rate=$2; shift 2 ;;
    -t|--run-time) duration=$2; shift 2 ;;
    -H|--host) host=$2; shift 2 ;;
    -o|--out) out=$2; shift 2 ;;
    --max-error-rate|--max-p99-ms|--max-ttft-p99-ms|--p99-scope) check+=("$1" "$2"); shift 2 ;;
    --count-429-as-errors) check+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; passthrough+=("$@"); break ;;
    *) passthrough+=("$1"); shift ;;
  esac
done

locust=${LOCUST:-}
if [ -z "$locust" ]; then
  if [ -x "$repo/.venv/bin/locust" ]; then locust=$repo/.venv/bin/locust; else locust=$(command -v locust || true); fi
fi
[ -n "$locust" ] || { echo "run.sh: locust not found (pip install -e '.[test]', or set LOCUST)" >&2; exit 2; }
python=$(dirname "$locust")/python
[ -x "$python" ] || python=python3

out=${out:-$repo/.cache/loadtests/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
echo "run.sh: $users users (+$rate/s) for $duration against $host; reports in $out"

# --exit-code-on-error 0: locust's own status then says only whether locust ran; the verdict
# below decides pass/fail from the CSV, where 429s are their own, non-failing, entries.
status=0
"$locust" -f "$here/locustfile.py" --headless -u "$users" -r "$rate" -t "$duration" --host "$host" \
  --csv "$out/locust" --html "$out/report.html" --logfile "$out/locust.log" \
  --only-summary --exit-code-on-error 0 --stop-timeout 5 ${passthrough[@]+"${passthrough[@]}"} || status=$?

if [ "$status" -ne 0 ]; then
  line="LOADTEST FAIL: locust exited with status $status (see $out/locust.log)"
  echo "$line" | tee "$out/verdict.txt"
  exit "$status"
fi
set +e
"$python" "$here/check_report.py" "$out/locust" ${check[@]+"${check[@]}"} | tee "$out/verdict.txt"
verdict=${PIPESTATUS[0]}
set -e
echo "run.sh: reports: $out/report.html, $out/locust_stats.csv"
exit "$verdict"

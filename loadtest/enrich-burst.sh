#!/usr/bin/env bash
# A burst against a slow HTTP API: the enrich kind's load test. Starts
# scripts/test-api on 127.0.0.1:18099 with LATENCY_MS (default 50) per answer, runs
# loadtest/enrich (enrich → rules → score) embedded with `actio run` at RATE tx/s for
# DURATION (default 10,000 tx/s for 1 s: a 10,000-transaction burst), and prints the
# run's report with the API's view: calls, most calls in flight at once.
#
#   loadtest/enrich-burst.sh
#   CONCURRENCY=128 MAX_IN_FLIGHT=2000 loadtest/enrich-burst.sh
#
# Expect throughput ≈ CONCURRENCY / LATENCY (64 / 50 ms = 1,280 tx/s), 0 lost, and a
# peak RSS bounded by what the in-flight caps admit (MAX_IN_FLIGHT: the stage stops
# fetching past it, so the rest of the burst waits in the topic).
set -euo pipefail
cd "$(dirname "$0")/.."
LATENCY_MS="${LATENCY_MS:-50}"
CONCURRENCY="${CONCURRENCY:-64}"
MAX_IN_FLIGHT="${MAX_IN_FLIGHT:-30000}"
RATE="${RATE:-10000}"
DURATION="${DURATION:-1s}"
OUT="${OUT:-results/enrich-burst-$(date +%s)}"
mkdir -p "$OUT"
cargo build --release --quiet
dir="$(mktemp -d)"
cp -r loadtest/enrich/. "$dir/"
sed -i "s/^concurrency = .*/concurrency = $CONCURRENCY/" "$dir/pipeline.toml"
# The caps go in [defaults], which must come before the first table.
sed -i "/^\[key\]/i [defaults]\nmax_in_flight = $MAX_IN_FLIGHT\nmax_in_flight_per_partition = $MAX_IN_FLIGHT\n" "$dir/pipeline.toml"
scripts/test-api --port 18099 --latency-ms "$LATENCY_MS" >"$OUT/api.log" 2>&1 &
api=$!
trap 'kill $api 2>/dev/null || true; rm -rf "$dir"' EXIT
sleep 0.5
echo "enrich burst: $RATE tx/s for $DURATION against a ${LATENCY_MS} ms API, concurrency $CONCURRENCY, max_in_flight $MAX_IN_FLIGHT" | tee "$OUT/setup.txt"
start=$(date +%s.%N)
target/release/actio run "$dir" --rate "$RATE" --duration "$DURATION" --drain 120s --out "$OUT" 2>"$OUT/run.log" | tee "$OUT/report.txt"
end=$(date +%s.%N)
python3 - "$OUT" "$start" "$end" <<'PY'
import json, sys, urllib.request
out, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
stats = json.load(urllib.request.urlopen("http://127.0.0.1:18099/stats"))
r = json.load(open(f"{out}/report.json"))
wall = end - start
print(f"api: {stats['requests']} calls, at most {stats['max_concurrent']} at once, by status {stats['by_status']}")
print(f"decided {r['decided']} of {r['sent']}, lost {r['lost']}, in {wall:.1f} s wall: {r['decided'] / wall:.0f} tx/s overall; peak RSS {r['peak_rss_mib']:.1f} MiB")
PY

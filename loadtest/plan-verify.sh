#!/usr/bin/env bash
# How well `actio plan` predicts: for each rate of RATES, plan PIPELINE for it (the
# plan calibrates both shapes at a quarter and three quarters of the rate), then
# verify the chosen shape RUNS times from that one calibration, and print one line
# per verifying run: predicted and measured e2e p99 and cores busy. The figures in
# BENCHMARKS.md, "Capacity plan", come from this script.
#
#   loadtest/plan-verify.sh
#   RATES="3000 20000" RUNS=1 BUS=kafka loadtest/plan-verify.sh   # on the broker (ACTIO_KAFKA_BROKERS)
set -euo pipefail
cd "$(dirname "$0")/.."
PIPELINE="${PIPELINE:-pipelines/fraud}"
RATES="${RATES:-3000 10000 20000 30000}"
RUNS="${RUNS:-3}"
BUS="${BUS:-embedded}"
P99="${P99:-35ms}"
OUT="${OUT:-results/plan-verify-$(date +%s)}"
cargo build --release --quiet
mkdir -p "$OUT"
printf '%-7s %-9s %-5s %14s %14s %12s %12s\n' rate shape run "p99 predicted" "p99 measured" "cores pred." "cores meas."
for rate in $RATES; do
  target/release/actio plan "$PIPELINE" --rate "$rate" --p99 "$P99" --bus "$BUS" --out "$OUT/$rate" > "$OUT/$rate.txt" 2>&1
  for run in $(seq 1 "$RUNS"); do
    target/release/actio plan "$PIPELINE" --rate "$rate" --p99 "$P99" --bus "$BUS" \
      --from "$OUT/$rate"/calibration/* --verify --out "$OUT/$rate-verify-$run" > "$OUT/$rate-verify-$run.txt" 2>&1
    python3 - "$OUT/$rate-verify-$run/plan.json" "$run" <<'PY'
import json, sys
p = json.load(open(sys.argv[1])); v = p["verify"]
pred = v["predicted_p99_us"]
print("%-7d %-9s %-5s %14s %14.2f %12.2f %12.2f" % (p["target"]["rate"], p["chosen"], sys.argv[2],
      "%.2f" % (pred / 1000) if pred else "saturated", v["measured_p99_us"] / 1000, v["predicted_cores"], v["measured_cores"]))
PY
  done
done
echo "plans and runs under $OUT"

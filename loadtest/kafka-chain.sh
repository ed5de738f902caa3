#!/usr/bin/env bash
# The fraud chain on Kafka as separate processes: one `actio stage` per stage (release
# build), then `actio loadgen`; prints the report and each stage's CPU and peak RSS.
#
#   loadtest/kafka-chain.sh [--rate 3000 --duration 60s ...]   (flags go to loadgen)
#
# Needs a broker: scripts/kafka start (or ACTIO_KAFKA_BROKERS). Stages are stopped
# with SIGTERM at the end (graceful drain), and their exit codes are checked.
set -euo pipefail
cd "$(dirname "$0")/.."
BROKERS="${ACTIO_KAFKA_BROKERS:-127.0.0.1:9092}"
PIPELINE="${PIPELINE:-pipelines/fraud}"
OUT="${OUT:-results/kafka-$(date +%s)}"
mkdir -p "$OUT"
cargo build --release -q
B=target/release/actio
$B topics create "$PIPELINE" --brokers "$BROKERS" >/dev/null

pids=()
stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap stop EXIT
port=9471
for s in rules velocity score; do
    $B stage --pipeline "$PIPELINE" --stage "$s" --brokers "$BROKERS" --http "127.0.0.1:$port" \
        >"$OUT/$s.log" 2>&1 &
    pids+=($!)
    # Wait until ready: holds partitions and the group caught up.
    for _ in $(seq 600); do
        curl -sf "127.0.0.1:$port/readyz" >/dev/null && break
        sleep 0.1
    done
    port=$((port + 1))
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A t0
for p in "${pids[@]}"; do t0[$p]=$(ticks "$p"); done
s0=$(date +%s.%N)
$B loadgen --pipeline "$PIPELINE" --brokers "$BROKERS" --out "$OUT" "$@" | tee "$OUT/report.txt"
s1=$(date +%s.%N)
hz=$(getconf CLK_TCK)
i=0
for s in rules velocity score; do
    p=${pids[$i]}
    cpu=$(echo "(${t0[$p]} $(ticks "$p")) $hz $s0 $s1" | awk '{gsub(/[()]/,""); print 100 * ($2 - $1) / $3 / ($5 - $4)}')
    rss=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$p/status")
    printf 'stage %-9s cpu %5.1f%%  peak RSS %6.1f MiB\n' "$s" "$cpu" "$rss" | tee -a "$OUT/report.txt"
    i=$((i + 1))
done
trap - EXIT
stop
for p in "${pids[@]}"; do wait "$p" || { echo "a stage exited with $?" >&2; exit 1; }; done

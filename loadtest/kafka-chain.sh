#!/usr/bin/env bash
# A pipeline on Kafka as separate processes: one `actio stage` per service (each stage,
# or a declared [[service]]; release build), then `actio loadgen`; prints the report
# and each service's CPU and peak RSS.
#
#   loadtest/kafka-chain.sh [--rate 3000 --duration 60s ...]   (flags go to loadgen)
#   PIPELINE=pipelines/transfers loadtest/kafka-chain.sh ...   (default pipelines/fraud; its risk
#                                        lookup wants scripts/test-api --port 18099, else it
#                                        decides without the risk)
#   PIN=1 loadtest/kafka-chain.sh ...    the broker on CPU 1, stages and loadgen on CPU 0
#   FUSE=1 loadtest/kafka-chain.sh ...   every stage as one fused service (a chain
#                                        only: actio stage --stage rules,velocity,score)
#   ACTIO_BIN=/tmp/actio-old loadtest/kafka-chain.sh ...   that binary, not a fresh
#                                        release build (A/B against an older commit)
#   WARMUP=0 loadtest/kafka-chain.sh ... no warm-up (default WARMUP=10s: the stages,
#                                        fresh processes, first take that much load
#                                        at the same rate, reported apart in $OUT/warmup)
#
# Needs a broker: scripts/kafka start (or ACTIO_KAFKA_BROKERS). Stages are stopped
# with SIGTERM at the end (graceful drain), and their exit codes are checked.
#
# The broker's GC log (ACTIO_BROKER_GC_LOG, else `scripts/kafka gc-log` for a broker on
# 127.0.0.1) goes to loadgen as --broker-gc-log: the report gives each second's p99,
# marks the seconds the broker was stopped for 10 ms or more, and the p99 outside them
# beside the overall p99.
#
# PIN=1 pins every thread of the broker's JVM to CPU 1 (taskset -a) and this script,
# so the stages and the loadgen it starts, to CPU 0: the figure of actio when the
# broker has a core of its own. The broker's affinity goes back to all online CPUs on
# exit. Needs the broker of scripts/kafka (its pid file) and two CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
BROKERS="${ACTIO_KAFKA_BROKERS:-127.0.0.1:9092}"
PIPELINE="${PIPELINE:-pipelines/fraud}"
OUT="${OUT:-results/kafka-$(date +%s)}"
mkdir -p "$OUT"
# ACTIO_BIN=path: run that binary (e.g. an older build, for an A/B), not a fresh build.
if [[ -n "${ACTIO_BIN:-}" ]]; then
    B="$ACTIO_BIN"
else
    cargo build --release -q
    B=target/release/actio
fi
$B topics create "$PIPELINE" --brokers "$BROKERS" >/dev/null

# The broker of scripts/kafka, when BROKERS is one on this machine.
KAFKA_PORT=""
if [[ "$BROKERS" =~ ^(127\.0\.0\.1|localhost):([0-9]+)$ ]]; then
    KAFKA_PORT="${BASH_REMATCH[2]}"
fi
local_gc_log() { [[ -n "$KAFKA_PORT" ]] && ACTIO_KAFKA_PORT="$KAFKA_PORT" scripts/kafka gc-log 2>/dev/null; }
loadgen_args=()
if [[ " $* " != *" --broker-gc-log"* ]]; then
    gc_log="${ACTIO_BROKER_GC_LOG:-$(local_gc_log || true)}"
    if [[ -n "$gc_log" ]]; then
        loadgen_args+=(--broker-gc-log "$gc_log")
    else
        echo "kafka-chain: no broker GC log (scripts/kafka gc-log, ACTIO_BROKER_GC_LOG): no second is marked as a broker pause" >&2
    fi
fi

unpin() { :; }
if [[ "${PIN:-0}" == 1 ]]; then
    state_logs="$(local_gc_log)" || { echo "kafka-chain: PIN=1 needs the broker of scripts/kafka on 127.0.0.1" >&2; exit 2; }
    broker_pid="$(cat "$(dirname "$(dirname "$state_logs")")/broker.pid" 2>/dev/null || true)"
    [[ "$broker_pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$broker_pid/cmdline" 2>/dev/null | grep -q kafka.Kafka \
        || { echo "kafka-chain: PIN=1: no running broker behind its pid file (pid '$broker_pid')" >&2; exit 2; }
    all_cpus="$(cat /sys/devices/system/cpu/online)"
    [[ "$all_cpus" != 0 ]] || { echo "kafka-chain: PIN=1 needs two CPUs (online: $all_cpus)" >&2; exit 2; }
    unpin() {
        taskset -a -pc "$all_cpus" "$broker_pid" >/dev/null 2>&1 \
            || echo "kafka-chain: could not give the broker its CPUs back: taskset -a -pc $all_cpus $broker_pid" >&2
    }
    taskset -a -pc 1 "$broker_pid" >/dev/null
    # Everything started from here on (stages, curl, loadgen) inherits CPU 0.
    taskset -pc 0 $$ >/dev/null
    echo "PIN=1: broker (pid $broker_pid, every thread) on CPU 1; stages and loadgen on CPU 0 (online CPUs: $all_cpus)" | tee "$OUT/pin.txt"
fi

pids=()
stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap 'stop; unpin' EXIT
port=9471
# The pipeline's services as it declares them (each stage alone unless a
# [[service]] fuses some); FUSE=1: every stage in one service (a chain only).
read -r -a services <<<"$($B validate --json "$PIPELINE" | python3 -c 'import json, sys; print(" ".join(s["name"] for s in json.load(sys.stdin)["services"]))')"
if [[ "${FUSE:-0}" == 1 ]]; then
    services=("$($B validate --json "$PIPELINE" | python3 -c 'import json, sys; print(",".join(s["name"] for s in json.load(sys.stdin)["stages"]))')")
fi
for s in "${services[@]}"; do
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

# Fresh stage processes: their first seconds of load (connections, fetch sessions,
# allocator and page-cache warm-up) are measured apart, at the run's own rate.
WARMUP="${WARMUP:-10s}"
if [[ "$WARMUP" != 0 ]]; then
    rate=3000
    for ((a = 1; a <= $#; a++)); do [[ "${!a}" == --rate ]] && { b=$((a + 1)); rate="${!b}"; }; done
    $B loadgen --pipeline "$PIPELINE" --brokers "$BROKERS" --out "$OUT/warmup" --rate "$rate" --duration "$WARMUP" \
        >"$OUT/warmup.txt" 2>&1 || { echo "kafka-chain: the warm-up run failed (see $OUT/warmup.txt)" >&2; exit 1; }
    echo "warm-up: $(grep -E '^e2e p99' "$OUT/warmup.txt" || echo '?') (not counted below)"
fi

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A t0
for p in "${pids[@]}"; do t0[$p]=$(ticks "$p"); done
s0=$(date +%s.%N)
$B loadgen --pipeline "$PIPELINE" --brokers "$BROKERS" --out "$OUT" ${loadgen_args[@]+"${loadgen_args[@]}"} "$@" | tee "$OUT/report.txt"
s1=$(date +%s.%N)
if [[ "${PIN:-0}" == 1 ]]; then
    cat "$OUT/pin.txt" >>"$OUT/report.txt"
fi
hz=$(getconf CLK_TCK)
# CPU per message: the process's CPU over the load (and drain) divided by what it
# decided in that time.
decided=$(grep -o '"decided": *[0-9]*' "$OUT/report.json" | head -1 | grep -o '[0-9]*$')
i=0
for s in "${services[@]}"; do
    p=${pids[$i]}
    cpu=$(echo "(${t0[$p]} $(ticks "$p")) $hz $s0 $s1" | awk '{gsub(/[()]/,""); print 100 * ($2 - $1) / $3 / ($5 - $4)}')
    us=$(echo "(${t0[$p]} $(ticks "$p")) $hz ${decided:-0}" | awk '{gsub(/[()]/,""); if ($4 > 0) print 1e6 * ($2 - $1) / $3 / $4; else print 0}')
    rss=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$p/status")
    printf 'stage %-20s cpu %5.1f%%  %6.1f µs/message  peak RSS %6.1f MiB\n' "$s" "$cpu" "$us" "$rss" | tee -a "$OUT/report.txt"
    i=$((i + 1))
done
trap unpin EXIT
stop
for p in "${pids[@]}"; do wait "$p" || { echo "a stage exited with $?" >&2; exit 1; }; done

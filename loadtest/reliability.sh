#!/usr/bin/env bash
# Reliability scenarios on a real Kafka broker: the fraud chain as separate `actio
# stage` processes (release build), `actio loadgen` offering load, and a fault injected
# on schedule by the scenario file. Bounded in time; stops everything it started.
#
#   loadtest/reliability.sh <scenario>        a name in loadtest/reliability/ or a path
#   loadtest/reliability.sh --list
#
# A scenario file (bash) sets RATE (tx/s), DURATION (s of load), DRAIN (s to wait for
# the last decisions), optionally REPLICAS ("rules=1 velocity=1 score=1"), BROKER
# ("shared": ACTIO_KAFKA_BROKERS or 127.0.0.1:9092; "own": a broker of its own on
# RELIABILITY_KAFKA_PORT, default 9392, stopped at the end), LOADGEN_ARGS, optionally a
# function `prepare` that edits the private pipeline copy in $P before its topics are
# created (e.g. injected faults), and a function `fault` that runs while the load runs,
# using:
#   at SECONDS                 sleep until SECONDS after the load started
#   kill_stage NAME SIGNAL     signal the oldest running instance of stage NAME
#                              (TERM: also waits for its exit and checks it is 0)
#   start_stage NAME           start one more instance (waits until /readyz)
#   scale NAME N               start or gracefully stop instances until N run
#   broker_restart             scripts/kafka restart (own broker only: keeps its data)
#   broker_pause SECONDS       freeze the broker's JVM that long (own broker only), noting
#                              each stage log's rebalance lines before it in
#                              $OUT/rebalance-before.txt
#   mark TEXT                  note an event (time-stamped) in events.log
#
# Output in $OUT (default results/reliability-<scenario>-<time>): report.json etc.
# from loadgen, progress.log (one line per second), events.log, rss.log (per stage
# instance per second), stage logs, and summary.json / summary.txt. The run passes
# (exit 0) when lost = 0, order violations = 0, every stage stopped by SIGTERM exited
# 0, and the scenario's own check (function `check`, optional) passes.
#
# Recovery time: from the first fault (or RECOVERY_FROM, s after load start) to the
# last second in which more than 1 s of load (RATE transactions) was in flight.
# TIME_LIMIT (s, default DURATION + DRAIN + 240) bounds the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DIR=loadtest/reliability

if [[ "${1:-}" == "--list" || -z "${1:-}" ]]; then
    for f in "$DIR"/*.sh; do
        printf '%-18s %s\n' "$(basename "$f" .sh)" "$(sed -n 's/^# //p' "$f" | head -1)"
    done
    [[ -n "${1:-}" ]] || { echo "usage: $0 <scenario>|--list" >&2; exit 2; }
    exit 0
fi
SCENARIO="$1"
FILE="$SCENARIO"
[[ -f "$FILE" ]] || FILE="$DIR/$SCENARIO.sh"
[[ -f "$FILE" ]] || { echo "reliability: no scenario $SCENARIO (see $0 --list)" >&2; exit 2; }
NAME="$(basename "$FILE" .sh)"

prepare() { :; }
fault() { :; }
check() { :; }
# shellcheck source=/dev/null
source "$FILE"
# Defaults for what the scenario file leaves unset (scenario files take RATE,
# DURATION and DRAIN from the environment when set: `DURATION=20 $0 overload`).
: "${RATE:=3000}" "${DURATION:=60}" "${DRAIN:=120}" "${BROKER:=shared}"
: "${REPLICAS:=rules=1 velocity=1 score=1}" "${LOADGEN_ARGS:=}" "${RECOVERY_FROM:=}"
TIME_LIMIT="${TIME_LIMIT:-$((DURATION + DRAIN + 240))}"

OUT="${OUT:-results/reliability-$NAME-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
EVENTS="$OUT/events.log"
: >"$EVENTS"
say() { echo "reliability[$NAME]: $*" >&2; }

cargo build --release -q
B="$ROOT/target/release/actio"

# ---- broker ------------------------------------------------------------------------
OWN_BROKER=0
if [[ "$BROKER" == own ]]; then
    export ACTIO_KAFKA_PORT="${RELIABILITY_KAFKA_PORT:-9392}"
    export ACTIO_KAFKA_CONTROLLER_PORT=$((ACTIO_KAFKA_PORT + 1))
    scripts/kafka stop >/dev/null 2>&1 || true
    BROKERS="$(scripts/kafka start | sed -n 's/^ACTIO_KAFKA_BROKERS=//p')"
    OWN_BROKER=1
else
    BROKERS="${ACTIO_KAFKA_BROKERS:-127.0.0.1:9092}"
fi

# ---- a private copy of the pipeline: its own topics and groups ---------------------
P="$OUT/pipeline"
mkdir -p "$P"
cp -r pipelines/fraud/. "$P/"
PNAME="rel-$NAME-$(date +%s)"
sed -i -e "s/^name = \"fraud\"/name = \"$PNAME\"/" -e "s/\"tx\\./\"$PNAME./g" "$P/pipeline.toml"
prepare
"$B" validate "$P" >"$OUT/validate.log" || { cat "$OUT/validate.log" >&2; exit 2; }
"$B" topics create "$P" --brokers "$BROKERS" >"$OUT/topics.log"

# ---- stage instances ----------------------------------------------------------------
declare -A PID_OF=() STAGE_OF=() PORT_OF=()
ORDER=()       # instance ids in start order
NEXT_PORT=9500
T_LOAD=""
FAILED=()

now() { date +%s.%N; }
elapsed() { [[ -n "$T_LOAD" ]] && awk -v a="$T_LOAD" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }' || echo "-"; }
mark() { printf '%s %s\n' "$(elapsed)" "$*" | tee -a "$EVENTS" >&2; }

# Running (a child that exited stays a zombie until reaped: not alive).
alive() {
    [[ -n "${PID_OF[$1]:-}" ]] || return 1
    local state
    state="$(awk '{print $3}' "/proc/${PID_OF[$1]}/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

# Pid files of the live instances, for the RSS sampler.
write_pids() {
    rm -f "$OUT"/*.pid
    local id
    for id in "${ORDER[@]}"; do
        if alive "$id"; then echo "${PID_OF[$id]}" >"$OUT/$id.pid"; fi
    done
    return 0
}

start_stage() {
    local stage="$1" id port
    while (exec 3<>"/dev/tcp/127.0.0.1/$NEXT_PORT") 2>/dev/null; do NEXT_PORT=$((NEXT_PORT + 1)); done
    port=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 1))
    id="$stage@$port"
    RUST_LOG="${RUST_LOG:-warn,actio=info,actio_runtime=info}" \
        "$B" stage --pipeline "$P" --stage "$stage" --brokers "$BROKERS" --http "127.0.0.1:$port" --grace 60s \
        >"$OUT/$stage-$port.log" 2>&1 &
    PID_OF[$id]=$!
    STAGE_OF[$id]=$stage
    PORT_OF[$id]=$port
    ORDER+=("$id")
    mark "start $id (pid ${PID_OF[$id]})"
    local t0=$SECONDS
    until curl -sf "127.0.0.1:$port/readyz" >/dev/null; do
        alive "$id" || { mark "FAIL $id exited before ready"; FAILED+=("$id exited before ready"); return 1; }
        ((SECONDS - t0 < 120)) || { mark "FAIL $id not ready in 120 s"; FAILED+=("$id not ready"); return 1; }
        sleep 0.2
    done
    mark "ready $id after $((SECONDS - t0)) s"
    write_pids
}

instances_of() {
    local id
    for id in "${ORDER[@]}"; do
        [[ "${STAGE_OF[$id]}" == "$1" ]] && alive "$id" && echo "$id"
    done
    return 0
}

# Peak RSS (VmHWM, MiB) of each instance, kept as it ran: a killed process's is lost.
declare -A HWM_OF=() REAPED=()
note_hwm() {
    local id="$1" kb
    kb="$(awk '/VmHWM/ {print $2}' "/proc/${PID_OF[$id]}/status" 2>/dev/null)" || return 0
    [[ -n "$kb" ]] && HWM_OF[$id]=$kb
    return 0
}

# Stops each stage in turn with signal $1 (t = 10, 25, 40 s) and restarts it at once:
# the crash (KILL) and graceful (TERM) scenarios.
each_stage_in_turn() {
    local sig="$1" t=10 s
    for s in rules velocity score; do
        at $t
        kill_stage "$s" "$sig"
        start_stage "$s"
        t=$((t + 15))
    done
}

kill_stage() {
    local stage="$1" sig="$2" id t0 rc ids
    mapfile -t ids < <(instances_of "$stage")
    id="${ids[0]:-}"
    [[ -n "$id" ]] || { mark "FAIL no running $stage to $sig"; FAILED+=("no $stage to $sig"); return 1; }
    note_hwm "$id"
    t0=$(now)
    mark "$sig $id"
    kill "-$sig" "${PID_OF[$id]}"
    if [[ "$sig" == TERM || "$sig" == INT ]]; then
        rc=0
        wait "${PID_OF[$id]}" || rc=$?
        mark "exit $id code $rc after $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') s"
        ((rc == 0)) || FAILED+=("$id exited $rc on SIG$sig")
        grep -h "stopped" "$OUT/$stage-${PORT_OF[$id]}.log" | tail -1 | sed 's/^/    /' >>"$EVENTS" || true
    else
        wait "${PID_OF[$id]}" 2>/dev/null || true
    fi
    REAPED[$id]=1
    write_pids
}

scale() {
    local stage="$1" want="$2" have
    have="$(instances_of "$stage" | wc -l)"
    mark "scale $stage $have -> $want"
    while ((have < want)); do start_stage "$stage"; have=$((have + 1)); done
    while ((have > want)); do kill_stage "$stage" TERM; have=$((have - 1)); done
}

broker_restart() {
    ((OWN_BROKER)) || { mark "FAIL broker_restart needs BROKER=own"; FAILED+=("broker_restart on a shared broker"); return 1; }
    mark "broker restart: stopping"
    scripts/kafka restart >/dev/null
    mark "broker restart: ready"
}

broker_pause() {
    ((OWN_BROKER)) || { mark "FAIL broker_pause needs BROKER=own"; FAILED+=("broker_pause on a shared broker"); return 1; }
    rebalance_lines >"$OUT/rebalance-before.txt"
    mark "broker pause: SIGSTOP for $1 s"
    scripts/kafka pause "$1" >/dev/null
    mark "broker pause: SIGCONT"
}

# Per stage log: how many times it was assigned partitions and how many it lost.
rebalance_lines() {
    for f in "$OUT"/*-[0-9]*.log; do
        printf '%s assigned=%s lost=%s\n' "$(basename "$f")" "$(grep -c '"assigned"\|assigned ' "$f" || true)" "$(grep -c 'partitions lost' "$f" || true)"
    done
}

at() {
    local t="$1"
    while awk -v a="$T_LOAD" -v b="$(now)" -v t="$t" 'BEGIN { exit !(b - a < t) }'; do sleep 0.1; done
}

SAMPLER=""
LOADGEN=""
WATCHDOG=""
cleanup() {
    [[ -n "$WATCHDOG" ]] && kill "$WATCHDOG" 2>/dev/null || true
    [[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null || true
    [[ -n "$LOADGEN" ]] && kill "$LOADGEN" 2>/dev/null || true
    for id in "${ORDER[@]}"; do alive "$id" && kill -KILL "${PID_OF[$id]}" 2>/dev/null || true; done
    if ((OWN_BROKER)); then scripts/kafka stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
# The whole run is bounded: past TIME_LIMIT the watchdog ends it (cleanup runs).
( sleep "$TIME_LIMIT"; echo "reliability[$NAME]: time limit ${TIME_LIMIT}s reached; stopping" >&2; kill -TERM $$ ) &
WATCHDOG=$!
trap 'exit 124' TERM

for spec in $REPLICAS; do
    for _ in $(seq "${spec#*=}"); do start_stage "${spec%%=*}"; done
done

# RSS of every live stage instance, once a second: "t id rss_kb hwm_kb".
(
    while sleep 1; do
        for f in "$OUT"/*.pid; do
            [[ -f "$f" ]] || continue
            pid="$(cat "$f")"
            s="/proc/$pid/status"
            [[ -r "$s" ]] && awk -v id="$(basename "$f" .pid)" -v t="$(date +%s)" \
                '/VmRSS/ {r=$2} /VmHWM/ {h=$2} END {if (r) print t, id, r, h}' "$s"
        done
    done >>"$OUT/rss.log"
) &
SAMPLER=$!
write_pids

say "load: $RATE tx/s for ${DURATION}s on $BROKERS; replicas: $REPLICAS"
T_LOAD=$(now)
# shellcheck disable=SC2086
"$B" loadgen --pipeline "$P" --brokers "$BROKERS" --rate "$RATE" --duration "${DURATION}s" \
    --drain "${DRAIN}s" --out "$OUT" $LOADGEN_ARGS >"$OUT/report.txt" 2>"$OUT/progress.log" &
LOADGEN=$!
mark "load started"
fault
LOADGEN_RC=0
wait "$LOADGEN" || LOADGEN_RC=$?
LOADGEN=""
mark "loadgen exited $LOADGEN_RC"

# Graceful stop of everything still running; each must exit 0.
for id in "${ORDER[@]}"; do
    alive "$id" || continue
    note_hwm "$id"
    kill -TERM "${PID_OF[$id]}"
done
for id in "${ORDER[@]}"; do
    [[ -z "${REAPED[$id]:-}" ]] || continue
    rc=0
    wait "${PID_OF[$id]}" 2>/dev/null || rc=$?
    if ((rc != 0)); then
        FAILED+=("$id exited $rc at the end")
        mark "FAIL $id exited $rc at the end"
    fi
done
kill "$SAMPLER" 2>/dev/null || true
SAMPLER=""
kill "$WATCHDOG" 2>/dev/null || true

# ---- summary -------------------------------------------------------------------------
[[ -f "$OUT/report.json" ]] || { say "no report.json (loadgen exit $LOADGEN_RC)"; tail -5 "$OUT/progress.log" >&2; exit 1; }
# Peak RSS per stage: the largest VmHWM of any of its instances (sampled or at stop).
declare -A PEAK=()
while read -r _ id _ hwm; do
    s="${id%@*}"
    if ((hwm > ${PEAK[$s]:-0})); then PEAK[$s]=$hwm; fi
done < <(cat "$OUT/rss.log" 2>/dev/null)
for id in "${!HWM_OF[@]}"; do
    s="${id%@*}"
    if ((HWM_OF[$id] > ${PEAK[$s]:-0})); then PEAK[$s]=${HWM_OF[$id]}; fi
done
rss_json="$(for s in rules velocity score; do printf '"%s": %.1f,' "$s" "$(awk -v k="${PEAK[$s]:-0}" 'BEGIN { print k / 1024 }')"; done)"
# The summary: loadgen's report, the per-second progress lines (worst p99, largest
# in flight, recovery after each fault) and the peak RSS per stage.
python3 - "$OUT" "$NAME" "$RATE" "$DURATION" "${RECOVERY_FROM:-}" "{${rss_json%,}}" <<'EOF'
import json, re, sys
out, name, rate, duration, recovery_from, rss = sys.argv[1:]
rate = int(rate)
r = json.load(open(f"{out}/report.json"))
# "  12.0s  sent 36000  decided 35990  3000 tx/s  in flight 10  p99 1.23 ms"
ticks = []
for line in open(f"{out}/progress.log"):
    m = re.match(r"\s*([\d.]+)s\s+sent\s+(\d+)\s+decided\s+(\d+).*in flight\s+(\d+)\s+p99 ([\d.]+|-)", line)
    if m:
        ticks.append((float(m[1]), int(m[4]), None if m[5] == "-" else float(m[5])))
faults = [float(l.split()[0]) for l in open(f"{out}/events.log")
          if re.match(r"[\d.]+ (KILL|TERM|scale|broker restart: stopping)", l)]
if recovery_from:
    faults = [float(recovery_from)]
# Recovery after each fault: until the last second, before the next fault, with more
# than one second of load in flight.
recovery = []
for i, f in enumerate(faults):
    nxt = faults[i + 1] if i + 1 < len(faults) else float("inf")
    backlog = [t for t, fl, _ in ticks if f <= t < nxt and fl > rate]
    recovery.append(round(max(backlog) - f, 1) if backlog else 0.0)
s = {
    "scenario": name, "rate": rate, "duration_s": int(duration),
    "sent": r["sent"], "decided": r["decided"], "dlq": r["dlq"], "lost": r["lost"],
    "duplicates": r["duplicates"], "order_violations": r["order_violations"],
    "retried": r.get("retried", 0), "reordered_by_retry": r.get("reordered_by_retry", 0),
    "e2e_p50_ms": r["e2e"]["p50_us"] / 1000, "e2e_p99_ms": r["e2e"]["p99_us"] / 1000,
    "e2e_max_ms": r["e2e"]["max_us"] / 1000,
    "worst_1s_p99_ms": max((p for _, _, p in ticks if p is not None), default=None),
    "max_in_flight": max((fl for _, fl, _ in ticks), default=0),
    "faults_at_s": faults, "recovery_s": recovery,
    "peak_rss_mib": json.loads(rss),
}
json.dump(s, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(s))
EOF
{
    cat "$OUT/summary.json"
    echo
    cat "$EVENTS"
} >"$OUT/summary.txt"
read -r lost order < <(python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['lost'], s['order_violations'])" "$OUT/summary.json")
((lost == 0)) || FAILED+=("lost $lost")
((order == 0)) || FAILED+=("order violations $order")
((LOADGEN_RC == 0)) || FAILED+=("loadgen exited $LOADGEN_RC")
check || FAILED+=("scenario check failed")
if ((${#FAILED[@]})); then
    say "FAILED: ${FAILED[*]} (see $OUT)"
    exit 1
fi
say "passed (see $OUT/summary.txt)"

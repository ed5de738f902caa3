#!/usr/bin/env bash
# Several variants of loadtest/kafka-chain.sh, run alternately for ROUNDS rounds, then
# one table: each run's e2e p50, p99, median per-second p99 and µs of CPU per message
# per service, the medians per variant, and how many runs held the p99 bar. The
# machine's noise drifts by the hour, so variants compared on one page must run
# interleaved, not one after the other.
#
#   loadtest/kafka-ab.sh VARIANT... [-- kafka-chain/loadgen flags]
#
# A VARIANT is `label` or `label:NAME=value,NAME=value`: environment for that
# variant's runs, e.g.
#
#   loadtest/kafka-ab.sh shipped linger1:ACTIO_KAFKA_PROPERTY_LINGER_MS=1
#   loadtest/kafka-ab.sh old:ACTIO_BIN=/tmp/actio-old new -- --duration 30s
#   ROUNDS=10 loadtest/kafka-ab.sh separate fused:FUSE=1
#
# ROUNDS (default 3), BAR_MS (default 35: a run holds the bar when its whole-run e2e
# p99 is at most that), OUT (default results/kafka-ab-<time>; each run in
# $OUT/<label>-<round>). The flags after `--` go to every run (default: --rate 3000
# --duration 60s). Needs a broker (scripts/kafka start); a run that fails is shown as
# failed and the others go on.
set -euo pipefail
cd "$(dirname "$0")/.."
variants=()
while (($#)) && [[ "$1" != -- ]]; do
    variants+=("$1")
    shift
done
[[ "${1:-}" == -- ]] && shift
flags=("$@")
((${#flags[@]})) || flags=(--rate 3000 --duration 60s)
((${#variants[@]})) || { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
ROUNDS="${ROUNDS:-3}"
BAR_MS="${BAR_MS:-35}"
OUT="${OUT:-results/kafka-ab-$(date +%s)}"
mkdir -p "$OUT"
declare -A seen_labels=()
for v in "${variants[@]}"; do
    label="${v%%:*}"
    [[ -z "${seen_labels[$label]:-}" ]] || { echo "kafka-ab: two variants are labelled '$label'" >&2; exit 2; }
    seen_labels[$label]=1
    [[ "$label" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "kafka-ab: a variant's label is letters, digits, . _ - (got '$label')" >&2; exit 2; }
    if [[ "$v" == *:* ]]; then
        IFS=, read -r -a envs <<<"${v#*:}"
        for e in "${envs[@]}"; do
            [[ "$e" =~ ^[A-Z_][A-Z0-9_]*=.*$ ]] || { echo "kafka-ab: variant $label: '$e' is not NAME=value" >&2; exit 2; }
        done
    fi
done

for ((r = 1; r <= ROUNDS; r++)); do
    for v in "${variants[@]}"; do
        label="${v%%:*}"
        envs=()
        [[ "$v" == *:* ]] && IFS=, read -r -a envs <<<"${v#*:}"
        dir="$OUT/$label-$r"
        echo "kafka-ab: round $r/$ROUNDS, $label ${envs[*]:-}" >&2
        if env ${envs[@]+"${envs[@]}"} OUT="$dir" loadtest/kafka-chain.sh "${flags[@]}" >"$dir.log" 2>&1; then
            echo ok >"$dir.status"
        else
            echo "failed (exit $?): $dir.log" >"$dir.status"
            echo "kafka-ab: $label round $r failed; see $dir.log" >&2
        fi
    done
done

python3 - "$OUT" "$BAR_MS" "${variants[@]}" <<'EOF'
import json, re, statistics, sys
from pathlib import Path

out, bar = Path(sys.argv[1]), float(sys.argv[2])
labels = [v.split(":", 1)[0] for v in sys.argv[3:]]

def run(d):
    status = (d.parent / (d.name + ".status")).read_text().strip()
    if status != "ok" or not (d / "report.txt").exists():
        return None
    txt = (d / "report.txt").read_text()
    e2e = re.search(r"^e2e\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", txt, re.M)
    if e2e is None:
        return None  # nothing decided: no e2e row
    per_s = re.search(r"median of the \d+ per-second p99s ([\d.]+)", txt)
    cpu = re.findall(r"^stage (\S+)\s+cpu\s+[\d.]+%\s+([\d.]+) µs/message", txt, re.M)
    rep = json.loads((d / "report.json").read_text())
    return {"p50": float(e2e.group(1)), "p99": float(e2e.group(3)), "per_s": float(per_s.group(1)) if per_s else None,
            "cpu": [(n, float(u)) for n, u in cpu], "lost": rep.get("lost"), "steal": rep.get("machine_steal_pct")}

print(f"{'run':<24} {'p50 ms':>8} {'p99 ms':>9} {'p99/s ms':>9}  {'µs per message':<15} {'steal %':>7} lost")
summary = []
for label in labels:
    runs = sorted((p for p in out.glob(f"{label}-[0-9]*") if re.fullmatch(rf"{re.escape(label)}-\d+", p.name)), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    got = []
    for d in runs:
        r = run(d)
        if r is None:
            print(f"{d.name:<24} failed")
            continue
        got.append(r)
        cpu = " / ".join(f"{u:.0f}" for _, u in r["cpu"])
        per_s = f"{r['per_s']:9.2f}" if r["per_s"] is not None else f"{'-':>9}"
        steal = f"{r['steal']:7.1f}" if r["steal"] is not None else f"{'-':>7}"
        print(f"{d.name:<24} {r['p50']:8.2f} {r['p99']:9.2f} {per_s}  {cpu:<15} {steal} {r['lost']}")
    if got:
        held = sum(r["p99"] <= bar for r in got)
        def med(k):
            xs = [r[k] for r in got if r[k] is not None]
            return f"{statistics.median(xs):.2f} ms" if xs else "-"
        summary.append(f"{label}: median p50 {med('p50')}, p99 {med('p99')}, per-second p99 {med('per_s')}; p99 <= {bar:g} ms in {held} of {len(got)} runs")
print()
print("\n".join(summary))
EOF

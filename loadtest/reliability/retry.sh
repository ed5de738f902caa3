# Retries: 3,000 tx/s for 60 s with faults injected by transaction id ([[stage.fault]]):
# 1 % fail transiently 4 times at rules (3 in place, then once more on their first trip
# through the retry topic, where they succeed), 0.1 % fail permanently at velocity and
# 0.1 % panic at score. Passes when lost = 0, every transient one is decided through the
# retry topic, exactly the permanent and panicking ones are dead-lettered, and nothing
# left its card's order but the retried ones (the retry topic's documented effect).
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-120}

# Transaction ids are <run>-<seq>, seq from 0: their last digits pick the faulted ones.
TRANSIENT_SUFFIX=07   # seq % 100 == 7: 1 %
PERMANENT_SUFFIX=113  # seq % 1000 == 113: 0.1 %
PANIC_SUFFIX=213      # seq % 1000 == 213: 0.1 %

prepare() {
    python3 - "$P/pipeline.toml" "$TRANSIENT_SUFFIX" "$PERMANENT_SUFFIX" "$PANIC_SUFFIX" <<'EOF'
import sys
path, transient, permanent, panic = sys.argv[1:]
faults = [
    f"[[stage.fault]]\nwhen = \"tx.id.endsWith('{transient}')\"\nfail = \"transient\"\ntimes = 4\n",
    f"[[stage.fault]]\nwhen = \"tx.id.endsWith('{permanent}')\"\nfail = \"permanent\"\n",
    f"[[stage.fault]]\nwhen = \"tx.id.endsWith('{panic}')\"\nfail = \"panic\"\n",
]
# Each stage of the fraud pipeline (rules, velocity, score) ends with its
# [stage.limits] line `budget_ms = 5.0`: a stage's faults go right after it.
end = "budget_ms = 5.0\n"
parts = open(path).read().split(end)
if len(parts) != 4:
    sys.exit(f"retry scenario: expected 3 stages ending in {end!r} in {path}")
text = "".join(p + end + f for p, f in zip(parts, faults)) + parts[3]
open(path, "w").write(text)
EOF
}

check() {
    python3 - "$OUT/report.json" "$TRANSIENT_SUFFIX" "$PERMANENT_SUFFIX" "$PANIC_SUFFIX" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
transient, permanent, panic = sys.argv[2:]
sent = r["sent"]
# How many of the ids <run>-0 .. <run>-(sent-1) end with a suffix (seq 7 does not
# end with "07").
def ending(suffix):
    return sum(1 for seq in range(sent) if str(seq).endswith(suffix))
want_retried = ending(transient)
want_dlq = ending(permanent) + ending(panic)
checks = {
    "every transient one decided through the retry topic": r["retried"] == want_retried,
    "exactly the permanent and panicking ones dead-lettered": r["dlq"] == want_dlq,
    "everything else decided": r["decided"] == sent - want_dlq,
}
print(f"retry check: sent {sent}, retried {r['retried']} (want {want_retried}, "
      f"{r['reordered_by_retry']} decided behind a later tx of their card), "
      f"dlq {r['dlq']} (want {want_dlq}), decided {r['decided']} (want {sent - want_dlq})")
for what, ok in checks.items():
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
sys.exit(0 if all(checks.values()) else 1)
EOF
    return "${PIPESTATUS[0]}"
}

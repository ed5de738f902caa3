# Broker pause: the broker's JVM (its own, on RELIABILITY_KAFKA_PORT) is frozen for 3 s
# (SIGSTOP, then SIGCONT) 20 s into a 3,000 tx/s run, as a long GC or safepoint pause
# freezes it. Passes when nothing is lost and no stage lost or was re-assigned a
# partition: a stall shorter than the session timeout must not cost a rebalance.
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-120}
BROKER=own
PAUSE_S=${PAUSE_S:-3}
RECOVERY_FROM=${RECOVERY_FROM:-20}
fault() {
    at 20
    broker_pause "$PAUSE_S"
}
check() {
    rebalance_lines >"$OUT/rebalance-after.txt"
    if diff -u "$OUT/rebalance-before.txt" "$OUT/rebalance-after.txt" >"$OUT/rebalance.diff"; then
        echo "broker pause: no stage was assigned or lost a partition after the pause" | tee -a "$OUT/summary.txt"
    else
        echo "broker pause: rebalances after the pause:" | tee -a "$OUT/summary.txt"
        tee -a "$OUT/summary.txt" <"$OUT/rebalance.diff"
        return 1
    fi
}

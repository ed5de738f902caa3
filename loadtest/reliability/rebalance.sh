# Rebalance under load: the velocity stage (stateful) scaled 1 → 3 → 1 replicas during
# a 3,000 tx/s run. 0 lost, 0 per-key order violations; the worst per-second p99 is the
# p99 during the rebalances.
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-120}
STAGE=${STAGE:-velocity}
fault() {
    at 10
    scale "$STAGE" 3
    at 35
    scale "$STAGE" 1
}

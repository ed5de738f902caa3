# Broker restart: the broker (its own, on RELIABILITY_KAFKA_PORT) is stopped and started
# again on its data 15 s into a 3,000 tx/s run. Stages and loadgen reconnect and catch
# up: 0 lost.
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-180}
BROKER=own
fault() {
    at 15
    broker_restart
}

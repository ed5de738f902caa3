# Baseline: 3,000 tx/s for 60 s, no fault (the reference for the others).
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-60}

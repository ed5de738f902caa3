# Overload: offer ~10× what the chain sustains on this machine (3-5k tx/s) for 60 s.
# Back-pressure pauses fetching, so each stage's RSS stays bounded (peak VmHWM
# reported); lag grows, then drains after the burst: 0 lost. Recovery is counted from
# the end of the burst to the last second with more than 1 s of load in flight.
RATE=${RATE:-40000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-900}
RECOVERY_FROM=$DURATION
TIME_LIMIT=$((DURATION + DRAIN + 300))

# Crash: SIGKILL each stage in turn at 3,000 tx/s (no drain, no commit, no leave),
# restarted at once. 0 lost; duplicates counted (redelivered past the last commit).
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-120}
fault() { each_stage_in_turn KILL; }

# Graceful stop under load: SIGTERM each stage in turn at 3,000 tx/s, restarted at once.
# Each must exit 0 within its grace period; its successor resumes from the committed
# watermark: 0 lost, duplicates = what was processed but not yet committed.
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
DRAIN=${DRAIN:-120}
fault() { each_stage_in_turn TERM; }

//! The driver: one thread per stage that polls the input (and retry) consumer, admits
//! records into their key lanes, pauses and resumes partitions for back-pressure,
//! commits watermarks and stops the stage. It never runs between two messages of a
//! lane; workers do (see `worker`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_core::time::now_ns;
use actio_core::{Bus, BusError, Consumer, Offset, Producer, Record, TopicPartition, headers};
use parking_lot::Mutex;

use super::retry_topic::retry_due;
use super::state::{Shared, Work};
use super::{StageError, StopMode};
use crate::metrics::StageMetrics;

pub(super) struct Driver<B: Bus> {
    pub(super) shared: Arc<Shared<B::Producer>>,
    pub(super) consumer: B::Consumer,
    /// The retry topic's consumer (its own group), polled without waiting each round.
    pub(super) retry: Option<B::Consumer>,
    pub(super) stop: Arc<Mutex<Option<StopMode>>>,
}

/// Most records admitted per driver round before it looks at completions again.
pub(super) const ADMIT_BATCH: usize = 256;

impl<B: Bus> Driver<B> {
    pub(super) fn run(mut self) -> Result<StageMetrics, StageError> {
        let s = self.shared.clone();
        let mut last_commit = Instant::now();
        let tick_every = s.handler.tick_interval();
        let mut last_tick = Instant::now();
        let outcome = loop {
            if let Some(mode) = *self.stop.lock() {
                break Ok(mode);
            }
            s.apply_pending_done();
            let fatal = {
                let mut st = s.state.lock();
                // Once failed, nothing more is committed: not even by the revocation
                // that dropping a Kafka consumer runs.
                st.fatal.take().inspect(|_| st.no_more_commits = true)
            };
            if let Some(e) = fatal {
                break Err(e);
            }
            if last_commit.elapsed() >= s.spec.commit_interval {
                if let Err(e) = self.commit() {
                    break Err(e);
                }
                last_commit = Instant::now();
            }
            if let Some(every) = tick_every
                && last_tick.elapsed() >= every
            {
                self.tick();
                last_tick = Instant::now();
            }
            self.release_due();
            if let Err(e) = self.flow_control() {
                break Err(e);
            }
            // Retry copies waiting for their due time are not work: poll as when idle.
            // With work in flight the driver only has completions to apply (outputs are
            // produced by whoever ran the work), so it wakes at the commit cadence, not
            // every millisecond: a wakeup per millisecond per stage was CPU the broker
            // on the same cores needed.
            let idle = { let st = s.state.lock(); st.in_flight() == st.held() };
            let mut timeout = if idle { Duration::from_millis(20) } else { s.spec.commit_interval.clamp(Duration::from_millis(1), Duration::from_millis(5)) };
            let mut admitted = 0;
            while admitted < ADMIT_BATCH {
                match self.consumer.poll(timeout) {
                    Ok(Some(rec)) => {
                        self.admit(rec)?;
                        admitted += 1;
                        timeout = Duration::ZERO;
                    }
                    Ok(None) => break,
                    Err(e) if e.is_retriable() => {
                        tracing::warn!(stage = %s.spec.name, error = %e, "poll failed; retrying");
                        break;
                    }
                    Err(e) => return Err(StageError::Bus { stage: s.spec.name.clone(), source: e }),
                }
            }
            self.poll_retry()?;
            s.dispatch_ready(true, admitted);
        };
        match outcome {
            Ok(StopMode::Abort) => {
                // No commit, no graceful leave: like a crash. Dropping a Kafka consumer
                // still runs its revocation, which must not commit a transaction.
                s.state.lock().no_more_commits = true;
                drop(self.consumer);
                drop(self.retry);
                Ok(s.snapshot())
            }
            Ok(StopMode::Graceful) => {
                // close() revokes everything through the listener, which drains and
                // returns the watermarks; the bus commits them before leaving.
                let name = s.spec.name.clone();
                self.consumer.close().map_err(|source| StageError::Bus { stage: name.clone(), source })?;
                if let Some(retry) = self.retry {
                    retry.close().map_err(|source| StageError::Bus { stage: name.clone(), source })?;
                }
                s.producer.flush(s.spec.drain_timeout).map_err(|source| StageError::Bus { stage: name, source })?;
                Ok(s.snapshot())
            }
            Err(e) => {
                // Commit what is safely done; nothing past a failed message. Not a
                // transaction: what the open one holds is aborted with the stage.
                if !s.eos {
                    let _ = self.commit();
                }
                Err(e)
            }
        }
    }

    /// Admits a record into its lane (running it at once if the lane is idle) and
    /// pauses fetching as soon as a cap is reached, so in-flight never exceeds it on
    /// a bus that honours pause at once.
    pub(super) fn admit(&mut self, rec: Record) -> Result<(), StageError> {
        let s = &self.shared;
        let consumed_ns = now_ns();
        let prev = rec
            .headers
            .get(headers::TRAIL)
            .and_then(headers::last_produced_ns)
            .or_else(|| rec.headers.get(headers::CREATED).and_then(headers::parse_i64))
            .or_else(|| rec.timestamp_ms.map(|ms| ms * 1_000_000));
        let queue_ns = prev.map_or(0, |p| consumed_ns - p);
        let tp = rec.tp.clone();
        let (run, pause) = {
            let mut st = s.state.lock();
            let total = st.in_flight() + 1;
            let Some(part) = st.parts.get_mut(&tp) else { return Ok(()) };
            if part.revoking || !part.wm.consumed(rec.offset) {
                return Ok(());
            }
            if let Some(seq) = part.seq.as_mut() {
                seq.consumed(rec.offset);
            }
            let lane = part.lanes.lane_of(rec.key.as_deref());
            let from_retry = part.retry;
            let mut pause = Vec::new();
            let run = if from_retry && (!part.held.is_empty() || retry_due(&rec) > consumed_ns) {
                // Not due (or behind one that is not): hold it, and stop fetching this
                // retry partition until the held ones have run. Input partitions go on.
                part.held.push_back((retry_due(&rec), Work { rec, lane, consumed_ns, queue_ns, from_retry }));
                if !part.paused {
                    part.paused = true;
                    pause.push((tp.clone(), from_retry));
                }
                None
            } else {
                part.lanes.admit(lane, Work { rec, lane, consumed_ns, queue_ns, from_retry }).map(|w| (w, part.epoch))
            };
            if total >= s.spec.max_in_flight {
                for (tp, p) in st.parts.iter_mut().filter(|(_, p)| !p.paused) {
                    p.paused = true;
                    pause.push((tp.clone(), p.retry));
                }
            } else if let Some(p) = st.parts.get_mut(&tp).filter(|p| !p.paused && p.wm.len() >= s.spec.max_in_flight_per_partition) {
                p.paused = true;
                pause.push((tp.clone(), p.retry));
            }
            st.metrics.pauses += pause.len() as u64;
            st.metrics.in_flight_peak = st.metrics.in_flight_peak.max(total as u64);
            (run, pause)
        };
        if let Some((work, epoch)) = run {
            s.ready.lock().push((tp, epoch, work));
        }
        if !pause.is_empty() {
            let name = s.spec.name.clone();
            self.route(pause, |c, tps| c.pause(tps)).map_err(|source| StageError::Bus { stage: name, source })?;
        }
        Ok(())
    }

    /// Applies `f` to the input consumer with the input partitions among `tps`, and to
    /// the retry consumer with the retry ones (each flagged as its [`Part`] is).
    ///
    /// [`Part`]: super::state::Part
    fn route(&mut self, tps: Vec<(TopicPartition, bool)>, f: impl Fn(&mut B::Consumer, &[TopicPartition]) -> Result<(), BusError>) -> Result<(), BusError> {
        let (on_retry, on_input) = split_by_retry(tps);
        let Some(retry) = self.retry.as_mut() else { return f(&mut self.consumer, &on_input) };
        if !on_input.is_empty() {
            f(&mut self.consumer, &on_input)?;
        }
        if !on_retry.is_empty() {
            f(retry, &on_retry)?;
        }
        Ok(())
    }

    /// Produces what the handler emits on its own (a join's timed-out transactions),
    /// releasing the holds each output carries once it is delivered.
    fn tick(&self) {
        let s = &self.shared;
        if s.eos {
            return; // outputs of no message have no offset to commit with (refused at load)
        }
        for o in s.handler.tick() {
            if o.hold.is_some() {
                continue; // no message to hold
            }
            let releases = o.releases;
            let kept = releases.clone();
            let mut hdrs = o.headers.unwrap_or_default();
            let now = now_ns();
            let mut trail = hdrs.get(headers::TRAIL).map(<[u8]>::to_vec).unwrap_or_default();
            headers::append_hop(&mut trail, &s.spec.name, now, now);
            hdrs.set(headers::TRAIL, trail);
            let rec = actio_core::OutRecord { topic: o.topic, partition: None, key: o.key, payload: o.payload, headers: hdrs };
            let settle = Box::new(move |res: Result<actio_core::bus::Delivered, BusError>| super::worker::settle_releases(&releases, res.as_ref().err()));
            if let Err(e) = s.producer.send(rec, settle) {
                super::worker::settle_releases(&kept, Some(&e));
            }
        }
    }

    fn commit(&mut self) -> Result<(), StageError> {
        let s = &self.shared;
        if s.eos {
            // Outputs and offsets in one transaction, with each consumer's membership
            // as it is now.
            let tokens = [self.consumer.group_token(), self.retry.as_ref().and_then(|r| r.group_token())];
            return s.commit_transaction(tokens);
        }
        let offsets: Vec<((TopicPartition, Offset), bool)> = {
            let mut st = s.state.lock();
            for p in st.parts.values_mut().filter(|p| !p.holds.is_empty()) {
                p.holds.retain(|h| !h.is_finished());
            }
            st.parts
                .iter()
                .filter_map(|(tp, p)| p.wm.committable().filter(|o| Some(*o) != p.last_committed).map(|o| ((tp.clone(), o), p.retry)))
                .collect()
        };
        if offsets.is_empty() {
            return Ok(());
        }
        let (on_retry, on_input) = split_by_retry(offsets);
        for (consumer, offsets) in [(Some(&mut self.consumer), on_input), (self.retry.as_mut(), on_retry)] {
            let Some(consumer) = consumer.filter(|_| !offsets.is_empty()) else { continue };
            match consumer.commit(&offsets) {
                Ok(()) => {
                    let mut st = s.state.lock();
                    for (tp, o) in &offsets {
                        if let Some(p) = st.parts.get_mut(tp) {
                            p.last_committed = Some(*o);
                        }
                    }
                    st.metrics.commits += 1;
                }
                Err(e) if e.is_retriable() => {
                    tracing::warn!(stage = %s.spec.name, error = %e, "commit failed; will retry");
                }
                // A partition moved away between the snapshot and the commit: harmless,
                // the listener committed its watermark on revocation.
                Err(e) => {
                    tracing::warn!(stage = %s.spec.name, error = %e, "commit refused");
                }
            }
        }
        Ok(())
    }


    /// Resumes paused partitions once they (and the stage) are below half their caps
    /// and, for a retry partition, nothing waits for its due time.
    fn flow_control(&mut self) -> Result<(), StageError> {
        let s = &self.shared;
        let resume = {
            let mut st = s.state.lock();
            if st.in_flight() > s.spec.max_in_flight / 2 {
                return Ok(());
            }
            let per = s.spec.max_in_flight_per_partition;
            st.parts
                .iter_mut()
                .filter(|(_, p)| p.paused && p.held.is_empty() && p.wm.len() <= per / 2)
                .map(|(tp, p)| {
                    p.paused = false;
                    (tp.clone(), p.retry)
                })
                .collect::<Vec<_>>()
        };
        if !resume.is_empty() {
            let name = s.spec.name.clone();
            self.route(resume, |c, tps| c.resume(tps)).map_err(|source| StageError::Bus { stage: name, source })?;
        }
        Ok(())
    }
}

/// Splits flagged items into (the retry topic's, the input's), in order.
pub(super) fn split_by_retry<T>(items: Vec<(T, bool)>) -> (Vec<T>, Vec<T>) {
    let (mut on_retry, mut on_input) = (Vec::new(), Vec::new());
    for (item, retry) in items {
        if retry { on_retry.push(item) } else { on_input.push(item) }
    }
    (on_retry, on_input)
}

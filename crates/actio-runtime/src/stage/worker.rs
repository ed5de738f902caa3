//! Running lanes: a message's attempts in place (its lane waits between them), then
//! its outputs, retry copy or DLQ copy handed to the producer, on whichever thread
//! runs the lane — so one key's outputs are produced in order.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use actio_core::time::now_ns;
use actio_core::{OutRecord, Producer, Record, TopicPartition, headers};
use parking_lot::Mutex;

use super::acks::AckGroup;
use super::failures;
use super::retry_topic::{self, RetryMarks};
use super::state::{Done, Shared, Work};
use super::{Context, FailureKind, HandlerError, Output};

/// The most expected handler time a poll round may have and still run whole on the
/// driver, without waking a worker (see [`Shared::dispatch_ready`]). About what a
/// worker's wake-up costs in latency on a busy 2-core machine, so inlining such a round
/// never delays its last message by more than a split would have.
pub(super) const INLINE_ROUND: std::time::Duration = std::time::Duration::from_micros(100);

impl<P: Producer> Shared<P> {
    /// Runs the lane heads admitted in this round, in at most one job per worker: the
    /// heads are dealt round robin into `threads` chunks, every chunk but the last goes
    /// to the pool as one job and, with `inline_last`, the last runs on the calling
    /// (driver) thread. A round wakes at most `threads − 1` workers, not one per
    /// message: at 3,000 batches/s a wakeup per job cost 10.5 % of a core against 6.6 %
    /// for a chunk per worker (BENCHMARKS.md, "Worker pool").
    ///
    /// A round whose expected handler time — the records it `admitted` (or its heads,
    /// if more) × the running mean of the handler's own time — is under
    /// [`INLINE_ROUND`] runs whole on the driver: splitting it would save less time
    /// than waking a worker takes, and each wake-up costs CPU (on the project's VM, 15
    /// µs of it against a few µs of rules per message). That is the common case at
    /// moderate rates, where a round holds what one fetch brought. Until a first
    /// message has been timed the mean is unknown, and rounds are dealt out.
    ///
    /// A rebalance callback calls this too (without `inline_last`) before it waits for
    /// in-flight work, since heads admitted in the round it interrupted would otherwise
    /// never start.
    pub(super) fn dispatch_ready(self: &Arc<Self>, inline_last: bool, admitted: usize) {
        let ready = std::mem::take(&mut *self.ready.lock());
        if ready.is_empty() {
            return;
        }
        let mean = self.handler_ns.load(Ordering::Relaxed);
        let expected_ns = (ready.len().max(admitted) as u64).saturating_mul(mean);
        let chunks = match inline_last && mean > 0 && expected_ns <= INLINE_ROUND.as_nanos() as u64 {
            true => 1,
            false => ready.len().min(self.spec.threads.max(1)),
        };
        let mut dealt: Vec<Vec<(TopicPartition, u64, Work)>> = (0..chunks).map(|_| Vec::with_capacity(ready.len().div_ceil(chunks))).collect();
        for (i, head) in ready.into_iter().enumerate() {
            dealt[i % chunks].push(head);
        }
        let last = if inline_last { dealt.pop() } else { None };
        for chunk in dealt {
            let shared = self.clone();
            self.pool.spawn(move || shared.run_lanes(chunk, None));
        }
        if let Some(chunk) = last {
            self.run_lanes(chunk, Some(super::driver::ADMIT_BATCH));
        }
    }

    /// Runs lanes: each head, then each lane's next messages, until every lane is
    /// idle — one message per lane in turn, so a hot key's lane does not hold up the
    /// other lanes of its chunk. With a `budget` (the driver's chunk), after that many
    /// messages the lanes still busy go to the pool as one job, so the driver gets back
    /// to polling and committing however deep a lane's queue is.
    fn run_lanes(self: &Arc<Self>, heads: Vec<(TopicPartition, u64, Work)>, budget: Option<usize>) {
        let mut turn: std::collections::VecDeque<_> = heads.into();
        let mut left = budget.unwrap_or(usize::MAX);
        while let Some((tp, epoch, work)) = turn.pop_front() {
            if left == 0 {
                turn.push_front((tp, epoch, work));
                let shared = self.clone();
                let rest: Vec<_> = turn.into();
                self.pool.spawn(move || shared.run_lanes(rest, None));
                return;
            }
            left -= 1;
            let lane = work.lane;
            if !self.process(&tp, epoch, work) {
                continue; // deferred: its completion moves the lane on
            }
            let next = {
                let mut st = self.state.lock();
                match st.parts.get_mut(&tp) {
                    Some(p) if p.epoch == epoch => p.lanes.next(lane),
                    _ => None,
                }
            };
            if let Some(w) = next {
                turn.push_back((tp, epoch, w));
            }
        }
    }

    /// Runs a message's attempts; `false` when its handler deferred the result (the
    /// completion finishes it and moves its lane on).
    fn process(self: &Arc<Self>, tp: &TopicPartition, epoch: u64, work: Work) -> bool {
        let Work { rec, consumed_ns, queue_ns, from_retry, lane } = work;
        let started = Instant::now();
        // A message from the retry topic carries the attempts and trips made before,
        // and the input it was first consumed from: read once, here.
        let marks = if from_retry { RetryMarks::of(&rec) } else { RetryMarks::default() };
        let mut ctx = Context::first(&rec);
        if from_retry {
            let (source, offset) = failures::source_of(&rec).unwrap_or_else(|| (rec.tp.clone(), rec.offset));
            ctx = ctx.retried_from(source, offset);
        }
        let mut retried = 0;
        let mut backoff = self.spec.retry.backoff;
        let result = loop {
            ctx.attempt = marks.attempts.saturating_add(retried + 1);
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.handle(&rec, &ctx))).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(HandlerError::permanent(format!("handler panicked: {what}")))
            });
            match r {
                Err(e) if e.kind == FailureKind::Transient && retried + 1 < self.spec.retry.attempts => {
                    retried += 1;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.spec.retry.max_backoff);
                }
                r => break r,
            }
        };
        self.time_handler(started.elapsed());
        let deferred = match &result {
            Ok(outputs) => outputs.iter().find_map(|o| o.defer.clone()),
            Err(_) => None,
        };
        let run = Attempted { rec, consumed_ns, queue_ns, from_retry, marks, ctx, retried, started };
        match deferred {
            None => {
                self.finish(tp, epoch, run, result);
                true
            }
            Some(d) => {
                let (shared, tp) = (self.clone(), tp.clone());
                d.bind(move |result| {
                    // A deferred result carries no further deferral.
                    let result = result.map(|mut o| {
                        o.retain(|o| o.defer.is_none());
                        o
                    });
                    shared.finish(&tp, epoch, run, result);
                    shared.advance(&tp, epoch, lane);
                });
                false
            }
        }
    }

    /// Adds one message's handler time (its synchronous part: a deferred handler's
    /// wait is not the driver's) to the running mean, each sample weighing 1/16; the
    /// first sample is the mean. A racy read-modify-write on purpose: a lost sample
    /// of a running mean is harmless.
    fn time_handler(&self, took: std::time::Duration) {
        let sample = took.as_nanos().min(u128::from(u32::MAX)) as i64;
        let mean = self.handler_ns.load(Ordering::Relaxed) as i64;
        let next = if mean == 0 { sample.max(1) } else { mean + (sample - mean) / 16 };
        self.handler_ns.store(next.max(1) as u64, Ordering::Relaxed);
    }

    /// Runs the next message of a deferred message's lane, if any, on the pool.
    fn advance(self: &Arc<Self>, tp: &TopicPartition, epoch: u64, lane: Option<u64>) {
        let next = {
            let mut st = self.state.lock();
            match st.parts.get_mut(tp) {
                Some(p) if p.epoch == epoch => p.lanes.next(lane),
                _ => None,
            }
        };
        if let Some(w) = next {
            let (shared, tp) = (self.clone(), tp.clone());
            self.pool.spawn(move || shared.run_lanes(vec![(tp, epoch, w)], None));
        }
    }

    /// What follows a message's handler: its outputs produced (or its DLQ or retry
    /// copy), and done when they are acknowledged.
    fn finish(&self, tp: &TopicPartition, epoch: u64, run: Attempted, result: Result<Vec<Output>, HandlerError>) {
        let Attempted { rec, consumed_ns, queue_ns, from_retry, marks, ctx, retried, started } = run;
        let service_ns = started.elapsed().as_nanos() as i64;
        let mut holds = Vec::new();
        // Its span at this stage, which its outputs name as their parent.
        let span = self.spec.tracer.as_ref().map(|t| t.ids(rec.headers.get(crate::trace::TRACEPARENT)));
        let (records, dead_lettered, sent_to_retry) = match result {
            Ok(outputs) => {
                let retried_as = from_retry.then_some(marks.trips);
                let mut records = Vec::with_capacity(outputs.len());
                for mut o in outputs {
                    match o.hold.take() {
                        Some(h) => holds.push(h),
                        None => {
                            let releases = std::mem::take(&mut o.releases);
                            let mut out = self.output(&rec, consumed_ns, o, retried_as);
                            if let Some(ids) = &span {
                                out.headers.set(crate::trace::TRACEPARENT, crate::trace::traceparent(ids));
                            }
                            records.push((out, releases));
                        }
                    }
                }
                (records, false, false)
            }
            Err(e) if e.kind == FailureKind::Transient && let Some(t) = self.spec.retry.topic.as_ref().filter(|t| marks.trips < t.attempts) => {
                (vec![(self.retry_copy(&rec, &e, t, &ctx, marks.trips + 1), Vec::new())], false, true)
            }
            Err(e) => {
                self.handler.dead_lettered(&rec, &e);
                (vec![(self.dead_letter(&rec, &e, &ctx), Vec::new())], true, false)
            }
        };
        let done = Done {
            tp: tp.clone(),
            epoch,
            offset: rec.offset,
            consumed_ns,
            queue_ns,
            service_ns,
            acked_ns: 0,
            dead_lettered,
            sent_to_retry,
            retried,
            error: None,
            abandoned: false,
            span: span.filter(|s| s.sampled),
        };
        if self.eos && !holds.is_empty() {
            // A held message's release comes with another's output: in a transaction
            // it would commit the later offset before the held one. Refused at load.
            let mut st = self.state.lock();
            st.fatal.get_or_insert(super::StageError::Pool { stage: self.spec.name.clone(), message: "a handler held a message under exactly_once, which cannot commit it".into() });
            return;
        }
        if records.is_empty() && holds.is_empty() {
            if self.eos {
                self.sequence(tp, epoch, rec.offset, Vec::new());
            }
            let _ = self.done_tx.send(Done { acked_ns: now_ns(), ..done });
            return;
        }
        let acks = Arc::new(AckGroup {
            remaining: AtomicUsize::new(records.len() + holds.len()),
            failed: AtomicBool::new(false),
            done: Mutex::new(Some(done)),
            tx: self.done_tx.clone(),
        });
        if !holds.is_empty() {
            // Registered with the partition, so that a revocation abandons them; a
            // partition already revoking abandons them at once.
            let revoked = {
                let mut st = self.state.lock();
                match st.parts.get_mut(tp).filter(|p| p.epoch == epoch && !p.revoking) {
                    Some(p) => {
                        p.holds.extend(holds.iter().cloned());
                        false
                    }
                    None => true,
                }
            };
            for h in holds {
                let acks2 = acks.clone();
                h.bind(move |o| acks2.hold_outcome(o));
                if revoked {
                    h.abandon();
                }
            }
        }
        // Each output settles its releases and its share of the message once delivered.
        let settle = |releases: Vec<crate::Hold>| -> actio_core::bus::AckFn {
            let acks = acks.clone();
            Box::new(move |res: Result<actio_core::bus::Delivered, actio_core::BusError>| {
                settle_releases(&releases, res.as_ref().err());
                acks.ack(res)
            })
        };
        if self.eos {
            // Sent in offset order by the partition's sequencer, not now.
            let sends = records.into_iter().map(|(r, releases)| (r, settle(releases))).collect();
            self.sequence(tp, epoch, rec.offset, sends);
            return;
        }
        for (r, releases) in records {
            let kept = releases.clone();
            if let Err(e) = self.producer.send(r, settle(releases)) {
                // The callback was not called: nothing was sent.
                settle_releases(&kept, Some(&e));
                acks.ack(Err(e));
            }
        }
    }

    /// An output keeps the input's headers and appends this stage's trail hop, and the
    /// input's key unless the handler set one. Of a message from the retry topic
    /// (`retried_as`: its trips), the retry bookkeeping is dropped and `actio-retried`
    /// says it left its key's order here.
    fn output(&self, rec: &Record, consumed_ns: i64, out: Output, retried_as: Option<u32>) -> OutRecord {
        let mut hdrs = rec.headers.clone();
        if let Some(trips) = retried_as {
            retry_topic::mark_retried(&mut hdrs, &self.spec.name, trips);
        }
        let mut trail = hdrs.get(headers::TRAIL).map(<[u8]>::to_vec).unwrap_or_default();
        let produced_ns = now_ns();
        if out.steps.is_empty() {
            headers::append_hop(&mut trail, &self.spec.name, consumed_ns, produced_ns);
        } else {
            // One hop per step of a multi-stage handler, tiling consumed → produced.
            let last = out.steps.len() - 1;
            for (i, step) in out.steps.iter().enumerate() {
                let from = if i == 0 { consumed_ns } else { step.started_ns };
                let to = if i == last { produced_ns } else { step.ended_ns };
                headers::append_hop(&mut trail, &step.stage, from, to);
            }
        }
        hdrs.set(headers::TRAIL, trail);
        OutRecord { topic: out.topic, partition: None, key: out.key.or_else(|| rec.key.clone()), payload: out.payload, headers: hdrs }
    }
}

/// A message after its attempts: what finishing it needs.
struct Attempted {
    rec: Record,
    consumed_ns: i64,
    queue_ns: i64,
    from_retry: bool,
    marks: RetryMarks,
    ctx: Context,
    retried: u32,
    started: Instant,
}

/// Releases `holds` once the output that carries them is delivered, or fails them.
pub(super) fn settle_releases(holds: &[super::Hold], error: Option<&actio_core::BusError>) {
    for h in holds {
        match error {
            None => h.release(),
            Some(e) => h.fail(format!("the output that completes it was not delivered: {e}")),
        }
    }
}

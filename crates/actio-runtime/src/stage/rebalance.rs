//! The rebalance listener, run inside the driver's `poll`: sets up assigned
//! partitions, and before revoked ones go, drains their in-flight work (bounded by
//! the drain timeout) and returns their watermarks for the bus to commit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_core::{GroupToken, Offset, Producer, RebalanceListener, TopicPartition};

use super::StageError;
use super::state::{Part, Shared};
use super::txn::Sequencer;
use crate::lanes::KeyLanes;
use crate::watermark::Watermark;

/// Rebalance callbacks, run inside the driver's `poll`: of the input consumer, or
/// (`retry`) of the retry topic's.
pub(super) struct Listener<P: Producer> {
    pub(super) shared: Arc<Shared<P>>,
    pub(super) retry: bool,
}

impl<P: Producer> RebalanceListener for Listener<P> {
    fn assigned(&self, partitions: &[TopicPartition]) {
        let s = &self.shared;
        // The handler first: it may rebuild state for these partitions (the velocity
        // stage replays their input), and the stage counts them as held, and so can
        // turn ready, only once it has.
        s.handler.partitions_assigned(partitions);
        {
            let mut st = s.state.lock();
            for tp in partitions {
                if !st.parts.contains_key(tp) {
                    st.epoch += 1;
                    let part = Part {
                        epoch: st.epoch,
                        lanes: KeyLanes::new(s.spec.ordering),
                        retry: s.spec.is_retry_topic(&tp.topic),
                        held: VecDeque::new(),
                        wm: Watermark::new(None),
                        dropped: 0,
                        paused: false,
                        revoking: false,
                        last_committed: None,
                        holds: Vec::new(),
                        seq: s.eos.then(Sequencer::default),
                        closed: false,
                    };
                    st.parts.insert(tp.clone(), part);
                }
            }
            st.metrics.rebalances += 1;
        }
        tracing::info!(stage = %s.spec.name, partitions = ?partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "assigned");
    }

    fn revoking(&self, partitions: &[TopicPartition], group: Option<GroupToken>) -> Vec<(TopicPartition, Offset)> {
        let s = &self.shared;
        s.dispatch_ready(false, 0);
        let mut holds = Vec::new();
        {
            let mut st = s.state.lock();
            for tp in partitions {
                if let Some(p) = st.parts.get_mut(tp) {
                    p.revoking = true;
                    // Retry copies not due yet are dropped like waiting messages: the
                    // next owner gets them again and honours their due time.
                    p.dropped += p.lanes.clear_waiting() + p.held.len();
                    p.held.clear();
                    // Held messages too (a join's pending branches): uncommitted, the
                    // next owner gets them again. Holds made by work still running are
                    // abandoned as they are bound (`revoking` is set).
                    holds.append(&mut p.holds);
                }
            }
        }
        for h in holds {
            h.abandon();
        }
        // Let what is running finish, up to the drain timeout.
        let deadline = Instant::now() + s.spec.drain_timeout;
        loop {
            {
                let mut st = s.state.lock();
                while let Ok(done) = s.done_rx.try_recv() {
                    st.apply(done, &s.spec.name, s.spec.tracer.as_ref());
                }
                // Exactly-once: running messages must finish (their outputs go into the
                // transaction committed below); delivery is the commit's to wait for.
                let busy = partitions.iter().any(|tp| {
                    st.parts.get(tp).is_some_and(|p| match &p.seq {
                        Some(seq) => seq.unfinished() > p.dropped,
                        None => p.wm.in_flight() > p.dropped,
                    })
                });
                if !busy || st.fatal.is_some() {
                    break;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(stage = %s.spec.name, "drain timeout: committing what is done");
                break;
            }
            if let Ok(done) = s.done_rx.recv_timeout(left.min(Duration::from_millis(5))) {
                s.state.lock().apply(done, &s.spec.name, s.spec.tracer.as_ref());
            }
        }
        if s.eos {
            // The partitions' frontiers (and everyone else's) in one transaction; the
            // bus commits nothing itself. What of theirs finishes after this (a drain
            // that timed out) is not sent: it is past the committed frontier.
            {
                let mut st = s.state.lock();
                for tp in partitions {
                    if let Some(p) = st.parts.get_mut(tp) {
                        p.closed = true;
                    }
                }
            }
            let mut tokens = [None, None];
            tokens[usize::from(self.retry)] = group;
            if let Err(e) = s.commit_transaction(tokens) {
                tracing::error!(stage = %s.spec.name, error = %e, "exactly-once: commit on revocation failed: stopping");
                s.state.lock().fatal.get_or_insert(e);
            }
        }
        // Exactly-once committed above, in the transaction: the bus commits nothing.
        let mut commits = Vec::new();
        {
            let mut st = s.state.lock();
            for tp in partitions {
                if let Some(p) = st.parts.remove(tp)
                    && !s.eos
                    && let Some(o) = p.wm.committable()
                {
                    commits.push((tp.clone(), o));
                }
            }
            st.metrics.rebalances += 1;
            st.metrics.commits += !commits.is_empty() as u64;
        }
        if s.eos {
            tracing::info!(stage = %s.spec.name, partitions = ?partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "revoked (committed in a transaction)");
        } else {
            tracing::info!(stage = %s.spec.name, commits = ?commits.iter().map(|(t, o)| format!("{t}@{o}")).collect::<Vec<_>>(), "revoked");
        }
        s.handler.partitions_revoked(partitions);
        commits
    }

    fn lost(&self, partitions: &[TopicPartition]) {
        let s = &self.shared;
        {
            let mut st = s.state.lock();
            for tp in partitions {
                st.parts.remove(tp);
            }
            st.metrics.rebalances += 1;
            if s.eos && st.fatal.is_none() {
                // The open transaction holds outputs of these partitions, whose offsets
                // can no longer be committed: stop, so it is never committed. The next
                // member's (or this one's, restarted) transactions resume from the last.
                st.fatal = Some(StageError::Bus {
                    stage: s.spec.name.clone(),
                    source: actio_core::BusError::new(
                        actio_core::BusErrorKind::Fatal,
                        format!("exactly-once: partitions {} lost without a revocation; stopping so the open transaction is never committed", partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")),
                    ),
                });
            }
        }
        tracing::warn!(stage = %s.spec.name, partitions = ?partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "partitions lost");
        s.handler.partitions_revoked(partitions);
    }
}

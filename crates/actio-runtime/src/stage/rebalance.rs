//! The rebalance listener, run inside the driver's `poll`: sets up assigned
//! partitions, and before revoked ones go, drains their in-flight work (bounded by
//! the drain timeout) and returns their watermarks for the bus to commit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_core::{Offset, Producer, RebalanceListener, TopicPartition};

use super::state::{Part, Shared};
use crate::lanes::KeyLanes;
use crate::watermark::Watermark;

/// Rebalance callbacks, run inside the driver's `poll`.
pub(super) struct Listener<P: Producer>(pub(super) Arc<Shared<P>>);
impl<P: Producer> RebalanceListener for Listener<P> {
    fn assigned(&self, partitions: &[TopicPartition]) {
        let s = &self.0;
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
                    };
                    st.parts.insert(tp.clone(), part);
                }
            }
            st.metrics.rebalances += 1;
        }
        tracing::info!(stage = %s.spec.name, partitions = ?partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "assigned");
    }

    fn revoking(&self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, Offset)> {
        let s = &self.0;
        s.dispatch_ready(false);
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
                    st.apply(done, &s.spec.name);
                }
                let busy = partitions.iter().any(|tp| st.parts.get(tp).is_some_and(|p| p.wm.in_flight() > p.dropped));
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
                s.state.lock().apply(done, &s.spec.name);
            }
        }
        let mut commits = Vec::new();
        {
            let mut st = s.state.lock();
            for tp in partitions {
                if let Some(p) = st.parts.remove(tp)
                    && let Some(o) = p.wm.committable()
                {
                    commits.push((tp.clone(), o));
                }
            }
            st.metrics.rebalances += 1;
            st.metrics.commits += !commits.is_empty() as u64;
        }
        tracing::info!(stage = %s.spec.name, commits = ?commits.iter().map(|(t, o)| format!("{t}@{o}")).collect::<Vec<_>>(), "revoked");
        s.handler.partitions_revoked(partitions);
        commits
    }

    fn lost(&self, partitions: &[TopicPartition]) {
        let s = &self.0;
        {
            let mut st = s.state.lock();
            for tp in partitions {
                st.parts.remove(tp);
            }
            st.metrics.rebalances += 1;
        }
        tracing::warn!(stage = %s.spec.name, partitions = ?partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "partitions lost");
        s.handler.partitions_revoked(partitions);
    }
}

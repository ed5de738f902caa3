//! Exactly-once: outputs and input offsets committed in one Kafka transaction.
//!
//! A transaction commits the input offsets `o` of each partition together with the
//! outputs produced in it. For a crash to repeat nothing, every output in the
//! transaction must belong to a message below the offset it commits: the next owner
//! resumes there, and would produce again the outputs of any message at or past it.
//! With key lanes a later message can finish before an earlier one, so each
//! partition's outputs go through a [`Sequencer`]: a finished message's outputs are
//! held until every message before it in the partition has finished, then sent in
//! offset order. The offset a transaction commits is the partition's *sent* frontier:
//! every message before it has had its outputs handed to the producer, in this
//! transaction or an earlier one, and none after it has.
//!
//! The handler work stays parallel (lanes run as before); what waits is the sending,
//! behind the slowest earlier message of the partition. A message that produces
//! nothing (a stale update) passes at once.
//!
//! The driver commits every `commit_interval`: it closes the gate (messages finishing
//! meanwhile are held, not sent), sends the frontiers with the consumers' group
//! metadata and commits (`Producer::commit_transaction`, which also opens the next
//! transaction), then opens the gate and sends what waited. A revocation does the
//! same before the partitions go. A failed commit, or partitions lost without a
//! revocation, stop the stage: what the open transaction holds is aborted by the
//! broker (or fenced by the next member), and the restarted member resumes from the
//! last commit — nothing is lost, nothing shows twice to `read_committed` readers.

use std::collections::VecDeque;

use actio_core::{AckFn, Offset, OutRecord};

/// A message's outputs, each with what to call when it is delivered.
pub(super) type Sends = Vec<(OutRecord, AckFn)>;

/// One partition's consumed messages in offset order, with the outputs of those that
/// finished, released in order.
#[derive(Default)]
pub(super) struct Sequencer {
    /// (offset, outputs once finished).
    entries: VecDeque<(Offset, Option<Sends>)>,
    /// One past the last message whose outputs were released: what a commit of this
    /// partition may commit.
    sent_upto: Option<Offset>,
}

impl Sequencer {
    /// A message was consumed (offsets rise).
    pub(super) fn consumed(&mut self, offset: Offset) {
        self.entries.push_back((offset, None));
    }

    /// A message finished with these outputs. `false` if it is not waiting here.
    pub(super) fn finished(&mut self, offset: Offset, sends: Sends) -> bool {
        match self.entries.binary_search_by_key(&offset, |e| e.0) {
            Ok(i) if self.entries[i].1.is_none() => {
                self.entries[i].1 = Some(sends);
                true
            }
            _ => false,
        }
    }

    /// The outputs now free to send, in offset order: those of the finished messages
    /// with no unfinished one before them.
    pub(super) fn release(&mut self) -> Sends {
        let mut out = Vec::new();
        while let Some((offset, Some(_))) = self.entries.front() {
            let offset = *offset;
            if let Some((_, Some(sends))) = self.entries.pop_front() {
                out.extend(sends);
            }
            self.sent_upto = Some(offset + 1);
        }
        out
    }

    /// The offset a commit would commit now, if it moved since `committed` (the
    /// partition's last commit).
    pub(super) fn to_commit(&self, committed: Option<Offset>) -> Option<Offset> {
        self.sent_upto.filter(|o| Some(*o) != committed)
    }

    /// Messages consumed and not released yet.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Messages consumed and not finished (running, waiting in a lane, or dropped).
    pub(super) fn unfinished(&self) -> usize {
        self.entries.iter().filter(|e| e.1.is_none()).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use actio_core::bus::Bytes;
    use proptest::prelude::*;

    fn out(offset: Offset) -> Sends {
        vec![(
            OutRecord { topic: "t".into(), partition: None, key: None, payload: Bytes::from(offset.to_string()), headers: Default::default() },
            Box::new(|_| {}),
        )]
    }

    fn offsets(sends: &Sends) -> Vec<Offset> {
        sends.iter().map(|(r, _)| std::str::from_utf8(&r.payload).unwrap().parse().unwrap()).collect()
    }

    #[test]
    fn outputs_wait_for_every_earlier_message_and_the_frontier_covers_exactly_them() {
        let mut s = Sequencer::default();
        for o in [10, 11, 13] {
            s.consumed(o); // 12: a gap (a transaction marker)
        }
        assert!(s.finished(11, out(11)));
        assert!(s.release().is_empty(), "11 waits for 10");
        assert_eq!(s.to_commit(None), None);
        assert!(s.finished(10, Vec::new())); // 10 produced nothing
        assert_eq!(offsets(&s.release()), [11]);
        assert_eq!(s.to_commit(None), Some(12));
        assert!(!s.finished(11, out(11)), "finished twice");
        let committed = Some(12);
        assert_eq!(s.to_commit(committed), None);
        assert!(s.finished(13, out(13)));
        assert_eq!(offsets(&s.release()), [13]);
        assert_eq!((s.to_commit(committed), s.len()), (Some(14), 0));
    }

    proptest! {
        /// Whatever order messages finish in, outputs leave in offset order and the
        /// frontier never passes a message whose outputs have not left.
        #[test]
        fn any_finishing_order_releases_in_offset_order(order in Just((0..40i64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut s = Sequencer::default();
            for o in 0..40 {
                s.consumed(o);
            }
            let mut sent = Vec::new();
            for o in order {
                s.finished(o, out(o));
                sent.extend(offsets(&s.release()));
                let frontier = s.to_commit(None).unwrap_or(0);
                prop_assert_eq!(sent.len() as i64, frontier, "every message below the frontier has left, none above");
            }
            prop_assert_eq!(sent, (0..40).collect::<Vec<_>>());
        }
    }
}

//! Ack groups: one message's outputs are acknowledged one by one, from bus threads;
//! the last acknowledgement (or the first failure) reports the message done to the
//! driver, which is what lets its offset be committed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};

use actio_core::bus::Delivered;
use actio_core::time::now_ns;
use actio_core::BusError;
use crossbeam_channel::Sender;
use parking_lot::Mutex;

use super::hold::Outcome;
use super::state::Done;

/// Counts the acknowledgements of one message's outputs; the last one reports Done.
pub(super) struct AckGroup {
    pub(super) remaining: AtomicUsize,
    pub(super) failed: AtomicBool,
    pub(super) done: Mutex<Option<Done>>,
    pub(super) tx: Sender<Done>,
}

impl AckGroup {
    pub(super) fn ack(&self, res: Result<Delivered, BusError>) {
        self.settle(res.err().map(|e| e.to_string()));
    }

    /// One output (or hold) settled: delivered (`None`) or failed.
    pub(super) fn settle(&self, error: Option<String>) {
        if let Some(e) = error
            && !self.failed.swap(true, AtomicOrdering::AcqRel)
            && let Some(mut done) = self.done.lock().take()
        {
            done.error = Some(e);
            let _ = self.tx.send(done);
        }
        if self.remaining.fetch_sub(1, AtomicOrdering::AcqRel) == 1
            && let Some(done) = self.done.lock().take()
        {
            let _ = self.tx.send(Done { acked_ns: now_ns(), ..done });
        }
    }

    /// A hold of the message came to `outcome`.
    pub(super) fn hold_outcome(&self, outcome: Outcome) {
        match outcome {
            Outcome::Released => self.settle(None),
            Outcome::Failed(e) => self.settle(Some(e)),
            Outcome::Abandoned => {
                if let Some(done) = self.done.lock().take() {
                    let _ = self.tx.send(Done { abandoned: true, ..done });
                }
            }
        }
    }
}

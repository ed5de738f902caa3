//! Holds: a message whose work goes on after its handler returned.
//!
//! A join stage's first branch result is not done when the handler returns: the
//! transaction is decided only when the last branch arrives (in another message) or
//! the join times out (on a tick). Its offset must not be committed before then, or a
//! crash would lose the branch result the join was waiting with. The handler holds
//! such a message ([`Output::hold`](super::Output::hold)); the runtime then reports
//! the message done only when the hold is released — typically when an output that
//! carries it in [`Output::releases`](super::Output::releases) is acknowledged — and
//! the watermark waits for it, as it waits for any message in flight. Held messages
//! count against `max_in_flight_per_partition`: back-pressure bounds what a join
//! holds.
//!
//! On revocation the runtime abandons the partition's holds: those messages are not
//! done here and never will be, so their offsets stay uncommitted and the partition's
//! next owner gets them again — the join's pending state moves with the partition
//! without a changelog. A failed hold stops the stage, as a failed output does.

use std::sync::Arc;

use super::settle::Settle;

/// What became of a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done: the message's offset may be committed.
    Released,
    /// Its work failed (an output carrying it was not delivered): the stage stops.
    Failed(String),
    /// Its partition was revoked: not done here, never will be.
    Abandoned,
}

/// Keeps a message from being done after its handler returned, until released.
/// Cloning shares the hold.
#[derive(Clone)]
pub struct Hold(Arc<Settle<Outcome>>);

impl Default for Hold {
    fn default() -> Self {
        Self::new()
    }
}

impl Hold {
    /// A new hold; the handler returns it in [`Output::hold`](super::Output::hold).
    pub fn new() -> Self {
        Hold(Arc::new(Settle::new()))
    }

    /// The held message is done.
    pub fn release(&self) {
        self.0.settle(Outcome::Released);
    }

    /// The held message's work failed: the stage stops without committing it.
    pub fn fail(&self, why: impl Into<String>) {
        self.0.settle(Outcome::Failed(why.into()));
    }

    /// Whether it was released, failed or abandoned.
    pub fn is_finished(&self) -> bool {
        self.0.is_settled()
    }

    pub(crate) fn abandon(&self) {
        self.0.settle(Outcome::Abandoned);
    }

    /// Calls `f` with the hold's outcome: at once if it has one already.
    pub(crate) fn bind(&self, f: impl FnOnce(Outcome) + Send + 'static) {
        self.0.bind(f);
    }
}

impl PartialEq for Hold {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Hold {}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_finished() { "Hold(finished)" } else { "Hold" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use parking_lot::Mutex;

    #[test]
    fn the_first_outcome_reaches_the_binding_whenever_it_comes() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (early, late) = (Hold::new(), Hold::new());
        early.release();
        early.fail("too late");
        for (name, h) in [("early", &early), ("late", &late)] {
            let seen = seen.clone();
            h.bind(move |o| seen.lock().push((name, o)));
        }
        assert_eq!(*seen.lock(), [("early", Outcome::Released)]);
        assert!(!late.is_finished());
        late.abandon();
        late.release();
        assert_eq!(seen.lock()[1], ("late", Outcome::Abandoned));
        assert!(late.is_finished() && early.is_finished());
    }
}

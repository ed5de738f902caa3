//! Deferred results: a handler whose work goes on elsewhere (an HTTP call on an
//! async runtime) returns at once, and completes the message later.
//!
//! The handler returns [`Output::defer`](super::Output::defer) and keeps the
//! [`Deferred`]; when its work ends it calls [`Deferred::complete`] with the outputs
//! (or the error) it would have returned. The runtime then does what it does after
//! any handler: produces the outputs, or dead-letters, or sends to the retry topic;
//! the message is done when the outputs are acknowledged. Meanwhile the worker
//! thread is free for other keys, and the message's key lane stays busy, so per-key
//! order holds: the key's next message runs only after this one completed. A
//! deferred message counts as in flight, so back-pressure bounds how many wait.
//!
//! A deferred error is final: the handler retried in place already if it wanted to
//! (asynchronously, without blocking a thread); a transient one goes to the stage's
//! retry topic, else to the DLQ. A `Deferred` dropped without completing completes
//! with a permanent error, so a lost task can never leave its key stuck.

use std::sync::Arc;

use super::settle::Settle;
use super::{HandlerError, Output};

type Completion = Result<Vec<Output>, HandlerError>;

struct Inner(Settle<Completion>);

impl Drop for Inner {
    fn drop(&mut self) {
        self.0.settle_if_bound(|| Err(HandlerError::permanent("the handler's deferred work ended without completing the message")));
    }
}

/// A message's result, to come. Cloning shares it; the first completion counts.
#[derive(Clone)]
pub struct Deferred(Arc<Inner>);

impl Default for Deferred {
    fn default() -> Self {
        Self::new()
    }
}

impl Deferred {
    /// A result to come; the handler returns it in [`Output::defer`](super::Output::defer).
    pub fn new() -> Self {
        Deferred(Arc::new(Inner(Settle::new())))
    }

    /// The message's outputs, or why it failed: as the handler would have returned.
    pub fn complete(&self, result: Result<Vec<Output>, HandlerError>) {
        self.0.0.settle(result);
    }

    /// Blocks until the result comes (at most `timeout`): for a caller outside the
    /// runtime that runs a handler itself (a golden test, a tool). The runtime never
    /// waits: it binds.
    pub fn wait(self, timeout: std::time::Duration) -> Option<Result<Vec<Output>, HandlerError>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.bind(move |r| {
            let _ = tx.send(r);
        });
        // This clone must not keep the result pending: if the work drops its own, the
        // drop completes it with an error, and that error is what comes back.
        drop(self);
        rx.recv_timeout(timeout).ok()
    }

    /// Calls `f` with the result: at once if it came already.
    pub(crate) fn bind(&self, f: impl FnOnce(Completion) + Send + 'static) {
        self.0.0.bind(f);
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deferred")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[test]
    fn a_result_reaches_the_binding_before_or_after_and_a_dropped_one_fails() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let early = Deferred::new();
        early.complete(Ok(vec![]));
        let s = seen.clone();
        early.bind(move |r| s.lock().push(r.is_ok()));
        let late = Deferred::new();
        let s = seen.clone();
        late.bind(move |r| s.lock().push(r.is_ok()));
        late.complete(Err(HandlerError::transient("timeout")));
        late.complete(Ok(vec![]));
        assert_eq!(*seen.lock(), [true, false]);
        let dropped = Deferred::new();
        let s = seen.clone();
        dropped.bind(move |r| s.lock().push(r.unwrap_err().message.contains("without completing")));
        drop(dropped);
        assert_eq!(*seen.lock(), [true, false, true]);
    }

    #[test]
    fn wait_blocks_until_the_result_or_the_timeout() {
        let d = Deferred::new();
        let done = d.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            done.complete(Err(HandlerError::transient("late")));
        });
        let r = d.wait(std::time::Duration::from_secs(10)).expect("completed before the timeout");
        assert_eq!(r.unwrap_err().message, "late");
        t.join().unwrap();
        let never = Deferred::new();
        let _keep = never.clone();
        assert!(never.wait(std::time::Duration::from_millis(20)).is_none());
        let lost = Deferred::new();
        let work = lost.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(work);
        });
        let r = lost.wait(std::time::Duration::from_secs(10)).expect("a dropped Deferred completes at once");
        assert!(r.unwrap_err().message.contains("without completing"));
        t.join().unwrap();
    }
}

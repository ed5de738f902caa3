//! A value settled once and handed to one binding, whichever comes first: what
//! [`Hold`](super::Hold) and [`Deferred`](super::Deferred) are made of. The first
//! settlement stands; a binding made after it is called at once.

use parking_lot::Mutex;

enum State<T> {
    /// Not bound yet; the first value, if it came already.
    Unbound(Option<T>),
    Bound(Box<dyn FnOnce(T) + Send>),
    Finished,
}

pub(crate) struct Settle<T>(Mutex<State<T>>);

impl<T> Settle<T> {
    pub(crate) fn new() -> Self {
        Settle(Mutex::new(State::Unbound(None)))
    }

    /// Settles with `v` unless settled before; calls the binding if there is one.
    pub(crate) fn settle(&self, v: T) {
        let mut st = self.0.lock();
        match std::mem::replace(&mut *st, State::Finished) {
            State::Unbound(None) => *st = State::Unbound(Some(v)),
            State::Bound(f) => {
                drop(st);
                f(v);
            }
            other => *st = other, // the first value stands
        }
    }

    /// Calls `f` with the value: at once if it came already. A second binding is
    /// ignored.
    pub(crate) fn bind(&self, f: impl FnOnce(T) + Send + 'static) {
        let mut st = self.0.lock();
        match std::mem::replace(&mut *st, State::Finished) {
            State::Unbound(Some(v)) => {
                drop(st);
                f(v);
            }
            State::Unbound(None) => *st = State::Bound(Box::new(f)),
            other => *st = other,
        }
    }

    /// Whether a value came.
    pub(crate) fn is_settled(&self) -> bool {
        match &*self.0.lock() {
            State::Unbound(v) => v.is_some(),
            State::Bound(_) => false,
            State::Finished => true,
        }
    }

    /// Settles with `v` only if bound and still waiting: what a value dropped
    /// unsettled leaves its binding.
    pub(crate) fn settle_if_bound(&self, v: impl FnOnce() -> T) {
        if let State::Bound(f) = std::mem::replace(&mut *self.0.lock(), State::Finished) {
            f(v());
        }
    }
}

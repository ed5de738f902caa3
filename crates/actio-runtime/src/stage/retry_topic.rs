//! The retry topic: its settings, the bookkeeping headers a copy carries there and
//! back, and the driver's side of it — a second consumer polled without waiting, and
//! copies held in memory until they are due, so waiting stalls no input partition.

use std::sync::Arc;
use std::time::Duration;

use actio_core::time::now_ns;
use actio_core::{Bus, Consumer, Headers, Record, headers};

use super::StageError;
use super::driver::{ADMIT_BATCH, Driver};

/// A topic of the stage's own where transient failures wait before running again.
/// The stage consumes it with a second consumer, in a group of its own: in the input's
/// group, a cooperative-sticky assignment balances the *total* partition count, and
/// handed one replica all the retry partitions and a single input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryTopic {
    /// Topic name.
    pub topic: Arc<str>,
    /// Consumer group reading it (`<pipeline>.<stage>.retry`).
    pub group: String,
    /// Transport properties for that consumer, over the stage's (Kafka: a longer fetch
    /// wait than the input's, since a copy cannot run before its delay anyway).
    pub properties: Vec<(String, String)>,
    /// Trips through the topic before the message is dead-lettered (≥ 1).
    pub attempts: u32,
    /// Time between producing the first retry copy and running it again.
    pub delay: Duration,
    /// The delay doubles with each further trip, up to this (equal to `delay`: every
    /// trip waits the same).
    pub max_delay: Duration,
}

impl RetryTopic {
    /// How long the copy of trip `trip` (1-based) waits: `delay`, doubled per trip
    /// after the first, at most `max_delay` (and never less than `delay`).
    pub fn delay_of_trip(&self, trip: u32) -> Duration {
        let doubled = self.delay.saturating_mul(1u32 << trip.saturating_sub(1).min(20));
        doubled.min(self.max_delay).max(self.delay)
    }
}

/// What a copy from the retry topic says about its past at this stage.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RetryMarks {
    /// Handler attempts made before (`actio-attempts`).
    pub(super) attempts: u32,
    /// Trips through the retry topic so far (`actio-retry-count`).
    pub(super) trips: u32,
}

impl RetryMarks {
    /// Read from a retry copy; a missing or unreadable header counts as 0.
    pub(super) fn of(rec: &Record) -> Self {
        let header = |name| rec.headers.get(name).and_then(headers::parse_i64).map_or(0, |n| n.clamp(0, u32::MAX as i64) as u32);
        RetryMarks { attempts: header(headers::ATTEMPTS), trips: header(headers::RETRY_COUNT) }
    }
}

/// When a retry copy may run again (ns since the epoch); one without a readable due
/// time runs at once.
pub(super) fn retry_due(rec: &Record) -> i64 {
    rec.headers.get(headers::RETRY_DUE).and_then(headers::parse_i64).unwrap_or(0)
}

/// On the output of a message back from the retry topic: drops the retry bookkeeping
/// and appends `stage:trips` to `actio-retried`, since it left its key's order here.
pub(super) fn mark_retried(hdrs: &mut Headers, stage: &str, trips: u32) {
    const BOOKKEEPING: [&str; 6] = [headers::ATTEMPTS, headers::RETRY_COUNT, headers::RETRY_DUE, headers::ERROR, headers::STAGE, headers::SOURCE];
    hdrs.retain(|k, _| !BOOKKEEPING.contains(&k));
    let mut retried = hdrs.get(headers::RETRIED).map(<[u8]>::to_vec).unwrap_or_default();
    if !retried.is_empty() {
        retried.push(b';');
    }
    retried.extend_from_slice(format!("{stage}:{trips}").as_bytes());
    hdrs.set(headers::RETRIED, retried);
}

impl<B: Bus> Driver<B> {
    /// Polls the retry topic's consumer without waiting (its rebalance callbacks run in
    /// there too) and admits what it returned.
    pub(super) fn poll_retry(&mut self) -> Result<(), StageError> {
        let Some(c) = self.retry.as_mut() else { return Ok(()) };
        let mut recs = Vec::new();
        while recs.len() < ADMIT_BATCH {
            match c.poll(Duration::ZERO) {
                Ok(Some(rec)) => recs.push(rec),
                Ok(None) => break,
                Err(e) if e.is_retriable() => {
                    tracing::warn!(stage = %self.shared.spec.name, error = %e, "retry topic poll failed; retrying");
                    break;
                }
                Err(e) => return Err(StageError::Bus { stage: self.shared.spec.name.clone(), source: e }),
            }
        }
        for rec in recs {
            self.admit(rec)?;
        }
        Ok(())
    }

    /// Runs the retry copies whose due time has come, in offset order per partition.
    pub(super) fn release_due(&mut self) {
        let s = &self.shared;
        let mut runs = Vec::new();
        {
            let mut st = s.state.lock();
            let now = now_ns();
            for (tp, p) in st.parts.iter_mut().filter(|(_, p)| !p.held.is_empty() && !p.revoking) {
                while let Some((due, _)) = p.held.front()
                    && *due <= now
                    && let Some((_, work)) = p.held.pop_front()
                {
                    if let Some(w) = p.lanes.admit(work.lane, work) {
                        runs.push((tp.clone(), p.epoch, w));
                    }
                }
            }
        }
        if !runs.is_empty() {
            s.ready.lock().extend(runs);
            s.dispatch_ready(false, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trips_delay_doubles_from_delay_up_to_max_delay() {
        let ms = Duration::from_millis;
        let t = RetryTopic { topic: Arc::from("r"), group: "g".into(), properties: vec![], attempts: 40, delay: ms(100), max_delay: ms(1000) };
        let waits: Vec<Duration> = (1..=6).map(|n| t.delay_of_trip(n)).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        assert_eq!(t.delay_of_trip(40), ms(1000), "no overflow on many trips");
        let fixed = RetryTopic { max_delay: ms(100), ..t };
        assert_eq!(fixed.delay_of_trip(5), ms(100));
    }
}

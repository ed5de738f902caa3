//! Wall-clock time in nanoseconds since the Unix epoch: the unit of every
//! timestamp actio writes (headers, trail, reports).

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds in a second: the unit of every timestamp here, per wall-clock second.
pub const NS_PER_S: i64 = 1_000_000_000;

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Parses an RFC 3339 timestamp (`2026-11-24T12:00:00.123Z`) into ns since the epoch.
/// None outside what i64 ns hold (1970-01-01 up to 2262-04-11T23:47:16.854775807Z):
/// a later year must not wrap around to a negative time.
pub fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    t.duration_since(UNIX_EPOCH).ok().and_then(|d| i64::try_from(d.as_nanos()).ok())
}

/// Formats ns since the epoch as RFC 3339 with nanoseconds, UTC.
pub fn format_rfc3339_ns(ns: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let ns = 1_795_000_000_123_456_789;
        assert_eq!(parse_rfc3339_ns(&format_rfc3339_ns(ns)), Some(ns));
        assert_eq!(parse_rfc3339_ns("not a time"), None);
    }

    // Found by the fuzzer (crates/actio-pipeline/tests/fuzz.rs): years past 2262
    // wrapped around to negative ns.
    #[test]
    fn times_beyond_i64_ns_are_rejected_not_wrapped() {
        assert_eq!(parse_rfc3339_ns("2262-04-11T23:47:16.854775807Z"), Some(i64::MAX));
        assert_eq!(parse_rfc3339_ns("2262-04-11T23:47:16.854775808Z"), None);
        assert_eq!(parse_rfc3339_ns("9999-12-31T23:59:59Z"), None);
    }
}

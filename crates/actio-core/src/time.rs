//! Wall-clock time in nanoseconds since the Unix epoch: the unit of every
//! timestamp actio writes (headers, trail, reports).

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Parses an RFC 3339 timestamp (`2026-11-24T12:00:00.123Z`) into ns since the epoch.
pub fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_nanos() as i64)
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
}

//! Header names and the per-stage timing trail.
//!
//! Every stage keeps the incoming headers and appends one entry to the trail
//! header: `stage@consumed_ns@produced_ns`, entries separated by `;`. The trail is
//! plain text so that any Kafka client can read it, and from it any reader rebuilds
//! per-stage latencies (queue = consumed − previous produced).

/// The transaction id.
pub const ID: &str = "actio-id";
/// Creation time, ns since the Unix epoch, decimal text. For load-generated
/// traffic this is the *intended* send time (no coordinated omission).
pub const CREATED: &str = "actio-created";
/// The per-stage timing trail.
pub const TRAIL: &str = "actio-trail";
/// W3C trace context, propagated unchanged.
pub const TRACEPARENT: &str = "traceparent";
/// On DLQ messages: why the message failed.
pub const ERROR: &str = "actio-error";
/// On DLQ messages: the stage that gave up.
pub const STAGE: &str = "actio-stage";
/// On retry-topic and DLQ copies: `topic/partition/offset` of the input message it
/// was first consumed as (the topic may itself contain `/`). Written and read by the
/// stage runtime only; handlers get it parsed, in their `Context`.
pub const SOURCE: &str = "actio-source";
/// On retry-topic and DLQ copies: handler attempts made so far at the stage named by
/// [`STAGE`], in place and through its retry topic (decimal).
pub const ATTEMPTS: &str = "actio-attempts";
/// On retry-topic copies: trips through the stage's retry topic so far, this one
/// included (decimal, from 1).
pub const RETRY_COUNT: &str = "actio-retry-count";
/// On retry-topic copies: when the copy may run again, ns since the Unix epoch.
pub const RETRY_DUE: &str = "actio-retry-due";
/// On the outputs of a message that went through a retry topic: `stage:trips`, one
/// entry per stage that retried it, separated by `;`. Such a message left its key's
/// order (later messages of the key may be decided before it).
pub const RETRIED: &str = "actio-retried";

/// One hop of the trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The stage's name.
    pub stage: String,
    /// When the stage consumed the message (ns since epoch).
    pub consumed_ns: i64,
    /// When the stage handed its output to the producer (ns since epoch).
    pub produced_ns: i64,
}

/// Appends a hop to a trail header value.
pub fn append_hop(trail: &mut Vec<u8>, stage: &str, consumed_ns: i64, produced_ns: i64) {
    use std::io::Write;
    if !trail.is_empty() {
        trail.push(b';');
    }
    let _ = write!(trail, "{stage}@{consumed_ns}@{produced_ns}");
}

/// Parses a trail header value; malformed entries are skipped, never fatal.
pub fn parse_trail(value: &[u8]) -> Vec<Hop> {
    let Ok(s) = std::str::from_utf8(value) else { return Vec::new() };
    s.split(';')
        .filter_map(|entry| {
            let mut it = entry.rsplitn(3, '@');
            let produced_ns = it.next()?.parse().ok()?;
            let consumed_ns = it.next()?.parse().ok()?;
            let stage = it.next()?.to_string();
            Some(Hop { stage, consumed_ns, produced_ns })
        })
        .collect()
}

/// When the trail's last hop produced (ns since epoch), read without allocating: the
/// stage runtime asks this of every message it consumes, to measure its queue time.
pub fn last_produced_ns(value: &[u8]) -> Option<i64> {
    let last = value.rsplit(|b| *b == b';').next()?;
    let at = last.iter().rposition(|b| *b == b'@')?;
    let digits = std::str::from_utf8(&last[at + 1..]).ok()?;
    // The entry must have all three parts, as `parse_trail` requires.
    last[..at].contains(&b'@').then_some(())?;
    digits.parse().ok()
}

/// Parses a decimal integer header value (e.g. [`CREATED`]).
pub fn parse_i64(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trail_round_trips_and_tolerates_garbage() {
        let mut t = Vec::new();
        append_hop(&mut t, "rules", 10, 20);
        append_hop(&mut t, "velocity", 30, 45);
        let hops = parse_trail(&t);
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[1], Hop { stage: "velocity".into(), consumed_ns: 30, produced_ns: 45 });
        let mut bad = t.clone();
        bad.extend_from_slice(b";nonsense;x@y@z");
        assert_eq!(parse_trail(&bad).len(), 2);
        assert!(parse_trail(&[0xff, 0xfe]).is_empty());
    }

    #[test]
    fn the_last_hops_produce_time_is_the_parsers() {
        let mut t = Vec::new();
        assert_eq!(last_produced_ns(&t), None);
        append_hop(&mut t, "rules", 10, 20);
        assert_eq!(last_produced_ns(&t), Some(20));
        append_hop(&mut t, "a@b", 30, 45);
        assert_eq!(last_produced_ns(&t), parse_trail(&t).last().map(|h| h.produced_ns));
        assert_eq!(last_produced_ns(b"rules@10@x"), None);
        assert_eq!(last_produced_ns(b"10@20"), None, "two parts are not a hop");
    }
}

//! The broker's stop-the-world pauses, read from its JVM's unified GC log, so a report
//! can tell the seconds the broker stood still from what actio did.
//!
//! The broker logs with `-Xlog:gc*,safepoint:file=…/gc.log:time,…` (scripts/kafka). Every
//! stop-the-world pause has a line
//!
//! ```text
//! [2026-12-01T13:00:08.627+0000][2.069s] Safepoint "CollectForMetadataAllocation", Time since last: 296670840 ns, Reaching safepoint: 4286 ns, Cleanup: 142683 ns, At safepoint: 24037098 ns, Total: 24184067 ns
//! ```
//!
//! logged when the safepoint ended; `Total` is how long it lasted (from the request to
//! stop, so it includes the time to reach the safepoint). A pause is thus `[time −
//! Total, time]`, to the millisecond of the `time` decorator. The times are the broker
//! machine's wall clock: they compare with the collector's only when both run on one
//! machine (or synchronized clocks).

use std::path::{Path, PathBuf};
use std::time::Duration;

use actio_core::time::NS_PER_S;

/// A second is marked as a broker pause when the broker was stopped for at least this
/// long within it.
pub const DEFAULT_MARK_THRESHOLD: Duration = Duration::from_millis(10);

/// One stop-the-world pause, in ns since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pause {
    /// When the broker was asked to stop.
    pub start_ns: i64,
    /// When it ran again.
    pub end_ns: i64,
}

/// The GC log could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the broker's GC log {}", path.display())]
pub struct GcLogError {
    /// The file that failed.
    pub path: PathBuf,
    /// What the file system said.
    #[source]
    pub source: std::io::Error,
}

/// The pauses a broker's GC log holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BrokerPauses {
    /// The files read: the log and its rotated copies (`gc.log.0`, `gc.log.1`, …).
    pub files: Vec<PathBuf>,
    /// The pauses, by start; overlapping ones (a line in two rotated files) merged.
    pub pauses: Vec<Pause>,
    /// The time span of the log's timestamped lines, ns: pauses outside it are unknown.
    pub span_ns: Option<(i64, i64)>,
    /// Safepoint lines that could not be read (cut short by a rotation, say): ignored.
    pub unreadable: u64,
}

impl BrokerPauses {
    /// Reads the log at `path` and its rotated copies beside it.
    pub fn read(path: &Path) -> Result<Self, GcLogError> {
        let err = |path: &Path, source| GcLogError { path: path.to_path_buf(), source };
        let mut files = vec![path.to_path_buf()];
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            let rotated = std::fs::read_dir(dir).map_err(|e| err(dir, e))?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| {
                p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(name)).and_then(|n| n.strip_prefix('.')).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            });
            let mut rotated: Vec<PathBuf> = rotated.collect();
            rotated.sort();
            files.extend(rotated);
        }
        let mut texts = Vec::with_capacity(files.len());
        for f in &files {
            // Bytes, not a String: a line cut by a rotation may cut a UTF-8 sequence.
            let bytes = std::fs::read(f).map_err(|e| err(f, e))?;
            texts.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        let mut p = Self::parse(texts.iter().map(String::as_str));
        p.files = files;
        Ok(p)
    }

    /// The pauses in the texts of one log's files, in any order. Lines that are not
    /// safepoint lines are skipped.
    pub fn parse<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut p = BrokerPauses::default();
        for line in texts.into_iter().flat_map(str::lines) {
            let Some((time_ns, message)) = split_line(line) else {
                p.unreadable += line.contains("Safepoint \"") as u64;
                continue;
            };
            p.span_ns = Some(p.span_ns.map_or((time_ns, time_ns), |(a, b)| (a.min(time_ns), b.max(time_ns))));
            if !message.starts_with("Safepoint \"") {
                continue;
            }
            match safepoint_total_ns(message) {
                Some(total) => p.pauses.push(Pause { start_ns: time_ns.saturating_sub(total), end_ns: time_ns }),
                None => p.unreadable += 1,
            }
        }
        p.pauses.sort_unstable();
        p.pauses.dedup_by(|later, earlier| {
            let overlaps = later.start_ns <= earlier.end_ns;
            if overlaps {
                earlier.end_ns = earlier.end_ns.max(later.end_ns);
            }
            overlaps
        });
        p
    }

    /// For each of the `n` seconds from unix second `first_s`, the ns the broker was
    /// stopped within it (a pause across a second boundary counts in both, each its part).
    pub fn stopped_ns_by_second(&self, first_s: i64, n: usize) -> Vec<u64> {
        let mut out = vec![0u64; n];
        let from = first_s.saturating_mul(NS_PER_S);
        let to = first_s.saturating_add(n as i64).saturating_mul(NS_PER_S);
        for p in &self.pauses {
            let (mut a, b) = (p.start_ns.max(from), p.end_ns.min(to));
            while a < b {
                let s = a.div_euclid(NS_PER_S);
                let upto = b.min((s + 1) * NS_PER_S);
                out[(s - first_s) as usize] += (upto - a) as u64;
                a = upto;
            }
        }
        out
    }
}

/// Whether a second in which the broker was stopped for `stopped_ns` is marked.
pub fn is_marked(stopped_ns: u64, threshold: Duration) -> bool {
    u128::from(stopped_ns) >= threshold.as_nanos()
}

/// A log line's time (the first decorator that is a date-time) and its message (the
/// text after the decorators).
fn split_line(line: &str) -> Option<(i64, &str)> {
    let mut rest = line;
    let mut time = None;
    while let Some(r) = rest.strip_prefix('[') {
        let (decorator, after) = r.split_once(']')?;
        if time.is_none() {
            time = parse_time(decorator);
        }
        rest = after;
    }
    Some((time?, rest.trim_start()))
}

/// The `time`/`utctime` decorator, `2026-12-01T13:00:08.627+0000`, in ns since the epoch.
fn parse_time(s: &str) -> Option<i64> {
    let t = s.find('T')?;
    let (local, offset_s) = match s[t..].rfind(['+', '-']) {
        Some(i) => {
            let (local, offset) = s.split_at(t + i);
            let digits: String = offset[1..].chars().filter(|c| *c != ':').collect();
            if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let (h, m): (i64, i64) = (digits[..2].parse().ok()?, digits[2..].parse().ok()?);
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            (local, sign * (h * 3600 + m * 60))
        }
        None => (s.strip_suffix('Z')?, 0),
    };
    let local_ns = actio_core::time::parse_rfc3339_ns(&format!("{local}Z"))?;
    local_ns.checked_sub(offset_s.checked_mul(NS_PER_S)?)
}

/// `Total: 24184067 ns` of a safepoint message.
fn safepoint_total_ns(message: &str) -> Option<i64> {
    let (_, total) = message.rsplit_once("Total: ")?;
    let n = total.strip_suffix("ns")?.trim_end();
    n.parse().ok().filter(|n: &i64| *n >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of a real broker's gc.log, then two made-up safepoints (a pause across a
    /// second boundary, and one cut short), and garbage.
    const FIXTURE: &str = r#"[2026-12-01T13:00:07.857+0000][1.299s] Heap Region Size: 2M
[2026-12-01T13:00:08.306+0000][1.749s] Safepoint "ICBufferFull", Time since last: 402887870 ns, Reaching safepoint: 94782 ns, Cleanup: 111346 ns, At safepoint: 857650 ns, Total: 1063778 ns
[2026-12-01T13:00:08.603+0000][2.045s] GC(0) Pause Young (Concurrent Start) (Metadata GC Threshold)
[2026-12-01T13:00:08.627+0000][2.069s] GC(0) MMU target violated: 21.0ms (20.0ms/21.0ms)
[2026-12-01T13:00:08.627+0000][2.069s] Safepoint "CollectForMetadataAllocation", Time since last: 296670840 ns, Reaching safepoint: 4286 ns, Cleanup: 142683 ns, At safepoint: 24037098 ns, Total: 24184067 ns
[2026-12-01T13:00:09.228+0000][2.670s] Safepoint "CollectForMetadataAllocation", Time since last: 107990397 ns, Reaching safepoint: 3115 ns, Cleanup: 69333 ns, At safepoint: 17239489 ns, Total: 17311937 ns
this line is not from the JVM ] [
[2026-12-01T13:00:11.015+0000][4.457s] Safepoint "G1CollectForAllocation", Time since last: 714048138 ns, Reaching safepoint: 10626 ns, Cleanup: 43535 ns, At safepoint: 24989374 ns, Total: 25000000 ns
[2026-12-01T13:00:12.346+0000][5.788s] Safepoint "Cleanup", Time since last: 1000140373 ns, Reaching safepo
[2026-12-01T13:00:12.346+0000][5.788s] Safepoint "Cleanup", Time since last: 1000140664 ns, Reaching safepoint: 10315 ns, Cleanup: 18217 ns, At safepoint: 2504 ns, Total: 31036 ns
"#;

    fn at(rfc3339: &str) -> i64 {
        actio_core::time::parse_rfc3339_ns(rfc3339).unwrap()
    }

    #[test]
    fn safepoint_lines_become_pauses_and_garbage_is_skipped() {
        let p = BrokerPauses::parse([FIXTURE]);
        let ends: Vec<i64> = p.pauses.iter().map(|p| p.end_ns).collect();
        assert_eq!(ends, ["2026-12-01T13:00:08.306Z", "2026-12-01T13:00:08.627Z", "2026-12-01T13:00:09.228Z", "2026-12-01T13:00:11.015Z", "2026-12-01T13:00:12.346Z"].map(at));
        let gc0 = p.pauses[1];
        assert_eq!((gc0.end_ns - gc0.start_ns, gc0.start_ns), (24_184_067, at("2026-12-01T13:00:08.627Z") - 24_184_067));
        assert_eq!(p.unreadable, 1, "the cut-short safepoint line");
        assert_eq!(p.span_ns, Some((at("2026-12-01T13:00:07.857Z"), at("2026-12-01T13:00:12.346Z"))));
    }

    #[test]
    fn the_time_offset_is_applied() {
        let utc = BrokerPauses::parse([r#"[2026-12-01T13:00:08.627+0000] Safepoint "X", Total: 1000 ns"#]);
        let cet = BrokerPauses::parse([r#"[2026-12-01T14:00:08.627+0100][2.069s] Safepoint "X", Total: 1000 ns"#]);
        let west = BrokerPauses::parse([r#"[2026-12-01T09:30:08.627-03:30] Safepoint "X", Total: 1000 ns"#]);
        assert_eq!(utc.pauses, cet.pauses);
        assert_eq!(utc.pauses, west.pauses);
        assert_eq!(utc.pauses[0].end_ns, at("2026-12-01T13:00:08.627Z"));
    }

    #[test]
    fn a_pause_across_a_second_boundary_counts_in_both_seconds() {
        let p = BrokerPauses::parse([FIXTURE]);
        let first = at("2026-12-01T13:00:08Z") / NS_PER_S;
        let stopped = p.stopped_ns_by_second(first, 5);
        assert_eq!(stopped[0], 1_063_778 + 24_184_067, "13:00:08");
        assert_eq!(stopped[1], 17_311_937, "13:00:09");
        // 13:00:10.990 to 13:00:11.015.
        assert_eq!((stopped[2], stopped[3]), (10_000_000, 15_000_000), "13:00:10 and :11");
        assert_eq!(stopped[4], 31_036, "13:00:12");
        // Seconds outside the range are cut off, not indexed out of bounds.
        assert_eq!(p.stopped_ns_by_second(first + 3, 1), vec![15_000_000]);
        assert_eq!(p.stopped_ns_by_second(first + 100, 2), vec![0, 0]);
    }

    #[test]
    fn a_second_is_marked_from_the_threshold_up() {
        let p = BrokerPauses::parse([FIXTURE]);
        let stopped = p.stopped_ns_by_second(at("2026-12-01T13:00:08Z") / NS_PER_S, 5);
        let marked: Vec<bool> = stopped.iter().map(|s| is_marked(*s, DEFAULT_MARK_THRESHOLD)).collect();
        assert_eq!(marked, [true, true, true, true, false], "exactly 10 ms in 13:00:10 marks it");
        assert!(!is_marked(9_999_999, DEFAULT_MARK_THRESHOLD));
        assert!(!is_marked(17_311_937, Duration::from_millis(20)));
    }

    #[test]
    fn rotated_files_are_read_and_a_line_in_two_of_them_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = FIXTURE.split_at(FIXTURE.find("[2026-12-01T13:00:09.228").unwrap());
        let overlap = FIXTURE.lines().nth(4).unwrap();
        std::fs::write(dir.path().join("gc.log.0"), older).unwrap();
        std::fs::write(dir.path().join("gc.log"), format!("{overlap}\n{newer}")).unwrap();
        std::fs::write(dir.path().join("gc.log.old"), "[2026-12-01T13:00:10.000+0000] Safepoint \"X\", Total: 900000000 ns\n").unwrap();
        let read = BrokerPauses::read(&dir.path().join("gc.log")).unwrap();
        assert_eq!(read.pauses, BrokerPauses::parse([FIXTURE]).pauses, "gc.log.old is not a rotation");
        assert_eq!(read.files.len(), 2);
        let missing = BrokerPauses::read(&dir.path().join("nope.log")).unwrap_err();
        assert!(missing.to_string().contains("nope.log"), "{missing}");
    }
}

//! `actio trail`: reads a decision trail (`trail.db` beside a run's report) — one
//! transaction's evaluation, or the newest that match filters.

use std::fmt::Write as _;
use std::process::ExitCode;

use actio_core::time::{format_rfc3339_ns, parse_rfc3339_ns};
use actio_trail::{Location, Query, TrailReader, TrailRecord};

use crate::cli::TrailArgs;

/// The `since` / `until` filters as ns since the epoch; an error names the filter as
/// `label(name)` spells it (`--since ` on the command line, `since=` in a URL).
pub fn time_range(since: Option<&str>, until: Option<&str>, label: impl Fn(&str) -> String) -> Result<(Option<i64>, Option<i64>), String> {
    let time = |name: &str, v: Option<&str>| {
        v.map(|s| parse_rfc3339_ns(s).ok_or_else(|| format!("{}{s:?}: expected an RFC 3339 time such as 2026-12-01T10:00:00Z", label(name)))).transpose()
    };
    Ok((time("since", since)?, time("until", until)?))
}

pub fn main(args: TrailArgs) -> anyhow::Result<ExitCode> {
    let location = Location::parse(&args.db);
    let mut reader = match TrailReader::open(&location) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e} (a run's trail is trail.db beside its report, written by `actio run --trail`; a service's is the database of its --trail)");
            return Ok(ExitCode::from(crate::EXIT_CONFIG));
        }
    };
    let (since_ns, until_ns) = match time_range(args.since.as_deref(), args.until.as_deref(), |name| format!("--{name} ")) {
        Ok(range) => range,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(crate::EXIT_CONFIG));
        }
    };
    let query = Query { outcome: args.outcome, rule: args.rule, key: args.key, since_ns, until_ns, limit: args.limit };
    if args.count {
        println!("{}", reader.count_matching(&query)?);
        return Ok(ExitCode::SUCCESS);
    }
    let records = match &args.tx_id {
        Some(id) => match reader.get(id)? {
            Some(r) => vec![r],
            None => {
                eprintln!("error: no transaction {id:?} in {} ({} recorded)", location, reader.count()?);
                return Ok(ExitCode::from(1));
            }
        },
        None => reader.query(&query)?,
    };
    for r in &records {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        } else if args.tx_id.is_some() {
            print!("{}", detail(r));
        } else {
            println!("{}", line(r));
        }
    }
    if records.is_empty() && !args.json {
        eprintln!("nothing matches ({} transactions recorded)", reader.count()?);
    }
    Ok(ExitCode::SUCCESS)
}

fn outcome(r: &TrailRecord) -> String {
    match (&r.outcome, &r.dead_letter) {
        (Some(o), _) => o.clone(),
        (None, Some(d)) => format!("dead-lettered at {}", d.stage),
        (None, None) => "-".into(),
    }
}

fn hits(r: &TrailRecord) -> String {
    r.hits.iter().map(|h| if h.shadow { format!("{} (shadow)", h.rule) } else { h.rule.clone() }).collect::<Vec<_>>().join(", ")
}

/// One line: time, id, key, outcome, score, hits.
fn line(r: &TrailRecord) -> String {
    format!(
        "{}  {}  key {}  {}{}{}",
        format_rfc3339_ns(r.created_at_ns),
        r.tx_id,
        r.key,
        outcome(r),
        r.score.map(|s| format!("  score {s:.3}")).unwrap_or_default(),
        if r.hits.is_empty() { String::new() } else { format!("  hits {}", hits(r)) }
    )
}

/// Everything recorded of one transaction.
fn detail(r: &TrailRecord) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "transaction {}  key {}", r.tx_id, r.key);
    let _ = writeln!(o, "  created   {}", format_rfc3339_ns(r.created_at_ns));
    let _ = writeln!(o, "  outcome   {}{}", outcome(r), r.score.map(|s| format!("  (score {s:.6})")).unwrap_or_default());
    if let Some(d) = &r.dead_letter {
        let _ = writeln!(o, "  error     {}", d.error);
    }
    if !r.rules_version.is_empty() {
        let _ = writeln!(o, "  versions  rules {}  model {}", r.rules_version, r.model_version);
    }
    let _ = writeln!(o, "  retried   {}", if r.retried { "yes, through a retry topic" } else { "no" });
    let _ = writeln!(o, "  stages    (queue = since the previous hop's output, process = consumed → produced)");
    let mut prev = r.created_at_ns;
    for h in &r.hops {
        let _ = writeln!(o, "    {:<12} queue {:>8.3} ms  process {:>8.3} ms", h.stage, (h.consumed_ns - prev) as f64 / 1e6, (h.produced_ns - h.consumed_ns) as f64 / 1e6);
        prev = h.produced_ns;
    }
    let _ = writeln!(o, "  rules     {}", if r.hits.is_empty() { "none fired".into() } else { hits(r) });
    if !r.features.is_empty() {
        let f: Vec<String> = r.features.iter().map(|(n, v)| format!("{n} {v}")).collect();
        let _ = writeln!(o, "  features  {}", f.join(", "));
    }
    o
}

//! `actio replay`: backtest a change. Re-runs a pipeline over recorded traffic on a
//! private embedded log (nothing reaches a live topic) and diffs its decisions with
//! the recorded ones (a trail) or with another pipeline's over the same traffic.
//!
//! The replay runs the pipeline's own services (`launch::start`, as `actio run`
//! does), so every stage kind and graph shape replays as it runs live; the decisions
//! are caught by a trail writer that keeps them in memory, and compared by
//! transaction id (`actio_trail::diff`). Transactions go in their recorded order,
//! keyed as live, so each key's stream — and with it every velocity window — is
//! rebuilt in the order the live pipeline saw it. The log is fed as fast as the
//! stages take it, with at most [`IN_FLIGHT`] transactions undecided, so memory
//! stays bounded whatever the file's size.
//!
//! The traffic is a JSONL file (`actio run --record-traffic`), or a Kafka topic's
//! time range (`--topic`), read without a group into such a file first.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_bus_embedded::{EmbeddedBus, EmbeddedConfig};
use actio_core::bus::Bytes;
use actio_core::{Bus, Headers, OutRecord, Producer, ProducerConfig, headers};
use actio_pipeline::launch::{self, LaunchOptions, Selection};
use actio_pipeline::Pipeline;
use actio_runtime::StopMode;
use actio_trail::{Location, TrailReader, TrailRecord, TrailWriter};
use anyhow::{Context, bail};

use crate::cli::ReplayArgs;

/// Most transactions sent and not yet decided.
const IN_FLIGHT: u64 = 50_000;
/// With no new decision for this long, the undecided ones are given up on.
const IDLE: Duration = Duration::from_secs(10);

/// What one replay decided.
struct Replayed {
    records: HashMap<String, TrailRecord>,
    /// The ids of every transaction sent.
    ids: HashSet<String>,
    sent: u64,
    secs: f64,
}

pub fn main(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let Ok(pipeline) = crate::run::load_pipeline(&args.pipeline) else { return Ok(ExitCode::from(crate::EXIT_CONFIG)) };
    let baseline = match &args.baseline {
        Some(dir) => match crate::run::load_pipeline(dir) {
            Ok(p) => Some(p),
            Err(code) => return Ok(code),
        },
        None => None,
    };
    if let Some(input) = args.input.as_ref().filter(|i| !i.is_file()) {
        eprintln!("error: --input {}: no such file (`actio run --record-traffic` writes traffic.jsonl beside its report)", input.display());
        return Ok(ExitCode::from(crate::EXIT_CONFIG));
    }
    let range = match crate::trail::time_range(args.since.as_deref(), args.until.as_deref(), |f| format!("--{f} ")) {
        Ok((since, until)) => (since.map_or(0, |ns| ns / 1_000_000), until.map_or(i64::MAX, |ns| ns / 1_000_000)),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(crate::EXIT_CONFIG));
        }
    };
    // A trail that cannot be opened is an error before minutes of replay.
    let mut against = match &args.against {
        Some(l) => match TrailReader::open(&Location::parse(l)) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("error: --against: {e}");
                return Ok(ExitCode::from(crate::EXIT_CONFIG));
            }
        },
        None => None,
    };

    let out = args.out.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Path::new("results").join(format!("replay-{t}"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let input = match (&args.input, &args.topic) {
        (Some(i), _) => i.clone(),
        (None, Some(topic)) => {
            let path = out.join("traffic.jsonl");
            let bus = match crate::kafka::bus_or_exit(&pipeline, &args.kafka) {
                Ok(b) => b,
                Err(code) => return Ok(code),
            };
            let n = read_topic(&bus, topic, range, &path)?;
            if n == 0 {
                eprintln!("error: --topic {topic}: no record between {} and {}", args.since.as_deref().unwrap_or("its oldest"), args.until.as_deref().unwrap_or("its end"));
                return Ok(ExitCode::from(1));
            }
            eprintln!("read {n} records of {topic} into {}", path.display());
            path
        }
        (None, None) => bail!("--input or --topic is required"),
    };
    let new = replay(&pipeline, &input, args.threads, args.fuse)?;
    eprintln!("replayed {} of {} transactions through {} in {:.1} s ({:.0} tx/s)", new.records.len(), new.sent, pipeline.name, new.secs, new.sent as f64 / new.secs.max(1e-3));
    let (old, old_name) = match (&baseline, &mut against) {
        (Some(b), _) => {
            let old = replay(b, &input, args.threads, args.fuse)?;
            eprintln!("replayed the baseline {}: {} in {:.1} s", b.dir.display(), old.records.len(), old.secs);
            (old.records, b.dir.display().to_string())
        }
        (None, Some(reader)) => (recorded(reader, &new).context("reading the recorded trail")?, reader.location().to_string()),
        (None, None) => bail!("--against or --baseline is required"),
    };
    let diff = actio_trail::diff::diff(&old, &new.records, args.top);

    let title = format!("replay of {} ({}) against {old_name}", pipeline.name, args.pipeline.display());
    let json = serde_json::json!({
        "pipeline": args.pipeline.display().to_string(),
        "input": input.display().to_string(),
        "against": old_name,
        "sent": new.sent,
        "replayed": new.records.len(),
        "replay_secs": new.secs,
        "diff": diff,
    });
    std::fs::write(out.join("diff.json"), format!("{json:#}\n")).with_context(|| format!("writing {}/diff.json", out.display()))?;
    std::fs::write(out.join("diff.html"), diff.render_html(&title)).with_context(|| format!("writing {}/diff.html", out.display()))?;
    if args.json {
        println!("{json:#}");
    } else {
        println!("{title}");
        print!("{}", diff.render_text());
        println!("diff: {}/diff.html (also diff.json)", out.display());
    }
    if diff.only_recorded > 0 {
        eprintln!("actio: {} recorded transactions were not decided by the replay (dead-lettered before deciding, or still undecided after {IDLE:?})", diff.only_recorded);
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the records of `topic` with a timestamp in `[from_ms, until_ms)` (up to the
/// end offsets it has now) to `path`, one ingress JSON per line, and returns how many.
/// Each partition is read in offset order into a file of its own; the files are then
/// merged by timestamp, so each key keeps its order (one key, one partition) and the
/// keys interleave as they were produced. A record that is not JSON (live, it was
/// dead-lettered) is skipped and counted.
fn read_topic(bus: &actio_bus_kafka::KafkaBus, topic: &str, (from_ms, until_ms): (i64, i64), path: &Path) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let ends = bus.end_offsets(topic).with_context(|| format!("--topic {topic}: reading its end offsets"))?;
    let parts_dir = path.with_extension("partitions");
    std::fs::create_dir_all(&parts_dir).with_context(|| format!("creating {}", parts_dir.display()))?;
    let (mut skipped, mut first_skipped) = (0u64, None);
    let mut files = Vec::new();
    for (p, &end) in ends.iter().enumerate() {
        let part = parts_dir.join(p.to_string());
        let mut w = std::io::BufWriter::new(std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?);
        let mut failed: Option<std::io::Error> = None;
        let tp = actio_core::TopicPartition::new(topic, p as i32);
        let t0 = Instant::now();
        let read = bus
            .replay(&tp, actio_core::bus::ReplayRange { from_ms, until: end, max_records: u64::MAX }, &mut |r| {
                let ts = r.timestamp_ms.unwrap_or(0);
                if failed.is_some() || ts >= until_ms {
                    return;
                }
                match serde_json::from_slice::<serde_json::Value>(&r.payload) {
                    // Compact: a producer's pretty-printed JSON stays one line.
                    Ok(v) => failed = writeln!(w, "{ts}\t{v}").err(),
                    Err(e) => {
                        skipped += 1;
                        first_skipped.get_or_insert_with(|| format!("{tp}@{}: {e}", r.offset));
                    }
                }
            })
            .with_context(|| format!("--topic {topic}: reading partition {p}"))?;
        if let Some(e) = failed.or_else(|| w.flush().err()) {
            return Err(e).with_context(|| format!("writing {}", part.display()));
        }
        eprintln!("  {tp}: {read} records read in {:.1} s", t0.elapsed().as_secs_f64());
        files.push(part);
    }
    if let Some(first) = first_skipped {
        eprintln!("actio: {skipped} records of {topic} are not JSON and were skipped (live, they went to the dead-letter topic); the first: {first}");
    }
    // The k-way merge: the smallest timestamp at the heads, ties by partition.
    let mut heads: Vec<std::io::Lines<std::io::BufReader<std::fs::File>>> =
        files.iter().map(|f| std::fs::File::open(f).map(|f| std::io::BufReader::new(f).lines())).collect::<Result<_, _>>().context("reading the partitions back")?;
    let next = |l: &mut std::io::Lines<std::io::BufReader<std::fs::File>>| -> anyhow::Result<Option<(i64, String)>> {
        let Some(line) = l.next().transpose()? else { return Ok(None) };
        let (ts, json) = line.split_once('\t').ok_or_else(|| anyhow::anyhow!("a partition file lost its format"))?;
        Ok(Some((ts.parse()?, json.to_string())))
    };
    let mut heap = std::collections::BinaryHeap::new();
    for (i, h) in heads.iter_mut().enumerate() {
        if let Some((ts, json)) = next(h)? {
            heap.push(std::cmp::Reverse((ts, i, json)));
        }
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let mut n = 0u64;
    while let Some(std::cmp::Reverse((_, i, json))) = heap.pop() {
        writeln!(out, "{json}").with_context(|| format!("writing {}", path.display()))?;
        n += 1;
        if let Some((ts, json)) = next(&mut heads[i])? {
            heap.push(std::cmp::Reverse((ts, i, json)));
        }
    }
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    let _ = std::fs::remove_dir_all(&parts_dir);
    Ok(n)
}

/// The recorded trail's records of the transactions the replay sent.
fn recorded(reader: &mut TrailReader, replayed: &Replayed) -> Result<HashMap<String, TrailRecord>, actio_trail::TrailError> {
    // The replayed decisions carry the transactions' event times: read that range,
    // not the whole table (the whole table when the replay decided nothing), then
    // keep the ids of the input, so a transaction the replay did not decide counts
    // as only recorded.
    let times = replayed.records.values().filter(|r| r.outcome.is_some()).map(|r| r.created_at_ns);
    let (lo, hi) = times.fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let (lo, hi) = if lo > hi { (i64::MIN, i64::MAX) } else { (lo, hi.saturating_add(1)) };
    let mut all = reader.between(lo, hi)?;
    all.retain(|id, _| replayed.ids.contains(id));
    Ok(all)
}

/// Sends every line of `input` through `pipeline` on a fresh embedded log and
/// returns the records of what it decided or dead-lettered.
fn replay(pipeline: &Pipeline, input: &Path, threads: Option<usize>, fuse: bool) -> anyhow::Result<Replayed> {
    if !pipeline.stages.iter().any(|s| s.kind.writes == actio_pipeline::Writes::Decisions) {
        bail!("{}: replay compares decisions, and no stage of this pipeline decides", pipeline.dir.display());
    }
    let ingresses: Vec<Arc<str>> = pipeline.topics.iter().filter(|t| t.role == actio_pipeline::TopicRole::Ingress).map(|t| Arc::from(t.name.as_str())).collect();
    if ingresses.is_empty() {
        bail!("{}: the pipeline has no ingress topic", pipeline.dir.display());
    }
    let bus = Arc::new(EmbeddedBus::new(EmbeddedConfig::default()));
    launch::create_topics(&*bus, pipeline).context("creating the replay's topics")?;
    let (writer, collected) = TrailWriter::collecting((IN_FLIGHT * 4) as usize)?;
    let writer = Arc::new(writer);
    let options = LaunchOptions { threads, trail: Some(writer.clone()), ..LaunchOptions::default() };
    let stages = launch::start(&bus, pipeline, if fuse { Selection::Fused } else { Selection::All }, &options)?;
    drop(options); // the stages' handlers hold the writer now; it closes after them
    let producer = bus.producer(&ProducerConfig { client_id: "actio-replay".into(), properties: Vec::new(), transactional_id: None })?;
    // Distinct transactions decided (or dead-lettered) so far: one transaction may
    // leave several records (a branch's dead letter, then the join's decision).
    let decided = || collected.lock().map_or(0, |m| m.len() as u64);
    let mut ids = HashSet::new();
    // Transactions given up on: no record for IDLE while the feed waited (a route
    // straight to an egress, a `latest` that drops stale updates decide nothing).
    let mut given_up = 0u64;
    // Decided as last looked at: the feed looks again only at the in-flight cap, not
    // per line (the collected map's lock is the writer's too).
    let mut seen = 0u64;

    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    let mut sent = 0u64;
    for (i, line) in std::io::BufReader::with_capacity(1 << 20, file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let tx = pipeline.schema.decode_json(line.as_bytes()).map_err(|e| anyhow::anyhow!("{}:{}: {e}", input.display(), i + 1))?;
        let key = pipeline.key.key(&tx);
        ids.insert(pipeline.schema.id_of(&tx).to_string());
        let mut h = Headers::default();
        h.set(headers::ID, pipeline.schema.id_of(&tx).as_bytes().to_vec());
        h.set(headers::CREATED, actio_core::time::now_ns().to_string().into_bytes());
        let topic = ingresses[actio_loadgen::schedule::flow_of(&key, ingresses.len())].clone();
        let mut since = None;
        while sent.saturating_sub(seen + given_up) >= IN_FLIGHT {
            if let Some(dead) = stages.iter().find(|s| s.is_finished()) {
                bail!("stage {} stopped during the replay", dead.name());
            }
            std::thread::sleep(Duration::from_micros(200));
            let now = decided();
            let waiting = *since.get_or_insert_with(Instant::now);
            if now > seen {
                (seen, since) = (now, Some(Instant::now()));
            } else if waiting.elapsed() >= IDLE {
                eprintln!("actio: no decision for {IDLE:?} with {} undecided; going on without them", sent.saturating_sub(seen + given_up));
                given_up = sent.saturating_sub(seen);
            }
        }
        producer.send(OutRecord { topic, partition: None, key: Some(Bytes::from(key.into_bytes())), payload: Bytes::from(line.into_bytes()), headers: h }, Box::new(|_| {}))?;
        sent += 1;
        if last_progress.elapsed() >= Duration::from_secs(1) {
            eprintln!("  {:>6.1}s  sent {sent:>9}  decided {:>9}", t0.elapsed().as_secs_f64(), decided());
            last_progress = Instant::now();
        }
    }
    let _ = producer.flush(Duration::from_secs(30));
    // Every transaction sent is decided (or dead-lettered) before the stages stop.
    seen = decided();
    let mut since = Instant::now();
    while seen < sent && since.elapsed() < IDLE && !stages.iter().any(|s| s.is_finished()) {
        std::thread::sleep(Duration::from_millis(2));
        let now = decided();
        if now > seen {
            (seen, since) = (now, Instant::now());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    for s in stages {
        let name = s.name().to_string();
        s.stop(StopMode::Graceful);
        s.join().with_context(|| format!("stage {name} of the replay"))?;
    }
    if TrailWriter::close_shared(writer, Duration::from_secs(10)).is_none() {
        bail!("the replay's decisions were still being written after its stages stopped");
    }
    let records = std::mem::take(&mut *collected.lock().map_err(|_| anyhow::anyhow!("the replay's decisions were lost to a panic"))?);
    Ok(Replayed { records, ids, sent, secs })
}

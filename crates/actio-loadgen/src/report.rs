//! The run report: text for the terminal, `report.json` for machines, one `.hgrm`
//! per histogram for HdrHistogram tools, and `report.html` for people.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

pub use actio_core::latency::{latency_histogram, record_ns};

/// Percentiles of one histogram, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl LatencySummary {
    /// Summarizes a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// One stage's histograms as measured by the runtime in-process.
#[derive(Debug, Clone)]
pub struct StageHistograms {
    /// Stage name.
    pub name: String,
    /// consumed − previous hop produced (µs).
    pub queue: Histogram<u64>,
    /// Handler time (µs).
    pub service: Histogram<u64>,
    /// consumed → outputs acknowledged (µs).
    pub stage: Histogram<u64>,
    /// The stage's p99 budget, if declared.
    pub budget_ms: Option<f64>,
}

/// One stage in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name (also the key in `stages`).
    #[serde(skip)]
    pub name: String,
    /// Queue time.
    pub queue: LatencySummary,
    /// Handler time (in-process runs; zero count when measured elsewhere).
    pub service: LatencySummary,
    /// Consumed → acknowledged (in-process runs; zero count when measured elsewhere).
    pub stage: LatencySummary,
    /// Consumed → produced, from the trail header (always available).
    pub process: LatencySummary,
    /// The stage's p99 budget in ms.
    pub budget_ms: Option<f64>,
    /// Whether the stage's p99 (stage latency, else process) broke its budget.
    pub budget_breached: bool,
}

/// Decisions by outcome, in the order the pipeline's schema declares the outcomes
/// (an outcome never decided counts 0). JSON: an object of outcome → count.
#[derive(Debug, Clone, Default)]
pub struct DecisionCounts(pub Vec<(String, u64)>);

impl DecisionCounts {
    /// The counts of `declared` outcomes (in that order) from `seen`; names seen but
    /// not declared follow, so nothing is hidden.
    pub fn new(declared: &[String], seen: &std::collections::BTreeMap<String, u64>) -> Self {
        let mut v: Vec<(String, u64)> = declared.iter().map(|o| (o.clone(), seen.get(o).copied().unwrap_or(0))).collect();
        v.extend(seen.iter().filter(|(k, _)| !declared.contains(k)).map(|(k, n)| (k.clone(), *n)));
        DecisionCounts(v)
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

impl Serialize for DecisionCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A rule and how often it fired.
#[derive(Debug, Clone, Serialize)]
pub struct RuleHitCount {
    /// Rule id.
    pub rule: String,
    /// Decisions it appeared in.
    pub count: u64,
}

/// One wall-clock second of the run: what the collector first saw in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecondReport {
    /// Unix second.
    pub unix_s: i64,
    /// Seconds after the second in which the load started (0: that second).
    pub t_s: i64,
    /// Decisions first seen in it.
    pub decided: u64,
    /// e2e median of the decisions and dead letters first seen in it, µs (0: none).
    pub p50_us: u64,
    /// e2e 99th percentile, µs.
    pub p99_us: u64,
    /// e2e largest, µs.
    pub max_us: u64,
    /// How long the broker was stopped in it, ms, from its GC log (null: no log read).
    pub broker_paused_ms: Option<f64>,
    /// Marked: the broker was stopped in it for at least
    /// [`BrokerPauseReport::mark_threshold_ms`].
    pub broker_paused: bool,
    /// The share of the machine's CPU time the hypervisor stole in it, percent
    /// (`/proc/stat`; null: not sampled).
    pub steal_pct: Option<f64>,
}

/// The broker's stop-the-world pauses during the run's seconds, from its GC log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerPauseReport {
    /// The log read (rotated copies beside it were read too).
    pub gc_log: String,
    /// Whether the log has lines from before and after the load started; if not it is
    /// not the log of the broker that served this run, and pauses are missing.
    pub log_covers_load_start: bool,
    /// A second is marked when the broker was stopped this long in it, ms.
    pub mark_threshold_ms: f64,
    /// Pauses within the run's seconds.
    pub pauses: u64,
    /// Their total within the run's seconds, ms.
    pub paused_ms: f64,
    /// The longest of them, ms.
    pub longest_ms: f64,
    /// Seconds marked.
    pub marked_seconds: u64,
}

/// A second's e2e p99 above this is listed in the terminal report, marked or not, µs.
pub const SLOW_SECOND_P99_US: u64 = 35_000;

/// Most seconds the terminal report (and the HTML table) lists.
const LISTED_SECONDS: usize = 20;

/// The `.hgrm` stem of the e2e outside marked seconds.
pub const E2E_OUTSIDE_BROKER_PAUSES: &str = "e2e.outside-broker-pauses";

/// The rules' hit counter, which the summary shows as "top rule hits".
const RULE_HITS_COUNTER: &str = "actio_rule_hits_total";

/// Most of one service's counters the terminal summary lists.
const COUNTERS_LISTED: usize = 6;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Pipeline name.
    pub pipeline: String,
    /// `embedded` or `kafka`.
    pub bus: String,
    /// Run id (transaction id prefix).
    pub run_id: String,
    /// Mean offered rate, tx/s.
    pub rate_target: f64,
    /// Decided (+ dead-lettered) per second over the load duration.
    pub rate_achieved: f64,
    /// Load duration, s.
    pub duration_s: f64,
    /// Transactions sent.
    pub sent: u64,
    /// Distinct transactions decided.
    pub decided: u64,
    /// Distinct transactions dead-lettered.
    pub dlq: u64,
    /// Sent but never seen.
    pub lost: u64,
    /// Extra deliveries.
    pub duplicates: u64,
    /// Per-key order violations.
    pub order_violations: u64,
    /// Distinct transactions that went through a retry topic.
    pub retried: u64,
    /// Of those, delivered after a later transaction of their key (expected: a retried
    /// transaction leaves its key's order; not an order violation).
    pub reordered_by_retry: u64,
    /// Decisions by verdict.
    pub decisions: DecisionCounts,
    /// Most frequent rule hits.
    pub top_rule_hits: Vec<RuleHitCount>,
    /// End to end: decision seen − intended send time.
    pub e2e: LatencySummary,
    /// Per stage, in chain order.
    #[serde(serialize_with = "stages_as_map")]
    pub stages: Vec<StageReport>,
    /// How far the sender fell behind its schedule at worst, ms.
    pub sender_max_behind_ms: f64,
    /// Peak resident memory of this process, MiB (Linux).
    pub peak_rss_mib: Option<f64>,
    /// Sends the bus failed.
    pub send_failures: u64,
    /// e2e of every second not marked as a broker pause, merged (null without the
    /// broker's GC log). Beside `e2e`, never instead of it: `e2e` is the run's figure.
    pub e2e_outside_broker_pauses: Option<LatencySummary>,
    /// Median of the per-second e2e p99s, over the seconds with a sample, µs.
    pub second_p99_median_us: Option<u64>,
    /// The share of the machine's CPU time the hypervisor stole during the load,
    /// percent (`/proc/stat`; null where it cannot be read). On a shared VM, the same
    /// build's tail moves with it.
    pub machine_steal_pct: Option<f64>,
    /// The processors the run ran on ("2 × <model>", `/proc/cpuinfo`): figures compare
    /// only between runs on the same.
    pub machine_cpu: Option<String>,
    /// The broker's pauses (null without its GC log).
    pub broker_pauses: Option<BrokerPauseReport>,
    /// Every second of the run, from the one the load started in to the last decision.
    pub seconds: Vec<SecondReport>,
    /// The pipeline's graph, drawn in the HTML report with each stage's p99.
    pub graph: Option<StageGraph>,
    /// First deliveries per egress topic (decisions, or the transactions a flow ends
    /// with): what each flow delivered.
    pub by_egress: std::collections::BTreeMap<String, u64>,
    /// Decisions by the rule and model versions they were made with.
    pub by_version: std::collections::BTreeMap<String, u64>,
    /// Decisions made with an older version than an earlier one of their key.
    pub version_flips_back: u64,
    /// Per egress partition, version changes between consecutive decisions.
    pub version_switches: std::collections::BTreeMap<String, u64>,
    /// Where the CPU went while the load ran (null where Linux's per-thread times
    /// cannot be read).
    pub cpu: Option<CpuReport>,
    /// Per service that ran in-process, its stage kinds' own counters that are not
    /// zero at the end (partial joins, stale updates, lookups that went on without
    /// their answer, rule errors …): what `/metrics` would show, kept with the run.
    pub counters: std::collections::BTreeMap<String, Vec<KindCounter>>,
}

/// One of a stage kind's own counters at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindCounter {
    /// Its Prometheus name (`actio_join_partial_total`).
    pub name: String,
    /// Its labels beyond the service's (a rule's id).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its value.
    pub value: u64,
}

impl std::fmt::Display for KindCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let l: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            write!(f, "{{{}}}", l.join(","))?;
        }
        write!(f, " {}", self.value)
    }
}

/// CPU time over a run, from the load's start to its last decision, by the threads
/// that spent it ([`actio_core::cpu`]). `actio plan` sizes deployments from it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuReport {
    /// Wall-clock seconds counted.
    pub wall_s: f64,
    /// The whole process: every thread, the bus's and the clients' too.
    pub process_s: f64,
    /// Each service run here (a stage, or stages fused: its name), its driver and
    /// worker threads, in chain order.
    pub services: Vec<(String, f64)>,
    /// The load generator's sending thread.
    pub loadgen_s: f64,
    /// The collector's thread.
    pub collector_s: f64,
    /// The rest of the process: the bus's own threads (librdkafka's), the trail
    /// writer, the reloader.
    pub other_s: f64,
    /// Transactions the CPU is divided by (decided + dead-lettered).
    pub transactions: u64,
}

impl CpuReport {
    /// What the pipeline itself costs per transaction, µs: the process less the
    /// load generator and the collector.
    pub fn pipeline_us_per_tx(&self) -> f64 {
        (self.process_s - self.loadgen_s - self.collector_s).max(0.0) * 1e6 / self.transactions.max(1) as f64
    }

    /// Cores busy on average over the run (the whole process).
    pub fn cores(&self) -> f64 {
        self.process_s / self.wall_s.max(1e-9)
    }
}

/// A pipeline's graph as the report draws it: stages and the topics between them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageGraph {
    /// `(stage, kind)`, in declaration order.
    pub stages: Vec<(String, String)>,
    /// `(from, to, topic)`: a stage (or an ingress topic) to a stage (or a topic no
    /// stage reads).
    pub edges: Vec<(String, String, String)>,
    /// Ingress topics.
    pub sources: Vec<String>,
    /// Topics no stage reads (egress).
    pub sinks: Vec<String>,
}

impl StageGraph {
    /// Columns, left to right: each node's longest distance from an ingress topic.
    fn columns(&self) -> Vec<(String, usize)> {
        let mut depth: Vec<(String, usize)> = self.sources.iter().map(|s| (s.clone(), 0)).collect();
        // Stages are declared after whatever they read: one pass in order suffices.
        for (stage, _) in &self.stages {
            let d = self.edges.iter().filter(|e| e.1 == *stage).filter_map(|e| depth.iter().find(|(n, _)| *n == e.0).map(|(_, d)| d + 1)).max().unwrap_or(1);
            depth.push((stage.clone(), d));
        }
        let last = depth.iter().map(|(_, d)| *d).max().unwrap_or(0) + 1;
        depth.extend(self.sinks.iter().map(|s| (s.clone(), last)));
        depth
    }

    /// An inline SVG: boxes per column, `label` under each stage's name.
    fn svg(&self, label: &dyn Fn(&str) -> String) -> String {
        let cols = self.columns();
        let (bw, bh, gx, gy) = (170.0, 46.0, 60.0, 18.0);
        let ncol = cols.iter().map(|(_, d)| *d).max().unwrap_or(0) + 1;
        let mut rows = vec![0usize; ncol];
        let mut at: Vec<(String, f64, f64)> = Vec::new();
        for (n, d) in &cols {
            at.push((n.clone(), 10.0 + *d as f64 * (bw + gx), 10.0 + rows[*d] as f64 * (bh + gy)));
            rows[*d] += 1;
        }
        let w = 20.0 + ncol as f64 * (bw + gx) - gx;
        let h = 20.0 + *rows.iter().max().unwrap_or(&1) as f64 * (bh + gy) - gy;
        let mut s = format!("<svg viewBox='0 0 {w} {h}' width='100%' role=img aria-label='pipeline graph'><defs><marker id=arr viewBox='0 0 8 8' refX=8 refY=4 markerWidth=8 markerHeight=8 orient=auto><path d='M0,0 L8,4 L0,8 z' fill='#7a8499'/></marker></defs>");
        let pos = |n: &str| at.iter().find(|(m, _, _)| m == n).map(|(_, x, y)| (*x, *y));
        for (from, to, _) in &self.edges {
            if let (Some((x1, y1)), Some((x2, y2))) = (pos(from), pos(to)) {
                let _ = write!(s, "<line x1={} y1={} x2={} y2={} stroke='#7a8499' marker-end='url(#arr)'/>", x1 + bw, y1 + bh / 2.0, x2, y2 + bh / 2.0);
            }
        }
        for (n, x, y) in &at {
            let stage = self.stages.iter().find(|(m, _)| m == n);
            let (fill, line2) = match stage {
                Some((_, kind)) => ("#ffffff", format!("{} · {}", esc(kind), esc(&label(n)))),
                None => ("#f3f5f9", "topic".to_string()),
            };
            let _ = write!(s, "<rect x={x} y={y} width={bw} height={bh} rx=6 fill='{fill}' stroke='#c4cad6'/><text x={} y={} font-size=13 font-weight=600>{}</text><text x={} y={} font-size=11 fill='#5b6475'>{line2}</text>", x + 8.0, y + 18.0, esc(n), x + 8.0, y + 35.0);
        }
        s.push_str("</svg>");
        s
    }
}

fn stages_as_map<S: serde::Serializer>(stages: &[StageReport], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(stages.len()))?;
    for st in stages {
        m.serialize_entry(&st.name, st)?;
    }
    m.end()
}

impl StageReport {
    /// Builds a stage's report from what is known about it.
    pub fn new(name: &str, runtime: Option<&StageHistograms>, trail: Option<(&Histogram<u64>, &Histogram<u64>)>, budget_ms: Option<f64>) -> Self {
        let summary = |h: Option<&Histogram<u64>>| h.map(LatencySummary::of).unwrap_or_default();
        let queue = runtime.map(|r| &r.queue).or(trail.map(|t| t.0));
        let stage = summary(runtime.map(|r| &r.stage));
        let process = summary(trail.map(|t| t.1));
        let judged = if stage.count > 0 { stage.p99_us } else { process.p99_us };
        StageReport {
            name: name.to_string(),
            queue: summary(queue),
            service: summary(runtime.map(|r| &r.service)),
            stage,
            process,
            budget_ms,
            budget_breached: budget_ms.is_some_and(|b| judged as f64 / 1000.0 > b),
        }
    }
}

/// Peak resident set size of this process in MiB, from /proc (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// The standard HdrHistogram percentile-distribution text (`.hgrm`), values in ms.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:>14.2}", 1.0 / (1.0 - q)) } else { String::new() };
        let _ = writeln!(out, "{:>12.3} {:>14.12} {:>10} {inv}", v.value_iterated_to() as f64 / 1000.0, q, total);
    }
    let _ = writeln!(out, "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]", h.mean() / 1000.0, h.stdev() / 1000.0);
    let _ = writeln!(out, "#[Max     = {:>12.3}, Total count    = {:>12}]", h.max() as f64 / 1000.0, h.len());
    let _ = writeln!(out, "#[Buckets = {:>12}, SubBuckets     = {:>12}]", h.buckets(), h.distinct_values());
    out
}

impl RunReport {
    /// The terminal table.
    pub fn render_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "\nactio run {} on {} bus — {:.0} tx/s offered for {:.1} s, {:.0} tx/s achieved", self.pipeline, self.bus, self.rate_target, self.duration_s, self.rate_achieved);
        let _ = writeln!(o, "\n{:<10} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}", "stage", "latency", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms");
        let row = |o: &mut String, a: &str, b: &str, s: &LatencySummary, flag: &str| {
            if s.count > 0 {
                let _ = writeln!(o, "{a:<10} {b:<8} {:>9} {:>9} {:>9} {:>9} {:>9}{flag}", ms(s.p50_us), ms(s.p90_us), ms(s.p99_us), ms(s.p999_us), ms(s.max_us));
            }
        };
        for st in &self.stages {
            let flag = if st.budget_breached { format!("  ← p99 over budget {} ms", st.budget_ms.unwrap_or_default()) } else { String::new() };
            row(&mut o, &st.name, "queue", &st.queue, "");
            row(&mut o, "", "service", &st.service, "");
            row(&mut o, "", "stage", &st.stage, &flag);
            if st.stage.count == 0 {
                row(&mut o, "", "process", &st.process, &flag);
            }
        }
        row(&mut o, "e2e", "", &self.e2e, "");
        if let Some(out) = &self.e2e_outside_broker_pauses {
            row(&mut o, "", "unpaused", out, "  (seconds not marked as broker pauses)");
        }
        self.render_seconds_text(&mut o);
        let _ = writeln!(
            o,
            "\nsent {}  decided {}  dlq {}  lost {}  duplicates {}  order violations {}",
            self.sent, self.decided, self.dlq, self.lost, self.duplicates, self.order_violations
        );
        if self.retried > 0 {
            let _ = writeln!(o, "retried via a retry topic {}  (of which {} decided after a later tx of their key: expected)", self.retried, self.reordered_by_retry);
        }
        if self.by_egress.len() > 1 || self.decisions.total() < self.decided {
            let parts: Vec<String> = self.by_egress.iter().map(|(t, n)| format!("{t} {n}")).collect();
            let _ = writeln!(o, "delivered by egress topic (each flow's end): {}", parts.join("  "));
        }
        if self.by_version.len() > 1 {
            let parts: Vec<String> = self.by_version.iter().map(|(v, n)| format!("{v}: {n}")).collect();
            let _ = writeln!(
                o,
                "decided by version (rules reloaded during the run): {}; {} partition switch(es), {} flipped back",
                parts.join("  "),
                self.version_switches.values().sum::<u64>(),
                self.version_flips_back
            );
        }
        let d = &self.decisions;
        let total = d.total().max(1) as f64;
        let parts: Vec<String> = d.0.iter().map(|(k, n)| format!("{k} {n} ({:.1}%)", 100.0 * *n as f64 / total)).collect();
        if d.total() > 0 {
            let _ = writeln!(o, "decisions: {}", parts.join("  "));
        }
        if !self.top_rule_hits.is_empty() {
            let top: Vec<String> = self.top_rule_hits.iter().take(8).map(|r| format!("{} {}", r.rule, r.count)).collect();
            let _ = writeln!(o, "top rule hits: {}", top.join(", "));
        }
        // Rule hits have their own line above; the rest is what a kind counted.
        let counted: Vec<String> = self
            .counters
            .iter()
            .map(|(service, cs)| (service, cs.iter().filter(|c| c.name != RULE_HITS_COUNTER).collect::<Vec<_>>()))
            .filter(|(_, cs)| !cs.is_empty())
            .map(|(service, cs)| {
                let shown: Vec<String> = cs.iter().take(COUNTERS_LISTED).map(ToString::to_string).collect();
                let more = if cs.len() > COUNTERS_LISTED { format!(", … {} more in report.json", cs.len() - COUNTERS_LISTED) } else { String::new() };
                format!("{service}: {}{more}", shown.join(", "))
            })
            .collect();
        if !counted.is_empty() {
            let _ = writeln!(o, "stage counters: {}", counted.join("; "));
        }
        if let Some(rss) = self.peak_rss_mib {
            let _ = writeln!(o, "peak RSS {rss} MiB; sender max behind schedule {:.3} ms", self.sender_max_behind_ms);
        }
        let machine: Vec<String> = self
            .machine_cpu
            .iter()
            .cloned()
            .chain(self.machine_steal_pct.map(|steal| format!("{steal:.1}% of its CPU time stolen by the hypervisor during the load (per second: report.json \"seconds\")")))
            .collect();
        if !machine.is_empty() {
            let _ = writeln!(o, "machine: {}", machine.join("; "));
        }
        if let Some(c) = &self.cpu {
            let per = |s: f64| s * 1e6 / c.transactions.max(1) as f64;
            let services: Vec<String> = c.services.iter().map(|(n, s)| format!("{n} {:.1}", per(*s))).collect();
            let _ = writeln!(
                o,
                "cpu: {:.2} cores busy; µs per tx: pipeline {:.1} (services: {}; bus and rest {:.1}), load generator {:.1}, collector {:.1}",
                c.cores(),
                c.pipeline_us_per_tx(),
                if services.is_empty() { "elsewhere".to_string() } else { services.join(", ") },
                per(c.other_s),
                per(c.loadgen_s),
                per(c.collector_s)
            );
        }
        o
    }

    /// The seconds the terminal report lists, in time order: marked ones, those with a
    /// p99 over [`SLOW_SECOND_P99_US`], and those in which nothing came out (a stall,
    /// whoever caused it: the series runs from the load's start to the last decision).
    fn notable_seconds(&self) -> impl Iterator<Item = &SecondReport> {
        self.seconds.iter().filter(|s| s.broker_paused || s.p99_us > SLOW_SECOND_P99_US || s.p99_us == 0)
    }

    /// Per-second figures: p99 overall, outside marked seconds, the median of the
    /// seconds' p99s, then the marked and slow seconds.
    fn render_seconds_text(&self, o: &mut String) {
        let median = self.second_p99_median_us.map_or("-".into(), ms);
        let _ = write!(o, "\ne2e p99 {} ms", ms(self.e2e.p99_us));
        match (&self.broker_pauses, &self.e2e_outside_broker_pauses) {
            (Some(b), Some(out)) => {
                let _ = write!(o, "; outside the {} s marked as broker pauses {} ms", b.marked_seconds, ms(out.p99_us));
            }
            _ if self.bus != "embedded" => o.push_str("; broker pauses unknown (no --broker-gc-log)"),
            _ => {}
        }
        let _ = writeln!(o, "; median of the {} per-second p99s {median} ms", self.seconds.iter().filter(|s| s.p99_us > 0).count());
        if let Some(b) = &self.broker_pauses {
            let _ = writeln!(
                o,
                "broker: {} pauses, {:.1} ms stopped in all, longest {:.1} ms; a second is marked at >= {} ms stopped (GC log {})",
                b.pauses, b.paused_ms, b.longest_ms, b.mark_threshold_ms, b.gc_log
            );
            if !b.log_covers_load_start {
                o.push_str("broker: WARNING the GC log does not cover the start of the load: it is not this run's broker, or was cut; pauses are missing\n");
            }
        }
        let notable = self.notable_seconds().count();
        if notable == 0 {
            return;
        }
        let _ = writeln!(o, "seconds marked, with p99 over {} ms, or with nothing seen ({notable} of {}):", ms(SLOW_SECOND_P99_US), self.seconds.len());
        let broker_column = if self.broker_pauses.is_some() { format!(" {:>10}", "broker ms") } else { String::new() };
        let steal_column = if self.machine_steal_pct.is_some() { format!(" {:>7}", "steal %") } else { String::new() };
        let _ = writeln!(o, "{:>6}  {:<8}  {:>8} {:>9} {:>9} {:>9}{broker_column}{steal_column}", "t s", "UTC", "decided", "p50 ms", "p99 ms", "max ms");
        for s in self.notable_seconds().take(LISTED_SECONDS) {
            let mut paused = s.broker_paused_ms.map_or(String::new(), |p| format!(" {p:>10.1}"));
            if self.machine_steal_pct.is_some() {
                paused += &s.steal_pct.map_or(format!(" {:>7}", "-"), |p| format!(" {p:>7.1}"));
            }
            let mark = match (s.broker_paused, s.p99_us == 0) {
                (true, _) => "  ← broker paused",
                (false, true) => "  ← nothing seen",
                _ => "",
            };
            let _ = writeln!(o, "{:>6}  {:<8}  {:>8} {:>9} {:>9} {:>9}{paused}{mark}", s.t_s, clock(s.unix_s), s.decided, ms(s.p50_us), ms(s.p99_us), ms(s.max_us));
        }
        if notable > LISTED_SECONDS {
            let _ = writeln!(o, "  … and {} more (report.json \"seconds\")", notable - LISTED_SECONDS);
        }
    }

    /// Writes `report.json`, the `.hgrm` files and `report.html` into `dir`.
    /// `histograms` are (file stem, histogram) pairs, e.g. ("e2e", h), ("rules.queue", h).
    pub fn write(&self, dir: &Path, histograms: &[(String, Histogram<u64>)]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json + "\n")?;
        for (stem, h) in histograms {
            std::fs::write(dir.join(format!("{stem}.hgrm")), hgrm(h))?;
        }
        std::fs::write(dir.join("report.html"), self.render_html(histograms))?;
        Ok(())
    }

    /// A self-contained HTML page (inline SVG, no network).
    pub fn render_html(&self, histograms: &[(String, Histogram<u64>)]) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=utf-8><title>actio report — {p}</title><style>\
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d2330;background:#fbfbfd}}\
h1{{font-size:22px;margin:0 0 4px}} h2{{font-size:16px;margin:28px 0 8px}} .sub{{color:#5b6475}}\
.cards{{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}} .card{{background:#fff;border:1px solid #e3e6ee;border-radius:8px;padding:10px 14px;min-width:120px}}\
.card b{{display:block;font-size:20px}} .bad b{{color:#c0392b}} .ok b{{color:#1e8449}}\
table{{border-collapse:collapse;background:#fff;border:1px solid #e3e6ee}} td,th{{padding:4px 10px;border-bottom:1px solid #eef0f5;text-align:right}}\
th{{background:#f3f5f9}} td:first-child,th:first-child,td:nth-child(2){{text-align:left}} .breach{{color:#c0392b;font-weight:600}}\
.plots{{display:grid;grid-template-columns:1fr 1fr;gap:14px}} .plot{{background:#fff;border:1px solid #e3e6ee;border-radius:8px;padding:8px}}\
</style></head><body><h1>actio run — {p}</h1><div class=sub>{bus} bus · run {id} · {rt:.0} tx/s offered for {d:.1} s · {ra:.0} tx/s achieved</div>",
            p = esc(&self.pipeline),
            bus = esc(&self.bus),
            id = esc(&self.run_id),
            rt = self.rate_target,
            d = self.duration_s,
            ra = self.rate_achieved
        );
        let card = |h: &mut String, label: &str, v: String, class: &str| {
            let _ = write!(h, "<div class='card {class}'><b>{v}</b>{label}</div>");
        };
        h.push_str("<div class=cards>");
        card(&mut h, "e2e p99 (ms)", ms(self.e2e.p99_us), "");
        card(&mut h, "e2e p50 (ms)", ms(self.e2e.p50_us), "");
        if let Some(out) = &self.e2e_outside_broker_pauses {
            card(&mut h, "e2e p99 outside broker pauses (ms)", ms(out.p99_us), "");
        }
        if let Some(m) = self.second_p99_median_us {
            card(&mut h, "median per-second p99 (ms)", ms(m), "");
        }
        if let Some(b) = &self.broker_pauses {
            card(&mut h, "seconds marked as broker pauses", b.marked_seconds.to_string(), "");
        }
        if let Some(steal) = self.machine_steal_pct {
            card(&mut h, "CPU stolen by the hypervisor", format!("{steal:.1} %"), "");
        }
        card(&mut h, "sent", self.sent.to_string(), "");
        card(&mut h, "decided", self.decided.to_string(), "");
        card(&mut h, "dlq", self.dlq.to_string(), "");
        for (label, v) in [("lost", self.lost), ("duplicates", self.duplicates), ("order violations", self.order_violations)] {
            card(&mut h, label, v.to_string(), if v == 0 { "ok" } else { "bad" });
        }
        h.push_str("</div>");
        if let Some(g) = &self.graph {
            let p99 = |stage: &str| {
                self.stages.iter().find(|s| s.name == stage).map_or_else(String::new, |s| {
                    let l = if s.stage.count > 0 { &s.stage } else { &s.process };
                    format!("p99 {} ms", ms(l.p99_us))
                })
            };
            let _ = write!(h, "<h2>Graph (stage latency p99)</h2><div class=plot>{}</div>", g.svg(&p99));
        }
        h.push_str("<h2>Latency by percentile</h2><div class=plots>");
        let e2e: Vec<_> = histograms.iter().filter(|(n, _)| n == "e2e" || n == E2E_OUTSIDE_BROKER_PAUSES || n.ends_with(".stage") || (n.ends_with(".process") && !histograms.iter().any(|(m, _)| m == &n.replace(".process", ".stage")))).collect();
        h.push_str(&plot("End to end and per stage", &e2e));
        for st in &self.stages {
            let own: Vec<_> = histograms.iter().filter(|(n, _)| n.starts_with(&format!("{}.", st.name))).collect();
            h.push_str(&plot(&format!("Stage {}", st.name), &own));
        }
        h.push_str("</div><h2>Per stage (ms)</h2><table><tr><th>stage</th><th>latency</th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>budget</th></tr>");
        let row = |h: &mut String, a: &str, b: &str, s: &LatencySummary, budget: String, breach: bool| {
            if s.count > 0 {
                let cls = if breach { " class=breach" } else { "" };
                let _ = write!(h, "<tr><td>{}</td><td>{b}</td><td>{}</td><td>{}</td><td>{}</td><td{cls}>{}</td><td>{}</td><td>{}</td><td>{budget}</td></tr>", esc(a), s.count, ms(s.p50_us), ms(s.p90_us), ms(s.p99_us), ms(s.p999_us), ms(s.max_us));
            }
        };
        for st in &self.stages {
            let budget = st.budget_ms.map(|b| format!("{b}")).unwrap_or_default();
            row(&mut h, &st.name, "queue", &st.queue, String::new(), false);
            row(&mut h, "", "service", &st.service, String::new(), false);
            row(&mut h, "", "stage", &st.stage, budget.clone(), st.budget_breached);
            row(&mut h, "", "process", &st.process, if st.stage.count == 0 { budget } else { String::new() }, st.budget_breached && st.stage.count == 0);
        }
        row(&mut h, "e2e", "", &self.e2e, String::new(), false);
        let d = &self.decisions;
        let heads: String = d.0.iter().map(|(k, _)| format!("<th>{}</th>", esc(k))).collect();
        let cells: String = d.0.iter().map(|(_, n)| format!("<td>{n}</td>")).collect();
        let _ = write!(h, "</table><h2>Decisions</h2><table><tr>{heads}</tr><tr>{cells}</tr></table>");
        self.render_seconds_html(&mut h);
        if !self.top_rule_hits.is_empty() {
            let max = self.top_rule_hits.iter().map(|r| r.count).max().unwrap_or(1).max(1);
            h.push_str("<h2>Top rule hits</h2><table><tr><th>rule</th><th>decisions</th><th></th></tr>");
            for r in &self.top_rule_hits {
                let w = 300 * r.count / max;
                let _ = write!(h, "<tr><td>{}</td><td>{}</td><td><svg width=300 height=10><rect width={w} height=10 fill='#5b8def'/></svg></td></tr>", esc(&r.rule), r.count);
            }
            h.push_str("</table>");
        }
        let machine = self.machine_cpu.as_deref().map_or(String::new(), |m| format!(" · machine: {}", esc(m)));
        let _ = write!(h, "<p class=sub>peak RSS {} MiB · sender max behind schedule {:.3} ms{machine} · files: report.json, *.hgrm</p></body></html>", self.peak_rss_mib.map(|r| r.to_string()).unwrap_or("?".into()), self.sender_max_behind_ms);
        h
    }
}

impl RunReport {
    /// The per-second p99 as a line over the run (marked seconds shaded), then the
    /// seconds the terminal report lists.
    fn render_seconds_html(&self, h: &mut String) {
        if self.seconds.is_empty() {
            return;
        }
        let (w, hgt, l, t, b) = (1060.0, 160.0, 56.0, 10.0, 24.0);
        let n = self.seconds.len() as f64;
        let ymax = self.seconds.iter().map(|s| s.p99_us).max().unwrap_or(1).max(1) as f64 / 1000.0 * 1.08;
        let x = |i: usize| l + (w - l - 8.0) * i as f64 / n;
        let y = |us: u64| t + (hgt - t - b) * (1.0 - (us as f64 / 1000.0 / ymax).min(1.0));
        let _ = write!(h, "<h2>e2e p99 per second (ms)</h2><div class=plot><svg viewBox='0 0 {w} {hgt}' width='100%' role=img aria-label='e2e p99 per second'>");
        for (i, s) in self.seconds.iter().enumerate().filter(|(_, s)| s.broker_paused || s.p99_us == 0) {
            let (fill, what) = if s.broker_paused { ("#f5c6c0", format!("broker stopped {:.1} ms", s.broker_paused_ms.unwrap_or_default())) } else { ("#dfe3ea", "nothing seen".to_string()) };
            let _ = write!(h, "<rect x={:.1} y={t} width={:.1} height={} fill='{fill}'><title>t {} s: {what}</title></rect>", x(i), (x(i + 1) - x(i)).max(1.0), hgt - t - b, s.t_s);
        }
        // Seconds with nothing seen have no p99: left out of the line, not drawn as 0.
        let pts: String = self.seconds.iter().enumerate().filter(|(_, s)| s.p99_us > 0).map(|(i, s)| format!("{:.1},{:.1} ", (x(i) + x(i + 1)) / 2.0, y(s.p99_us))).collect();
        let _ = write!(h, "<polyline fill=none stroke='#1d2330' stroke-width=1.4 points='{pts}'/>");
        for i in 0..=3 {
            let v = ymax * i as f64 / 3.0;
            let yy = y((v * 1000.0) as u64);
            let _ = write!(h, "<text x={} y={} font-size=10 text-anchor=end fill='#5b6475'>{v:.1}</text>", l - 6.0, yy + 3.0);
        }
        let _ = write!(h, "<text x={l} y={} font-size=10 fill='#5b6475'>t = 0 … {} s; shaded: seconds marked as broker pauses (red), with nothing seen (grey)</text></svg></div>", hgt - 6.0, self.seconds.last().map_or(0, |s| s.t_s));
        if self.notable_seconds().next().is_none() {
            return;
        }
        let _ = write!(h, "<h2>Seconds marked, with p99 over {} ms, or with nothing seen</h2><table><tr><th>t s</th><th>UTC</th><th>decided</th><th>p50</th><th>p99</th><th>max</th><th>broker stopped ms</th><th>steal %</th></tr>", ms(SLOW_SECOND_P99_US));
        for s in self.notable_seconds().take(LISTED_SECONDS) {
            let cls = if s.broker_paused { " class=breach" } else { "" };
            let paused = s.broker_paused_ms.map_or("-".into(), |p| format!("{p:.1}"));
            let steal = s.steal_pct.map_or("-".into(), |p| format!("{p:.1}"));
            let _ = write!(h, "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{cls}>{paused}</td><td>{steal}</td></tr>", s.t_s, clock(s.unix_s), s.decided, ms(s.p50_us), ms(s.p99_us), ms(s.max_us));
        }
        let more = self.notable_seconds().count().saturating_sub(LISTED_SECONDS);
        if more > 0 {
            let _ = write!(h, "<tr><td colspan=8>… and {more} more in report.json</td></tr>");
        }
        h.push_str("</table>");
    }
}

/// `13:03:18`: the UTC time of day of a unix second.
fn clock(unix_s: i64) -> String {
    let t = actio_core::time::format_rfc3339_ns(unix_s.saturating_mul(actio_core::time::NS_PER_S));
    t.get(11..19).unwrap_or(&t).to_string()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&#39;")
}

const COLORS: [&str; 8] = ["#1d2330", "#5b8def", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"];

/// An SVG latency-by-percentile plot, percentile axis log-scaled as HdrHistogram's
/// plotter does (x = log10(1/(1-p))), latency in ms.
fn plot(title: &str, series: &[&(String, Histogram<u64>)]) -> String {
    let (w, hgt, l, r, t, b) = (520.0, 300.0, 56.0, 12.0, 28.0, 40.0);
    let xmax = 5.0; // 99.999%
    let ymax = series.iter().map(|(_, h)| h.value_at_quantile(0.99999)).max().unwrap_or(1).max(1) as f64 / 1000.0 * 1.08;
    let x = |q: f64| l + (w - l - r) * ((1.0 / (1.0 - q.min(0.999_999))).log10() / xmax).min(1.0);
    let y = |v: f64| t + (hgt - t - b) * (1.0 - (v / ymax).min(1.0));
    let mut s = format!("<div class=plot><svg viewBox='0 0 {w} {hgt}' width='100%' role=img aria-label='{}'>", esc(title));
    let _ = write!(s, "<text x={l} y=16 font-size=13 font-weight=600>{}</text>", esc(title));
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"].iter().enumerate() {
        let xx = l + (w - l - r) * i as f64 / xmax;
        let _ = write!(s, "<line x1={xx} x2={xx} y1={t} y2={} stroke='#eef0f5'/><text x={xx} y={} font-size=10 text-anchor=middle fill='#5b6475'>{label}</text>", hgt - b, hgt - b + 14.0);
    }
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let yy = y(v);
        let _ = write!(s, "<line x1={l} x2={} y1={yy} y2={yy} stroke='#eef0f5'/><text x={} y={} font-size=10 text-anchor=end fill='#5b6475'>{v:.2}</text>", w - r, l - 6.0, yy + 3.0);
    }
    let _ = write!(s, "<text x={} y={} font-size=10 fill='#5b6475' text-anchor=middle>percentile</text><text x=12 y={} font-size=10 fill='#5b6475' transform='rotate(-90 12 {})' text-anchor=middle>latency (ms)</text>", (l + w) / 2.0, hgt - 6.0, (t + hgt - b) / 2.0, (t + hgt - b) / 2.0);
    for (i, (name, h)) in series.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        let mut pts = String::new();
        for v in h.iter_quantiles(8) {
            let _ = write!(pts, "{:.1},{:.1} ", x(v.quantile_iterated_to()), y(v.value_iterated_to() as f64 / 1000.0));
        }
        let c = COLORS[i % COLORS.len()];
        let _ = write!(s, "<polyline fill=none stroke='{c}' stroke-width=1.8 points='{pts}'/>");
        let ly = t + 4.0 + 14.0 * i as f64;
        let _ = write!(s, "<rect x={} y={} width=10 height=3 fill='{c}'/><text x={} y={} font-size=11>{} (p99 {} ms)</text>", l + 10.0, ly, l + 24.0, ly + 4.0, esc(name), ms(h.value_at_quantile(0.99)));
    }
    s.push_str("</svg></div>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = latency_histogram();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    fn report() -> (RunReport, Vec<(String, Histogram<u64>)>) {
        let e2e = hist(1..=10_000);
        let st = StageHistograms { name: "rules".into(), queue: hist([10, 20]), service: hist([5, 6]), stage: hist([9000, 9000]), budget_ms: Some(5.0) };
        let stage = StageReport::new("rules", Some(&st), None, st.budget_ms);
        let r = RunReport {
            pipeline: "fraud".into(),
            bus: "embedded".into(),
            run_id: "r1".into(),
            rate_target: 100.0,
            rate_achieved: 99.0,
            duration_s: 1.0,
            sent: 10,
            decided: 9,
            dlq: 1,
            lost: 0,
            duplicates: 0,
            order_violations: 0,
            retried: 0,
            reordered_by_retry: 0,
            decisions: DecisionCounts(vec![("approve".into(), 8), ("review".into(), 1), ("decline".into(), 0)]),
            top_rule_hits: vec![RuleHitCount { rule: "small_amount_burst".into(), count: 3 }],
            e2e: LatencySummary::of(&e2e),
            stages: vec![stage],
            sender_max_behind_ms: 0.0,
            peak_rss_mib: peak_rss_mib(),
            send_failures: 0,
            e2e_outside_broker_pauses: None,
            second_p99_median_us: None,
            machine_steal_pct: None,
            machine_cpu: None,
            broker_pauses: None,
            seconds: Vec::new(),
            graph: None,
            by_egress: std::collections::BTreeMap::new(),
            by_version: std::collections::BTreeMap::new(),
            version_flips_back: 0,
            version_switches: std::collections::BTreeMap::new(),
            cpu: None,
            counters: std::collections::BTreeMap::new(),
        };
        (r, vec![("e2e".into(), e2e), ("rules.queue".into(), st.queue), ("rules.service".into(), st.service), ("rules.stage".into(), st.stage)])
    }

    /// `report()` with 30 seconds: t 1 empty, 3 and 4 marked, 5..=29 over 35 ms.
    fn report_with_seconds() -> RunReport {
        let (mut r, _) = report();
        r.bus = "kafka".into();
        r.seconds = (0..30)
            .map(|t| SecondReport { unix_s: 1_796_000_000 + t, t_s: t, decided: 100, p50_us: 2_000, p99_us: if t >= 5 { 40_000 } else { 9_000 }, max_us: 50_000, broker_paused_ms: Some(if (3..5).contains(&t) { 25.0 } else { 0.1 }), broker_paused: (3..5).contains(&t), steal_pct: None })
            .collect();
        // Nothing came out in t 1.
        (r.seconds[1].decided, r.seconds[1].p50_us, r.seconds[1].p99_us, r.seconds[1].max_us) = (0, 0, 0, 0);
        r.e2e_outside_broker_pauses = Some(LatencySummary { p99_us: 8_000, ..r.e2e });
        r.second_p99_median_us = Some(40_000);
        r.broker_pauses = Some(BrokerPauseReport { gc_log: "/x/gc.log".into(), log_covers_load_start: true, mark_threshold_ms: 10.0, pauses: 7, paused_ms: 53.0, longest_ms: 25.0, marked_seconds: 2 });
        r
    }

    #[test]
    fn stage_counters_are_listed_per_service_and_kept_in_json() {
        let (mut r, _) = report();
        assert!(!r.render_text().contains("stage counters"), "none: no line");
        let c = |name: &str, labels: &[(&str, &str)], value| KindCounter { name: name.into(), labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), value };
        r.counters.insert("risk".into(), vec![c("actio_enrich_continued_total", &[], 59_980), c("actio_enrich_breaker_opened_total", &[], 12)]);
        let mut rules: Vec<KindCounter> = (0..8).map(|i| c("actio_rule_errors_total", &[("rule", &format!("r{i}"))], 1)).collect();
        rules.insert(0, c("actio_rule_hits_total", &[("rule", "r0")], 5));
        r.counters.insert("rules".into(), rules);
        let text = r.render_text();
        assert!(text.contains("stage counters: risk: actio_enrich_continued_total 59980, actio_enrich_breaker_opened_total 12; rules: actio_rule_errors_total{rule=\"r0\"} 1"), "{text}");
        assert!(text.contains("… 2 more in report.json"), "{text}");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["counters"]["risk"][0], serde_json::json!({"name": "actio_enrich_continued_total", "value": 59980}));
        assert_eq!(v["counters"]["rules"][8]["labels"]["rule"], "r7");
        assert!(!text.contains("actio_rule_hits_total"), "rule hits have their own line: {text}");
    }

    #[test]
    fn the_machines_steal_is_reported_overall_and_per_listed_second() {
        let mut r = report_with_seconds();
        r.machine_steal_pct = Some(7.8);
        r.seconds[3].steal_pct = Some(21.5);
        let text = r.render_text();
        assert!(text.contains("machine: 7.8% of its CPU time stolen by the hypervisor during the load"), "{text}");
        assert!(text.contains("max ms  broker ms steal %"), "{text}");
        assert!(text.contains("    50.000       25.0    21.5  ← broker paused"), "{text}");
        assert!(text.contains("    50.000       25.0       -  ← broker paused"), "a second not sampled: {text}");
        let html = r.render_html(&[]);
        assert!(html.contains("CPU stolen by the hypervisor") && html.contains("<td>21.5</td>"), "{html}");
        assert_eq!(serde_json::to_value(&r).unwrap()["seconds"][3]["steal_pct"], 21.5);
        let (plain, _) = report();
        assert!(!plain.render_text().contains("machine:"), "not sampled: not claimed");
        r.machine_cpu = Some("2 × AMD EPYC 7B13".into());
        assert!(r.render_text().contains("machine: 2 × AMD EPYC 7B13; 7.8% of its CPU time stolen"), "{}", r.render_text());
    }

    #[test]
    fn marked_and_slow_seconds_are_listed_capped_beside_the_overall_p99() {
        let r = report_with_seconds();
        let text = r.render_text();
        assert!(text.contains("e2e p99 9.903 ms; outside the 2 s marked as broker pauses 8.000 ms; median of the 29 per-second p99s 40.000 ms"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("e2e ")), "the overall e2e row stays: {text}");
        assert!(text.contains("seconds marked, with p99 over 35.000 ms, or with nothing seen (28 of 30):"), "{text}");
        assert!(text.contains("     1  00:53:21         0     0.000     0.000     0.000        0.1  ← nothing seen"), "{text}");
        assert_eq!(text.matches("← broker paused").count(), 2, "{text}");
        let listed = text.lines().skip_while(|l| !l.starts_with("seconds marked")).skip(2).take_while(|l| !l.trim().is_empty() && !l.starts_with("  …")).count();
        assert_eq!(listed, 20, "{text}");
        assert!(text.contains("… and 8 more"), "{text}");
        assert!(text.contains("     3  00:53:23       100     2.000     9.000    50.000       25.0  ← broker paused"), "{text}");
        let html = r.render_html(&[]);
        assert_eq!(html.matches("fill='#f5c6c0'").count(), 2, "marked seconds shaded");
        assert!(html.contains("… and 8 more in report.json"));
        assert_eq!(html.matches("fill='#dfe3ea'").count(), 1, "the second with nothing seen shaded");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!((v["seconds"].as_array().unwrap().len(), &v["seconds"][3]["broker_paused"], &v["broker_pauses"]["marked_seconds"]), (30, &serde_json::json!(true), &serde_json::json!(2)));
        assert_eq!(v["e2e_outside_broker_pauses"]["p99_us"], 8_000);
    }

    #[test]
    fn the_html_draws_the_graph_with_each_stages_p99() {
        let mut r = report_with_seconds();
        assert!(!r.render_html(&[]).contains("<h2>Graph"), "no graph, no drawing");
        let e = |a: &str, b: &str, t: &str| (a.to_string(), b.to_string(), t.to_string());
        r.graph = Some(StageGraph {
            stages: vec![("a".into(), "rules".into()), ("b".into(), "velocity".into()), ("j".into(), "join".into())],
            edges: vec![e("in", "a", "in"), e("in", "b", "in"), e("a", "j", "mid"), e("b", "j", "mid"), e("j", "out", "out")],
            sources: vec!["in".into()],
            sinks: vec!["out".into()],
        });
        r.stages = vec![StageReport::new("j", None, None, None)];
        r.stages[0].process.p99_us = 1_500;
        let cols = r.graph.as_ref().unwrap().columns();
        assert_eq!(cols.iter().map(|(n, d)| (n.as_str(), *d)).collect::<Vec<_>>(), [("in", 0), ("a", 1), ("b", 1), ("j", 2), ("out", 3)], "branches side by side");
        let html = r.render_html(&[]);
        let svg = &html[html.find("<h2>Graph").unwrap()..];
        assert_eq!(svg[..svg.find("</svg>").unwrap()].matches("<line").count(), 5, "an arrow per edge");
        assert!(svg.contains(">join · p99 1.500 ms<"), "{svg}");
        assert_eq!(serde_json::to_value(&r).unwrap()["graph"]["edges"][2], serde_json::json!(["a", "j", "mid"]));
    }

    #[test]
    fn without_a_gc_log_the_text_says_pauses_are_unknown() {
        let mut r = report_with_seconds();
        (r.broker_pauses, r.e2e_outside_broker_pauses) = (None, None);
        for s in &mut r.seconds {
            (s.broker_paused, s.broker_paused_ms) = (false, None);
        }
        let text = r.render_text();
        assert!(text.contains("broker pauses unknown (no --broker-gc-log)"), "{text}");
        assert!(!text.contains("unpaused") && !text.contains("← broker paused"), "{text}");
        r.bus = "embedded".into();
        assert!(!r.render_text().contains("broker"), "no broker to speak of");
    }

    #[test]
    fn summaries_match_known_data() {
        let s = LatencySummary::of(&hist(1..=10_000));
        assert_eq!(s.count, 10_000);
        assert!((4990..=5010).contains(&s.p50_us), "{s:?}");
        assert!((9890..=9910).contains(&s.p99_us), "{s:?}");
        assert!((9980..=10_010).contains(&s.max_us), "{s:?}");
    }

    #[test]
    fn budget_flag_follows_the_stage_p99() {
        let (r, _) = report();
        assert!(r.stages[0].budget_breached, "p99 9 ms > 5 ms budget");
        let fine = StageReport::new("x", None, Some((&hist([1]), &hist([100]))), Some(5.0));
        assert!(!fine.budget_breached);
    }

    #[test]
    fn report_json_has_the_promised_fields() {
        let (r, _) = report();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for k in ["sent", "decided", "dlq", "lost", "duplicates", "order_violations", "e2e", "stages"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert!(v["e2e"].get(k).is_some(), "e2e missing {k}");
            for part in ["queue", "service", "stage"] {
                assert!(v["stages"]["rules"][part].get(k).is_some(), "stages.rules.{part} missing {k}");
            }
        }
    }

    #[test]
    fn hgrm_is_the_standard_format() {
        let h = hist(1..=1000);
        let text = hgrm(&h);
        let rows: Vec<(f64, f64, u64)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.trim().chars().next().is_some_and(|c| c.is_ascii_digit()))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect();
        assert!(rows.len() > 20);
        assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1 && w[0].2 <= w[1].2), "monotone");
        assert_eq!(rows.last().unwrap().2, 1000, "last row counts everything");
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("#[Max     =        1.000, Total count    =         1000]"), "{text}");
    }

    #[test]
    fn files_are_written_with_a_plot_per_histogram() {
        let (r, hs) = report();
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path(), &hs).unwrap();
        for f in ["report.json", "report.html", "e2e.hgrm", "rules.queue.hgrm", "rules.service.hgrm", "rules.stage.hgrm"] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
        assert_eq!(html.matches("<polyline").count(), 2 + 3, "e2e+rules.stage overview, then rules' own three");
        assert!(html.contains("class=breach"));
        assert!(!html.contains("http://") && !html.contains("https://"), "self-contained");
        assert!(r.render_text().contains("← p99 over budget 5 ms"));
    }
}

//! What a run measured, as the planner needs it: the rate, the end-to-end latency's
//! distribution and where the CPU went. Read from a run's output directory
//! (`report.json`, and `e2e.hgrm` for the full distribution), whoever made it: `actio
//! run`, `actio loadgen`, or `actio plan`'s own calibration runs.

use std::path::{Path, PathBuf};

use actio_loadgen::report::CpuReport;
use serde::Deserialize;

use crate::PlanError;

/// One run, as measured.
#[derive(Debug, Clone)]
pub struct Run {
    /// Its output directory.
    pub dir: PathBuf,
    /// Pipeline name.
    pub pipeline: String,
    /// `embedded` or `kafka`.
    pub bus: String,
    /// Transactions decided per second.
    pub rate: f64,
    /// End-to-end latency's distribution.
    pub e2e: Quantiles,
    /// Where the CPU went.
    pub cpu: CpuReport,
}

impl Run {
    /// The services that ran, in chain order: the run's shape.
    pub fn shape(&self) -> Vec<String> {
        self.cpu.services.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Reads the run in `dir` (or the directory of `dir` if it names `report.json`).
    pub fn load(dir: &Path) -> Result<Run, PlanError> {
        let dir = if dir.is_file() { dir.parent().unwrap_or(Path::new(".")).to_path_buf() } else { dir.to_path_buf() };
        let path = dir.join("report.json");
        let bad = |message: String| PlanError::Report { path: path.clone(), message };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let view: ReportView = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let cpu = view.cpu.ok_or_else(|| bad("field `cpu` is null: the run could not read per-thread CPU times (Linux's /proc/<pid>/task/<tid>/schedstat)".into()))?;
        if cpu.services.is_empty() {
            return Err(bad("field `cpu.services` is empty: the stages ran elsewhere (actio loadgen); plan needs a run with its stages in-process (actio run)".into()));
        }
        if view.lost > 0 {
            return Err(bad(format!("the run lost {} transactions; a plan cannot be calibrated on a failed run", view.lost)));
        }
        if view.e2e.count == 0 || view.rate_achieved <= 0.0 {
            return Err(bad("the run decided nothing".into()));
        }
        let hgrm = dir.join("e2e.hgrm");
        let e2e = match std::fs::read_to_string(&hgrm) {
            Ok(t) => Quantiles::from_hgrm(&t).map_err(|message| PlanError::Report { path: hgrm.clone(), message })?,
            Err(_) => Quantiles::from_summary(&view.e2e),
        };
        Ok(Run { dir, pipeline: view.pipeline, bus: view.bus, rate: view.rate_achieved, e2e, cpu })
    }
}

/// The part of `report.json` the planner reads (other fields are ignored: a report
/// is output, and grows).
#[derive(Debug, Deserialize)]
struct ReportView {
    pipeline: String,
    bus: String,
    rate_achieved: f64,
    lost: u64,
    e2e: Summary,
    cpu: Option<CpuReport>,
}

#[derive(Debug, Deserialize)]
struct Summary {
    count: u64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

/// A latency distribution as its quantile function: `(quantile, µs)` points,
/// increasing in both, from quantile 0 to 1; read between them linearly.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantiles(Vec<(f64, f64)>);

impl Quantiles {
    /// From points `(quantile, µs)`; sorted, made monotone, ends pinned at 0 and 1.
    pub fn new(mut points: Vec<(f64, f64)>) -> Self {
        points.retain(|(q, v)| q.is_finite() && v.is_finite());
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut max = 0.0f64;
        for p in &mut points {
            max = max.max(p.1);
            p.1 = max;
        }
        if points.first().is_none_or(|p| p.0 > 0.0) {
            let v = points.first().map(|p| p.1).unwrap_or(0.0);
            points.insert(0, (0.0, v));
        }
        if points.last().is_some_and(|p| p.0 < 1.0) {
            let v = points.last().map(|p| p.1).unwrap_or(0.0);
            points.push((1.0, v));
        }
        Quantiles(points)
    }

    /// From the percentile text of an `.hgrm` file (values in ms).
    pub fn from_hgrm(text: &str) -> Result<Self, String> {
        let mut points = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 || line.trim_start().starts_with('#') {
                continue;
            }
            let (Ok(ms), Ok(q)) = (f[0].parse::<f64>(), f[1].parse::<f64>()) else { continue };
            points.push((q, ms * 1000.0));
        }
        if points.len() < 2 {
            return Err("no percentile lines (Value Percentile TotalCount)".into());
        }
        Ok(Quantiles::new(points))
    }

    fn from_summary(s: &Summary) -> Self {
        Quantiles::new(vec![(0.0, 0.0), (0.5, s.p50_us), (0.9, s.p90_us), (0.99, s.p99_us), (0.999, s.p999_us), (1.0, s.max_us)])
    }

    /// At each quantile the lower of `self` and `other`: the light-load latency of
    /// several runs, so that one run's stall (a broker pause, a VM hiccup) does not
    /// become the base every prediction starts from.
    pub fn lower_with(&self, other: &Quantiles) -> Quantiles {
        let mut qs: Vec<f64> = self.0.iter().chain(&other.0).map(|p| p.0).collect();
        qs.sort_by(f64::total_cmp);
        qs.dedup();
        Quantiles::new(qs.into_iter().map(|q| (q, self.at(q).min(other.at(q)))).collect())
    }

    /// The value at quantile `q` (0..=1), µs.
    pub fn at(&self, q: f64) -> f64 {
        let i = self.0.partition_point(|p| p.0 < q);
        match (i.checked_sub(1).and_then(|j| self.0.get(j)), self.0.get(i)) {
            (Some(a), Some(b)) if b.0 > a.0 => a.1 + (b.1 - a.1) * (q - a.0) / (b.0 - a.0),
            (_, Some(b)) => b.1,
            (Some(a), None) => a.1,
            (None, None) => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_and_read_hgrm() {
        let q = Quantiles::new(vec![(0.5, 100.0), (0.99, 1000.0)]);
        assert_eq!((q.at(0.0), q.at(0.5), q.at(1.0)), (100.0, 100.0, 1000.0));
        assert!((q.at(0.745) - 550.0).abs() < 1e-9);
        let text = "       Value     Percentile TotalCount 1/(1-Percentile)\n\n       0.100 0.000000000000          1           1.00\n       0.200 0.500000000000         50           2.00\n       2.000 0.990000000000         99         100.00\n       5.000 1.000000000000        100\n#[Mean    =        0.353, StdDeviation   =        1.215]\n";
        let h = Quantiles::from_hgrm(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((h.at(0.0), h.at(0.5), h.at(0.99), h.at(1.0)), (100.0, 200.0, 2000.0, 5000.0));
        assert!(Quantiles::from_hgrm("nothing here").is_err());
        // The lower of two: a stall in one run's tail does not survive.
        let stalled = Quantiles::new(vec![(0.0, 100.0), (0.5, 150.0), (0.99, 300_000.0), (1.0, 400_000.0)]);
        let calm = Quantiles::new(vec![(0.0, 120.0), (0.5, 200.0), (0.99, 2_000.0), (1.0, 5_000.0)]);
        let low = stalled.lower_with(&calm);
        assert_eq!((low.at(0.0), low.at(0.5), low.at(0.99), low.at(1.0)), (100.0, 150.0, 2_000.0, 5_000.0));
    }

    #[test]
    fn a_report_without_cpu_is_refused_with_the_field() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("report.json"), r#"{"pipeline":"p","bus":"embedded","rate_achieved":10.0,"lost":0,"e2e":{"count":1,"p50_us":1,"p90_us":1,"p99_us":1,"p999_us":1,"max_us":1,"mean_us":1},"cpu":null}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let e = Run::load(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("report.json") && e.contains("`cpu`"), "{e}");
    }
}

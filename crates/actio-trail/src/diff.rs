//! What changed between two evaluations of the same transactions: the recorded
//! decisions (a live run's trail) against a replay's (`actio replay`), matched by
//! transaction id.
//!
//! A transaction *differs* when its outcome, its set of rule hits (active or shadow),
//! its score or any feature differs; an unchanged pipeline replayed over its own
//! traffic gives zero. The summary says where the change is: outcome transitions,
//! per-rule hit deltas, the score's distribution before and after, and the
//! transactions whose outcome moved most, each with the rules it gained and lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::TrailRecord;

/// Scores closer than this are the same score (a replay recomputes them).
const SCORE_EPSILON: f64 = 1e-9;

/// The diff of two record sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Diff {
    /// Transactions in both sets.
    pub compared: u64,
    /// Of those, how many differ at all (outcome, hits, score or features).
    pub differing: u64,
    /// Of those, how many changed outcome.
    pub outcome_changed: u64,
    /// … whose rule hits changed.
    pub hits_changed: u64,
    /// … whose score changed.
    pub score_changed: u64,
    /// … whose features changed.
    pub features_changed: u64,
    /// Transactions only the recorded set has (the replay did not decide them).
    pub only_recorded: u64,
    /// Transactions only the replay has (the record did not have them).
    pub only_replayed: u64,
    /// Outcome transitions `from → to` with their counts, unchanged ones included.
    pub transitions: Vec<Transition>,
    /// Per rule and mode, hits before and after, the largest change first.
    pub rules: Vec<RuleDelta>,
    /// The score's distribution before and after.
    pub score: ScoreShift,
    /// The transactions whose outcome changed, the largest score move first.
    pub top: Vec<Changed>,
}

/// One outcome transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// Recorded outcome (`dead_letter` for a dead-lettered transaction).
    pub from: String,
    /// Replayed outcome.
    pub to: String,
    /// How many.
    pub count: u64,
}

/// One rule's hits before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleDelta {
    /// The rule.
    pub rule: String,
    /// A shadow rule (its hits change no decision).
    pub shadow: bool,
    /// Hits in the recorded set (of the compared transactions).
    pub before: u64,
    /// Hits in the replay.
    pub after: u64,
}

/// Quantiles of the score before and after.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScoreShift {
    /// Mean, p50, p90, p99 of the recorded scores.
    pub before: Quantiles,
    /// The same of the replayed ones.
    pub after: Quantiles,
}

/// A score distribution's summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Quantiles {
    /// Scored transactions.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// A transaction whose outcome changed, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Changed {
    /// Its id.
    pub tx_id: String,
    /// Its key.
    pub key: String,
    /// Recorded outcome.
    pub from: String,
    /// Replayed outcome.
    pub to: String,
    /// Recorded score.
    pub score_before: Option<f64>,
    /// Replayed score.
    pub score_after: Option<f64>,
    /// Rules that fire now and did not.
    pub rules_gained: Vec<String>,
    /// Rules that fired and do not now.
    pub rules_lost: Vec<String>,
    /// Features whose value changed: (name, before, after), at most five.
    pub features: Vec<(String, f64, f64)>,
}

fn outcome(r: &TrailRecord) -> String {
    r.outcome.clone().unwrap_or_else(|| "dead_letter".into())
}

fn hit_set(r: &TrailRecord) -> BTreeSet<(&str, bool)> {
    r.hits.iter().map(|h| (h.rule.as_str(), h.shadow)).collect()
}

fn same_score(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= SCORE_EPSILON,
        (None, None) => true,
        _ => false,
    }
}

fn changed_features(a: &TrailRecord, b: &TrailRecord) -> Vec<(String, f64, f64)> {
    let after: HashMap<&str, f64> = b.features.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let mut out: Vec<(String, f64, f64)> = Vec::new();
    for (name, v) in &a.features {
        match after.get(name.as_str()) {
            Some(w) if (v - w).abs() <= SCORE_EPSILON || (v.is_nan() && w.is_nan()) => {}
            Some(w) => out.push((name.clone(), *v, *w)),
            None => out.push((name.clone(), *v, f64::NAN)),
        }
    }
    let before: BTreeSet<&str> = a.features.iter().map(|(n, _)| n.as_str()).collect();
    for (name, w) in &b.features {
        if !before.contains(name.as_str()) {
            out.push((name.clone(), f64::NAN, *w));
        }
    }
    out
}

fn quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Quantiles { count: v.len() as u64, mean: v.iter().sum::<f64>() / v.len() as f64, p50: at(0.5), p90: at(0.9), p99: at(0.99) }
}

/// Compares `replayed` with `recorded` (both keyed by transaction id), keeping at
/// most `top_n` changed transactions.
pub fn diff(recorded: &HashMap<String, TrailRecord>, replayed: &HashMap<String, TrailRecord>, top_n: usize) -> Diff {
    let mut d = Diff::default();
    let mut transitions: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut rules: BTreeMap<(String, bool), (u64, u64)> = BTreeMap::new();
    let (mut before_scores, mut after_scores) = (Vec::new(), Vec::new());
    let mut top: Vec<Changed> = Vec::new();
    for (id, a) in recorded {
        let Some(b) = replayed.get(id) else {
            d.only_recorded += 1;
            continue;
        };
        d.compared += 1;
        let (from, to) = (outcome(a), outcome(b));
        *transitions.entry((from.clone(), to.clone())).or_default() += 1;
        let (ha, hb) = (hit_set(a), hit_set(b));
        for (rule, shadow) in &ha {
            rules.entry((rule.to_string(), *shadow)).or_default().0 += 1;
        }
        for (rule, shadow) in &hb {
            rules.entry((rule.to_string(), *shadow)).or_default().1 += 1;
        }
        before_scores.extend(a.score);
        after_scores.extend(b.score);
        let features = changed_features(a, b);
        let (o, h, s, f) = (from != to, ha != hb, !same_score(a.score, b.score), !features.is_empty());
        d.outcome_changed += u64::from(o);
        d.hits_changed += u64::from(h);
        d.score_changed += u64::from(s);
        d.features_changed += u64::from(f);
        d.differing += u64::from(o || h || s || f);
        if o {
            top.push(Changed {
                tx_id: id.clone(),
                key: a.key.clone(),
                from,
                to,
                score_before: a.score,
                score_after: b.score,
                rules_gained: hb.difference(&ha).map(|(r, _)| r.to_string()).collect(),
                rules_lost: ha.difference(&hb).map(|(r, _)| r.to_string()).collect(),
                features: features.into_iter().take(5).collect(),
            });
        }
    }
    d.only_replayed = replayed.keys().filter(|id| !recorded.contains_key(*id)).count() as u64;
    let moved = |c: &Changed| (c.score_after.unwrap_or(0.0) - c.score_before.unwrap_or(0.0)).abs();
    top.sort_by(|x, y| moved(y).total_cmp(&moved(x)).then_with(|| x.tx_id.cmp(&y.tx_id)));
    top.truncate(top_n);
    d.top = top;
    d.transitions = transitions.into_iter().map(|((from, to), count)| Transition { from, to, count }).collect();
    let mut rules: Vec<RuleDelta> = rules.into_iter().map(|((rule, shadow), (before, after))| RuleDelta { rule, shadow, before, after }).collect();
    rules.sort_by(|x, y| (y.after.abs_diff(y.before)).cmp(&x.after.abs_diff(x.before)).then_with(|| x.rule.cmp(&y.rule)));
    d.rules = rules;
    d.score = ScoreShift { before: quantiles(before_scores), after: quantiles(after_scores) };
    d
}

impl Diff {
    /// The outcome transitions that changed something, largest first.
    pub fn moved(&self) -> Vec<&Transition> {
        let mut v: Vec<&Transition> = self.transitions.iter().filter(|t| t.from != t.to).collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| (&a.from, &a.to).cmp(&(&b.from, &b.to))));
        v
    }

    /// A summary for a terminal.
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let pct = |n: u64| if self.compared == 0 { 0.0 } else { 100.0 * n as f64 / self.compared as f64 };
        let _ = writeln!(s, "compared {}  differing {} ({:.2}%)  outcome changed {} ({:.2}%)", self.compared, self.differing, pct(self.differing), self.outcome_changed, pct(self.outcome_changed));
        let _ = writeln!(s, "  hits changed {}  score changed {}  features changed {}", self.hits_changed, self.score_changed, self.features_changed);
        if self.only_recorded + self.only_replayed > 0 {
            let _ = writeln!(s, "  only in the record {}  only in the replay {} (not compared)", self.only_recorded, self.only_replayed);
        }
        let moved = self.moved();
        if moved.is_empty() {
            let _ = writeln!(s, "outcomes: no transitions");
        } else {
            let _ = writeln!(s, "outcomes:");
            for t in moved {
                let _ = writeln!(s, "  {:>10} → {:<10} {}", t.from, t.to, t.count);
            }
        }
        let rules: Vec<&RuleDelta> = self.rules.iter().filter(|r| r.before != r.after).collect();
        if !rules.is_empty() {
            let _ = writeln!(s, "rule hits (before → after):");
            for r in rules.iter().take(15) {
                let _ = writeln!(s, "  {:<28} {:>7} → {:<7} {:+}{}", r.rule, r.before, r.after, r.after as i64 - r.before as i64, if r.shadow { "  (shadow)" } else { "" });
            }
        }
        let (b, a) = (&self.score.before, &self.score.after);
        if b.count + a.count > 0 {
            let _ = writeln!(s, "score: mean {:.4} → {:.4}  p50 {:.4} → {:.4}  p90 {:.4} → {:.4}  p99 {:.4} → {:.4}", b.mean, a.mean, b.p50, a.p50, b.p90, a.p90, b.p99, a.p99);
        }
        if !self.top.is_empty() {
            let _ = writeln!(s, "changed transactions (largest score move first):");
            for c in &self.top {
                let score = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
                let _ = write!(s, "  {}  {} → {}  score {} → {}", c.tx_id, c.from, c.to, score(c.score_before), score(c.score_after));
                if !c.rules_gained.is_empty() {
                    let _ = write!(s, "  +{}", c.rules_gained.join(" +"));
                }
                if !c.rules_lost.is_empty() {
                    let _ = write!(s, "  -{}", c.rules_lost.join(" -"));
                }
                let _ = writeln!(s);
            }
        }
        s
    }

    /// A self-contained HTML page of the same.
    pub fn render_html(&self, title: &str) -> String {
        let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let mut rows = String::new();
        for t in &self.transitions {
            let style = if t.from != t.to { " class=\"moved\"" } else { "" };
            rows.push_str(&format!("<tr{style}><td>{}</td><td>{}</td><td>{}</td></tr>", esc(&t.from), esc(&t.to), t.count));
        }
        let mut rules = String::new();
        for r in &self.rules {
            let delta = r.after as i64 - r.before as i64;
            rules.push_str(&format!("<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{:+}</td></tr>", esc(&r.rule), if r.shadow { " (shadow)" } else { "" }, r.before, r.after, delta));
        }
        let mut top = String::new();
        for c in &self.top {
            let score = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
            top.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{} → {}</td><td>{} → {}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.tx_id),
                esc(&c.key),
                esc(&c.from),
                esc(&c.to),
                score(c.score_before),
                score(c.score_after),
                esc(&c.rules_gained.join(", ")),
                esc(&c.rules_lost.join(", "))
            ));
        }
        let (b, a) = (&self.score.before, &self.score.after);
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.moved{{background:#fde2c8}}</style></head><body>\
<h1>{t}</h1><p>compared {c}; differing {d}; outcome changed {o}; hits changed {h}; score changed {s}; features changed {f}; only in the record {r}; only in the replay {p}</p>\
<h2>Outcome transitions</h2><table><tr><th>recorded</th><th>replayed</th><th>transactions</th></tr>{rows}</table>\
<h2>Score</h2><table><tr><th></th><th>mean</th><th>p50</th><th>p90</th><th>p99</th></tr><tr><td>recorded</td><td>{bm:.4}</td><td>{b50:.4}</td><td>{b90:.4}</td><td>{b99:.4}</td></tr><tr><td>replayed</td><td>{am:.4}</td><td>{a50:.4}</td><td>{a90:.4}</td><td>{a99:.4}</td></tr></table>\
<h2>Rule hits</h2><table><tr><th>rule</th><th>recorded</th><th>replayed</th><th>change</th></tr>{rules}</table>\
<h2>Changed transactions</h2><table><tr><th>transaction</th><th>key</th><th>outcome</th><th>score</th><th>rules gained</th><th>rules lost</th></tr>{top}</table></body></html>\n",
            t = esc(title),
            c = self.compared,
            d = self.differing,
            o = self.outcome_changed,
            h = self.hits_changed,
            s = self.score_changed,
            f = self.features_changed,
            r = self.only_recorded,
            p = self.only_replayed,
            bm = b.mean,
            b50 = b.p50,
            b90 = b.p90,
            b99 = b.p99,
            am = a.mean,
            a50 = a.p50,
            a90 = a.p90,
            a99 = a.p99,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::Hit;

    fn rec(id: &str, outcome: &str, score: f64, hits: &[&str], velocity: f64) -> TrailRecord {
        TrailRecord {
            tx_id: id.into(),
            key: "k".into(),
            outcome: Some(outcome.into()),
            score: Some(score),
            rules_version: "rules@1".into(),
            model_version: "m".into(),
            created_at_ns: 0,
            recorded_at_ns: 0,
            hits: hits.iter().map(|r| Hit { rule: r.to_string(), shadow: false }).collect(),
            features: vec![("n".into(), velocity)],
            hops: vec![],
            retried: false,
            dead_letter: None,
        }
    }

    fn set(v: Vec<TrailRecord>) -> HashMap<String, TrailRecord> {
        v.into_iter().map(|r| (r.tx_id.clone(), r)).collect()
    }

    #[test]
    fn the_same_records_differ_in_nothing() {
        let a = set(vec![rec("1", "approve", 0.1, &[], 1.0), rec("2", "decline", 0.95, &["big"], 2.0)]);
        let d = diff(&a, &a.clone(), 10);
        assert_eq!((d.compared, d.differing, d.outcome_changed), (2, 0, 0));
        assert!(d.moved().is_empty() && d.top.is_empty());
        assert!(d.render_text().contains("no transitions"));
    }

    #[test]
    fn transitions_rule_deltas_and_why_are_reported() {
        let before = set(vec![rec("1", "approve", 0.52, &[], 1.0), rec("2", "approve", 0.1, &[], 1.0), rec("3", "review", 0.6, &["big"], 3.0), rec("4", "approve", 0.1, &[], 1.0)]);
        let after = set(vec![rec("1", "review", 0.52, &[], 1.0), rec("2", "approve", 0.1, &[], 1.0), rec("3", "decline", 0.95, &["big", "burst"], 4.0), rec("5", "approve", 0.1, &[], 1.0)]);
        let d = diff(&before, &after, 10);
        assert_eq!((d.compared, d.only_recorded, d.only_replayed), (3, 1, 1));
        assert_eq!((d.differing, d.outcome_changed, d.hits_changed, d.score_changed, d.features_changed), (2, 2, 1, 1, 1));
        let moved: Vec<(&str, &str, u64)> = d.moved().iter().map(|t| (t.from.as_str(), t.to.as_str(), t.count)).collect();
        assert_eq!(moved, [("approve", "review", 1), ("review", "decline", 1)]);
        assert_eq!(d.rules[0], RuleDelta { rule: "burst".into(), shadow: false, before: 0, after: 1 });
        assert_eq!(d.top[0].tx_id, "3", "the largest score move first");
        assert_eq!((d.top[0].rules_gained.clone(), d.top[0].features.clone()), (vec!["burst".to_string()], vec![("n".to_string(), 3.0, 4.0)]));
        let html = d.render_html("replay");
        assert!(html.contains("burst") && html.contains("class=\"moved\""));
    }
}

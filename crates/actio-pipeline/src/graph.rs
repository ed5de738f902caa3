//! The pipeline as a graph: stages are nodes, topics the edges between them (a
//! stage's output to every stage that reads it), ingress and egress topics the
//! graph's ends. `actio graph` prints it as text or as Mermaid.
//!
//! The graph is acyclic, and every stage reachable from an ingress topic, by
//! construction: a stage reads an ingress topic or what an earlier stage writes
//! (checked at load, as are a join's branches).

use std::fmt::Write as _;

use crate::{Pipeline, TopicRole};

/// One edge: `from` writes `topic`, which `to` reads. A node is a stage name, or an
/// ingress / egress topic's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// Writer: a stage, or an ingress topic.
    pub from: String,
    /// Reader: a stage, or an egress (or unread) topic.
    pub to: String,
    /// The topic between them.
    pub topic: String,
}

/// The stages and how topics connect them.
#[derive(Debug, Clone)]
pub struct Graph {
    /// `(stage, kind, what it does in a line)`, in declaration order.
    pub stages: Vec<(String, &'static str, String)>,
    /// Edges, in stage order.
    pub edges: Vec<Edge>,
    /// Ingress topics.
    pub sources: Vec<String>,
    /// Topics written but read by no stage (egress, and any a route writes for
    /// consumers outside).
    pub sinks: Vec<String>,
}

impl Pipeline {
    /// The pipeline's graph.
    pub fn graph(&self) -> Graph {
        // What a stage may write: its output, its declared targets, and every
        // declared topic a target template can name.
        let writes = |s: &crate::Stage| -> Vec<String> {
            let mut t = vec![s.output.clone()];
            t.extend(s.logic.outputs());
            for template in s.logic.output_templates() {
                t.extend(self.topics.iter().filter(|x| x.role != TopicRole::Ingress && names(&template, &x.name)).map(|x| x.name.clone()));
            }
            dedup(t)
        };
        let mut edges = Vec::new();
        let sources: Vec<String> = self.topics.iter().filter(|t| t.role == TopicRole::Ingress).map(|t| t.name.clone()).collect();
        let mut sinks: Vec<String> = Vec::new();
        for s in &self.stages {
            if sources.contains(&s.input) {
                edges.push(Edge { from: s.input.clone(), to: s.name.clone(), topic: s.input.clone() });
            }
            for t in writes(s) {
                let readers: Vec<&crate::Stage> = self.stages.iter().filter(|r| r.input == t).collect();
                if readers.is_empty() {
                    if !sinks.contains(&t) {
                        sinks.push(t.clone());
                    }
                    edges.push(Edge { from: s.name.clone(), to: t.clone(), topic: t.clone() });
                }
                for r in readers {
                    edges.push(Edge { from: s.name.clone(), to: r.name.clone(), topic: t.clone() });
                }
            }
        }
        let stages = self.stages.iter().map(|s| (s.name.clone(), s.kind.name, s.logic.describe().into_iter().next().unwrap_or_default())).collect();
        Graph { stages, edges, sources, sinks }
    }
}

impl Graph {
    /// One line per stage: what it reads, what it is, where its output goes.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let w = self.stages.iter().map(|(n, k, _)| n.len() + k.len() + 3).max().unwrap_or(0);
        for (name, kind, _) in &self.stages {
            let from: Vec<String> = self.edges.iter().filter(|e| e.to == *name).map(|e| if e.from == e.topic { format!("[{}]", e.topic) } else { format!("{} ({})", e.from, e.topic) }).collect();
            let to: Vec<String> = self.edges.iter().filter(|e| e.from == *name).map(|e| if e.to == e.topic { format!("[{}]", e.topic) } else { format!("{} ({})", e.to, e.topic) }).collect();
            let node = format!("{name} ({kind})");
            let _ = writeln!(out, "  {:>40} ──► {node:<w$} ──► {}", dedup(from).join(", "), dedup(to).join(", "));
        }
        out
    }

    /// A Mermaid flowchart; `label` adds a line to a stage's node (its p99, say).
    pub fn mermaid(&self, label: &dyn Fn(&str) -> Option<String>) -> String {
        let id = |n: &str| n.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect::<String>();
        let mut out = String::from("flowchart LR\n");
        for t in &self.sources {
            let _ = writeln!(out, "  t_{}[/\"{t}\"/]", id(t));
        }
        for t in &self.sinks {
            let _ = writeln!(out, "  t_{}[\\\"{t}\"\\]", id(t));
        }
        for (name, kind, _) in &self.stages {
            let extra = label(name).map(|l| format!("<br/>{l}")).unwrap_or_default();
            let _ = writeln!(out, "  s_{}[\"<b>{name}</b><br/>{kind}{extra}\"]", id(name));
        }
        let node = |n: &str| if self.sources.iter().chain(&self.sinks).any(|t| t == n) { format!("t_{}", id(n)) } else { format!("s_{}", id(n)) };
        for e in &self.edges {
            if e.from == e.topic || e.to == e.topic {
                let _ = writeln!(out, "  {} --> {}", node(&e.from), node(&e.to));
            } else {
                let _ = writeln!(out, "  {} -->|{}| {}", node(&e.from), e.topic, node(&e.to));
            }
        }
        out
    }
}

/// Whether `template` (`{…}` standing for any non-empty text) can name `topic`.
fn names(template: &str, topic: &str) -> bool {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        parts.push(&rest[..open]);
        rest = rest[open..].find('}').map_or("", |c| &rest[open + c + 1..]);
    }
    parts.push(rest);
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return topic == first;
    }
    let Some(mut middle) = topic.strip_prefix(first).and_then(|t| t.strip_suffix(last)) else { return false };
    for p in &parts[1..parts.len() - 1] {
        match middle.find(p) {
            Some(i) if i > 0 => middle = &middle[i + p.len()..],
            _ => return false,
        }
    }
    !middle.is_empty()
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(x.clone()));
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use crate::Pipeline;

    #[test]
    fn a_template_names_the_topics_it_can_make() {
        use super::names;
        assert!(names("{site}_lastdata", "north_lastdata"));
        assert!(!names("{site}_lastdata", "_lastdata"), "a field is never empty");
        assert!(!names("{site}_lastdata", "sensors.history"));
        assert!(names("t.{a}.{b}", "t.x.y") && !names("t.{a}.{b}", "t.x"));
        assert!(names("sensors.errors", "sensors.errors"));
    }

    #[test]
    fn the_sensors_graph_has_two_flows_and_the_topics_a_route_names() {
        let p = Pipeline::load(&actio_testkit::pipeline("sensors")).unwrap();
        let g = p.graph();
        assert_eq!(g.sources, ["sensors.readings", "sensors.updates"]);
        let from_publish: Vec<&str> = g.edges.iter().filter(|e| e.from == "publish").map(|e| e.to.as_str()).collect();
        assert_eq!(from_publish, ["sensors.unrouted", "sensors.errors", "north_lastdata", "south_lastdata"]);
    }

    #[test]
    fn the_transfers_graph_fans_out_and_joins() {
        let p = Pipeline::load(&actio_testkit::pipeline("transfers")).unwrap();
        let g = p.graph();
        let edges: Vec<(&str, &str)> = g.edges.iter().map(|e| (e.from.as_str(), e.to.as_str())).collect();
        assert_eq!(
            edges,
            [
                ("transfers.in", "risk"),
                ("risk", "screening"),
                ("risk", "history"),
                ("screening", "typology"),
                ("history", "typology"),
                ("typology", "score"),
                ("score", "transfers.decisions"),
            ]
        );
        assert_eq!((g.sources.as_slice(), g.sinks.as_slice()), (&["transfers.in".to_string()][..], &["transfers.decisions".to_string()][..]));
        let m = g.mermaid(&|s| (s == "score").then(|| "p99 1.2 ms".into()));
        assert!(m.starts_with("flowchart LR\n"), "{m}");
        assert!(m.contains("s_screening -->|transfers.results| s_typology"), "{m}");
        assert!(m.contains("s_score[\"<b>score</b><br/>score<br/>p99 1.2 ms\"]"), "{m}");
        let t = g.text();
        assert!(t.contains("screening (transfers.results), history (transfers.results) ──► typology (join)"), "{t}");
    }
}

//! Services: what is deployed. A service is one stage, or several consecutive stages
//! fused into one (`[[service]]` in `pipeline.toml`, or `actio stage --stage a,b,c`).
//!
//! Why fuse: each broker hop costs a produce, a fetch and a commit (~2.5–3 ms at
//! `linger.ms=2`, and a share of the broker's CPU). A fused service consumes the first
//! stage's input in one consumer group and hands each message from stage to stage in
//! memory, as Kafka Streams runs a topology's operators without a topic between them.
//! The guarantee is the single stage's: an input offset is committed once the last
//! stage's outputs are acknowledged, so a crash redelivers from the input and every
//! stage runs again. What a fused service gives up: its stages scale together (one
//! replica count, one worker pool) and a transient failure retries the whole chain
//! (a velocity stage before the failing stage counts the transaction again in its
//! windows; the shipped stage kinds fail transiently only under injected faults).
//!
//! The intermediate topics stay declared and created, so a pipeline can be deployed
//! either way; but the two ways do not share consumer groups (`<pipeline>.<service>`
//! against `<pipeline>.<stage>`): switching a running pipeline from one to the other
//! starts the new groups where `from_earliest` says, and a velocity stage restores its
//! windows from its own service's input.

use std::ops::Range;

use crate::Writes;
use crate::resolve::{Pipeline, Stage};

/// A deployment unit: one stage, or consecutive stages run as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its name: the stage's, a `[[service]]`'s, or for an ad-hoc list the stage
    /// names joined by `+`.
    pub name: String,
    /// Its stages: indices into [`Pipeline::stages`], consecutive, in chain order.
    pub stages: Range<usize>,
    /// Its consumer group: a lone stage's own, else `<pipeline>.<name>`.
    pub group: String,
    /// Replicas to deploy.
    pub replicas: u32,
}

impl Service {
    /// Whether it runs more than one stage.
    pub fn is_fused(&self) -> bool {
        self.stages.len() > 1
    }

    /// Its stages.
    pub fn stages<'p>(&self, pipeline: &'p Pipeline) -> &'p [Stage] {
        &pipeline.stages[self.stages.clone()]
    }
}

impl Pipeline {
    /// What to deploy, in chain order: each `[[service]]`, and every stage in none
    /// as a service of its own.
    pub fn services(&self) -> Vec<Service> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.stages.len() {
            match self.fused.iter().find(|s| s.stages.start == i) {
                Some(s) => {
                    out.push(s.clone());
                    i = s.stages.end;
                }
                None => {
                    out.push(Service::alone(&self.stages[i], i));
                    i += 1;
                }
            }
        }
        out
    }

    /// The service `spec` names: a `[[service]]`'s name, a stage's name (that stage
    /// alone, even if a `[[service]]` holds it), or consecutive stage names separated
    /// by commas (fused ad hoc, named by joining them with `+`).
    pub fn service(&self, spec: &str) -> Result<Service, String> {
        if let Some(s) = self.fused.iter().find(|s| s.name == spec) {
            return Ok(s.clone());
        }
        let names: Vec<&str> = spec.split(',').map(str::trim).collect();
        let range = self.consecutive(&names)?;
        if range.len() == 1 {
            return Ok(Service::alone(&self.stages[range.start], range.start));
        }
        let name = names.join("+");
        let replicas = self.stages[range.clone()].iter().map(|s| s.replicas).max().unwrap_or(1);
        Ok(Service { group: format!("{}.{name}", self.name), name, stages: range, replicas })
    }

    /// The stages `names` name, if they are consecutive in the chain, in chain order,
    /// and can run as one (one dead-letter topic; a `score` stage only last).
    pub(crate) fn consecutive(&self, names: &[&str]) -> Result<Range<usize>, String> {
        let known = || self.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
        let mut at = Vec::with_capacity(names.len());
        for n in names {
            match self.stages.iter().position(|s| s.name == *n) {
                Some(i) => at.push(i),
                None if self.fused.is_empty() => return Err(format!("no stage named {n:?}; the stages are: {}", known())),
                None => {
                    let services: Vec<&str> = self.fused.iter().map(|s| s.name.as_str()).collect();
                    return Err(format!("no stage or service named {n:?}; the stages are: {}; the services: {}", known(), services.join(", ")));
                }
            }
        }
        let Some(&first) = at.first() else { return Err("expected at least one stage".into()) };
        // A join runs alone: it reads what several branches write, each result held
        // until the joined transaction is delivered.
        if at.len() > 1
            && let Some(&i) = at.iter().find(|&&i| !self.stages[i].logic.waits_for().is_empty())
        {
            return Err(format!("stage {:?} is a `{}` stage: it waits for results several branches write to its input, so it runs as a service of its own", self.stages[i].name, self.stages[i].kind.name));
        }
        // A stage that waits on I/O ends a service: its result comes later, on the I/O
        // runtime, and goes out as it is.
        if let Some(&i) = at[..at.len() - 1].iter().find(|&&i| self.stages[i].logic.is_async()) {
            return Err(format!("stage {:?} is an `{}` stage: it waits on I/O, so it can only be a service's last stage", self.stages[i].name, self.stages[i].kind.name));
        }
        // A stage that does not write transactions to its output ends a service.
        if let Some(&i) = at[..at.len() - 1].iter().find(|&&i| self.stages[i].kind.writes != Writes::Transactions) {
            let s = &self.stages[i];
            let what = if s.kind.writes == Writes::Decisions { "it writes decisions" } else { "it routes each message to topics of its own choosing" };
            return Err(format!("stage {:?} is a `{}` stage: {what}, so it can only be a service's last stage", s.name, s.kind.name));
        }
        for (k, pair) in at.windows(2).enumerate() {
            let (a, b) = (&self.stages[pair[0]], &self.stages[pair[1]]);
            if pair[1] != pair[0] + 1 || b.input != a.output {
                return Err(format!(
                    "stages {:?} and {:?} are not consecutive in the chain ({:?} does not read what {:?} writes): a service runs consecutive stages in chain order",
                    names[k], names[k + 1], b.name, a.name
                ));
            }
            if b.dlq != a.dlq {
                return Err(format!("stages {:?} and {:?} have different dead-letter topics ({:?}, {:?}): one service writes one", a.name, b.name, a.dlq, b.dlq));
            }
        }
        Ok(first..first + at.len())
    }
}

impl Service {
    /// `stage`, the `i`th of its pipeline, as a service of its own.
    pub(crate) fn alone(stage: &Stage, i: usize) -> Self {
        Service { name: stage.name.clone(), stages: i..i + 1, group: stage.group.clone(), replicas: stage.replicas }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    fn fraud() -> crate::Pipeline {
        crate::Pipeline::load(&actio_testkit::fraud()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn each_stage_is_its_own_service_unless_fused() {
        let p = fraud();
        let names: Vec<String> = p.services().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["rules", "velocity", "score"]);
        assert!(!p.services()[0].is_fused());
        assert_eq!(p.services()[1].group, "fraud.velocity");
    }

    #[test]
    fn an_ad_hoc_list_of_consecutive_stages_is_one_service() {
        let p = fraud();
        let s = p.service("rules,velocity,score").unwrap();
        assert_eq!((s.name.as_str(), s.group.as_str(), s.stages.clone(), s.replicas), ("rules+velocity+score", "fraud.rules+velocity+score", 0..3, 2));
        assert!(s.is_fused());
        assert_eq!(p.service("velocity").unwrap().stages, 1..2);
        assert_eq!(p.service("velocity, score").unwrap().stages, 1..3);
    }

    #[test]
    fn stages_out_of_order_or_unknown_are_refused_with_the_reason() {
        let p = fraud();
        let e = p.service("rules,score").unwrap_err();
        assert!(e.contains("not consecutive"), "{e}");
        let e = p.service("velocity,rules").unwrap_err();
        assert!(e.contains("not consecutive"), "{e}");
        let e = p.service("rules,nope").unwrap_err();
        assert_eq!(e, "no stage named \"nope\"; the stages are: rules, velocity, score");
    }
}

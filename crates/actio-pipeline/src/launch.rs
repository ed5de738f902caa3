//! Starting a pipeline's services on a bus: the one start sequence that `actio run`
//! (every service, in one process) and `actio stage` (one service) share. A service
//! is one stage or consecutive stages fused ([`crate::services`]); the runtime runs
//! each as one `Stage`.
//!
//! Two steps, so a caller can show what it will run before it connects: [`plan`]
//! builds each service's [`StageHandler`] and runtime [`StageSpec`] from the resolved
//! pipeline and logs its fault-injection warnings; [`StagePlan::start`] (or [`start`],
//! both steps at once) gives the handler the bus to restore state from and spawns the
//! service on the runtime. [`create_topics`] creates the topics they read and write.

use std::sync::Arc;

use actio_core::bus::BusError;
use actio_core::{Bus, TopicSpec};
use actio_runtime::{StageError, StageHandle, StageSpec};

use crate::resolve::Pipeline;
use crate::services::Service;
use crate::stages::StageHandler;

/// Which services of a pipeline to start.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// Every service ([`Pipeline::services`]: the `[[service]]`s, and every other
    /// stage alone), in chain order.
    All,
    /// Each stage alone, in chain order, whatever `[[service]]`s say.
    EachStage,
    /// Every stage fused into one service (consecutive stages only).
    Fused,
    /// These services, in the order given: each a `[[service]]`'s name, a stage's
    /// name, or consecutive stage names joined by commas ([`Pipeline::service`]).
    Named(&'a [&'a str]),
}

/// How the stages are started, beyond what `pipeline.toml` says.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// Transport properties of every stage's consumers and producer (Kafka:
    /// librdkafka's), passed through unchanged.
    pub properties: Vec<(String, String)>,
    /// Worker threads per stage, over the pipeline's `threads` (at least 1).
    pub threads: Option<usize>,
    /// A bus's own adjustment of each spec, applied before `threads` (the Kafka
    /// bus's retry-consumer fetch wait; other buses ignore such properties).
    pub tune: Option<fn(&mut StageSpec)>,
    /// This member's name in its groups, for an exactly-once stage's transactional
    /// id [default: host and process id, `actio_runtime::default_instance`].
    pub instance: Option<String>,
    /// OpenTelemetry spans of every stage, if tracing is on.
    pub tracer: Option<actio_runtime::trace::Tracer>,
    /// Where decisions and dead letters are recorded (the decision trail), if anywhere.
    pub trail: Option<Arc<actio_trail::TrailWriter>>,
}

/// A stage that cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// No service of the pipeline has this name, or the stages named cannot be one.
    #[error("{0}")]
    UnknownService(String),
    /// The runtime could not start the stage (its group, its producer, its pool).
    #[error("starting stage {stage}")]
    Start {
        /// Stage name.
        stage: String,
        /// What the runtime said.
        #[source]
        source: StageError,
    },
}

/// A service ready to start: its handler and its runtime spec, not yet on a bus.
#[derive(Debug)]
pub struct StagePlan {
    /// The service's logic.
    pub handler: StageHandler,
    /// What the runtime runs it with.
    pub spec: StageSpec,
}

impl StagePlan {
    /// Plans `service` of `pipeline` and logs the fault-injection warnings of its
    /// stages, if they have any (a stage with `[[stage.fault]]` fails on purpose).
    pub fn new(pipeline: &Pipeline, service: &Service, options: &LaunchOptions) -> Self {
        for stage in service.stages(pipeline) {
            let prefix = format!("stage {}:", stage.name);
            for w in pipeline.fault_warnings().iter().filter(|w| w.starts_with(&prefix)) {
                tracing::warn!("{w}");
            }
        }
        let handler = StageHandler::of_service(pipeline, service).with_trail(options.trail.clone());
        let mut spec = handler.spec(&options.properties);
        if let Some(tune) = options.tune {
            tune(&mut spec);
        }
        if let Some(t) = options.threads {
            spec.threads = t.max(1);
        }
        if let Some(i) = &options.instance {
            spec.instance = i.clone();
        }
        spec.tracer = options.tracer.clone();
        StagePlan { handler, spec }
    }

    /// Starts the service on `bus`; a velocity stage restores its windows from it.
    pub fn start<B: Bus>(self, bus: &Arc<B>) -> Result<StageHandle, LaunchError> {
        let name = self.spec.name.clone();
        let handler = self.handler.with_restore(bus.clone());
        actio_runtime::Stage::spawn(&**bus, self.spec, Arc::new(handler)).map_err(|source| LaunchError::Start { stage: name, source })
    }
}

/// The services `selection` picks.
pub fn services(pipeline: &Pipeline, selection: Selection<'_>) -> Result<Vec<Service>, LaunchError> {
    let one = |spec: &str| pipeline.service(spec).map_err(LaunchError::UnknownService);
    match selection {
        Selection::All => Ok(pipeline.services()),
        Selection::EachStage => pipeline.stages.iter().map(|s| one(&s.name)).collect(),
        Selection::Fused => one(&pipeline.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(",")).map(|s| vec![s]),
        Selection::Named(names) => names.iter().map(|n| one(n)).collect(),
    }
}

/// Plans the `selection` of `pipeline`'s services ([`StagePlan::new`] each).
pub fn plan(pipeline: &Pipeline, selection: Selection<'_>, options: &LaunchOptions) -> Result<Vec<StagePlan>, LaunchError> {
    Ok(services(pipeline, selection)?.iter().map(|s| StagePlan::new(pipeline, s, options)).collect())
}

/// Plans the `selection` of `pipeline`'s services and starts them on `bus`, in order.
/// If one fails to start, those already started are stopped (gracefully) before the
/// error is returned.
pub fn start<B: Bus>(bus: &Arc<B>, pipeline: &Pipeline, selection: Selection<'_>, options: &LaunchOptions) -> Result<Vec<StageHandle>, LaunchError> {
    let plans = plan(pipeline, selection, options)?;
    let mut handles = Vec::with_capacity(plans.len());
    for p in plans {
        match p.start(bus) {
            Ok(h) => handles.push(h),
            Err(e) => {
                for h in handles {
                    h.stop(actio_runtime::StopMode::Graceful);
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    }
    Ok(handles)
}

/// Creates the pipeline's topics that do not exist yet, with their declared
/// partition counts; existing ones are left alone.
pub fn create_topics<B: Bus>(bus: &B, pipeline: &Pipeline) -> Result<(), BusError> {
    let specs: Vec<TopicSpec> = pipeline.topics.iter().map(|t| TopicSpec { name: t.name.clone(), partitions: t.partitions }).collect();
    bus.create_topics(&specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fraud() -> Pipeline {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/fraud");
        Pipeline::load(&dir).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn a_plan_applies_the_options_to_every_spec() {
        let p = fraud();
        let opts = LaunchOptions { properties: vec![("a".into(), "b".into())], threads: Some(0), tune: Some(|s| s.max_in_flight = 7), instance: None, tracer: None, trail: None };
        let plans = plan(&p, Selection::All, &opts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plans.len(), p.stages.len());
        for (plan, stage) in plans.iter().zip(&p.stages) {
            assert_eq!(plan.spec.name, stage.name);
            assert_eq!(plan.spec.group, stage.group);
            assert_eq!((plan.spec.threads, plan.spec.max_in_flight), (1, 7));
            assert_eq!(plan.spec.properties, opts.properties);
        }
    }

    #[test]
    fn an_unknown_stage_is_named_with_the_known_ones() {
        let p = fraud();
        let Err(e) = plan(&p, Selection::Named(&["nope"]), &LaunchOptions::default()) else { panic!("planned an unknown stage") };
        let known: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(e.to_string(), format!("no stage named \"nope\"; the stages are: {}", known.join(", ")));
    }

    #[test]
    fn fused_is_one_service_over_the_chain_with_its_own_groups() {
        let p = fraud();
        let plans = plan(&p, Selection::Fused, &LaunchOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plans.len(), 1);
        let spec = &plans[0].spec;
        assert_eq!((spec.name.as_str(), spec.group.as_str(), spec.input.as_str()), ("rules+velocity+score", "fraud.rules+velocity+score", "tx.in"));
        let retry = spec.retry.topic.as_ref().unwrap_or_else(|| panic!("the first stage's retry topic"));
        assert_eq!((&*retry.topic, retry.group.as_str()), ("tx.retry.rules", "fraud.rules+velocity+score.retry"));
        let each = plan(&p, Selection::EachStage, &LaunchOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(each.iter().map(|p| p.spec.group.as_str()).collect::<Vec<_>>(), ["fraud.rules", "fraud.velocity", "fraud.score"]);
        assert_eq!(each[1].spec.retry.topic.as_ref().map(|t| t.group.as_str()), Some("fraud.velocity.retry"), "a lone stage's retry group is unchanged");
    }
}

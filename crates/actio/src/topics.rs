//! `actio topics create|describe`: the pipeline's topics on Kafka, through the admin API.

use std::process::ExitCode;

use actio_bus_kafka::KafkaBus;
use actio_core::Bus;
use actio_pipeline::Pipeline;
use anyhow::Context;

use crate::cli::{TopicsAction, TopicsArgs};

pub fn main(args: TopicsArgs) -> anyhow::Result<ExitCode> {
    let target = match &args.action {
        TopicsAction::Create(t) | TopicsAction::Describe(t) => t,
    };
    let pipeline = match crate::run::load_pipeline(&target.pipeline) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let bus = match crate::kafka::bus_or_exit(&pipeline, &target.kafka) {
        Ok(b) => b,
        Err(code) => return Ok(code),
    };
    match args.action {
        TopicsAction::Create(_) => create(&bus, &pipeline),
        TopicsAction::Describe(_) => describe(&bus, &pipeline),
    }
}

fn create(bus: &KafkaBus, pipeline: &Pipeline) -> anyhow::Result<ExitCode> {
    actio_pipeline::launch::create_topics(bus, pipeline)
        .context("creating the pipeline's topics")?;
    let mut mismatched = 0;
    for t in &pipeline.topics {
        let info = bus
            .describe_topic(&t.name)
            .with_context(|| format!("describing {}", t.name))?;
        let have = info.partitions.len();
        if have == t.partitions as usize {
            println!("topic {:<18} {:>3} partitions  ok", t.name, have);
        } else {
            mismatched += 1;
            println!(
                "topic {:<18} {:>3} partitions  but pipeline.toml says {} (it existed before; Kafka keeps keys on their partition only while the count is unchanged)",
                t.name, have, t.partitions
            );
        }
    }
    Ok(if mismatched > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn describe(bus: &KafkaBus, pipeline: &Pipeline) -> anyhow::Result<ExitCode> {
    let plans = actio_pipeline::launch::plan(pipeline, actio_pipeline::launch::Selection::All, &Default::default())?;
    for t in &pipeline.topics {
        let info = match bus.describe_topic(&t.name) {
            Ok(i) => i,
            Err(e) => {
                println!("topic {:<18} {e}", t.name);
                continue;
            }
        };
        let ends = bus
            .end_offsets(&t.name)
            .with_context(|| format!("end offsets of {}", t.name))?;
        println!(
            "topic {:<18} {:>3} partitions (pipeline.toml: {})  {} records  leaders {:?}",
            t.name,
            info.partitions.len(),
            t.partitions,
            ends.iter().sum::<i64>(),
            info.partitions.iter().map(|p| p.leader).collect::<Vec<_>>()
        );
        // The groups reading it: a stage's on its input, its retry group on its retry topic.
        // Per service: a stage alone, or a [[service]] of fused stages.
        let groups = plans.iter().map(|p| &p.spec).filter_map(|s| match &s.retry.topic {
            _ if s.input == t.name => Some(&s.group),
            Some(r) if *r.topic == *t.name => Some(&r.group),
            _ => None,
        });
        for group in groups {
            let lag = bus
                .group_lag(group, &t.name)
                .with_context(|| format!("lag of group {group}"))?;
            let total = actio_bus_kafka::total_lag(&lag);
            let per: Vec<String> = lag
                .iter()
                .map(|p| format!("{}:{}", p.partition, p.lag))
                .collect();
            println!(
                "  group {:<16} lag {total:>9}  per partition {}",
                group,
                per.join(" ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

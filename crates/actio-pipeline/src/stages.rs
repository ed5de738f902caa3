//! The stage kinds as runtime [`Handler`]s: decode the input, run the stage's logic,
//! encode the output.
//!
//! Ingress topics carry JSON [`Transaction`]s (validated here, once); internal
//! topics carry [`TxState`] in the topic's codec; the `score` stage writes a
//! [`actio_core::Decision`]. Anything undecodable or invalid is a permanent failure:
//! the runtime dead-letters it at once with the reason.

use std::sync::Arc;

use actio_core::bus::Bytes;
use actio_core::{Codec, Record, TopicPartition, Transaction, TxState};
use actio_engine::velocity::VelocityState;
use actio_runtime::{Handler, HandlerError, Output, StageSpec};
use ahash::AHashMap;
use parking_lot::RwLock;

use crate::resolve::{Pipeline, Stage, StageLogic};
use crate::TopicRole;

/// A pipeline stage, ready to hand to [`actio_runtime::Stage::spawn`].
#[derive(Debug)]
pub struct StageHandler {
    stage: Stage,
    ingress: bool,
    input_codec: Codec,
    output: Arc<str>,
    output_codec: Codec,
    key_field: String,
    /// Velocity state per partition: dropped with the partition on revocation.
    velocity: RwLock<AHashMap<i32, Arc<VelocityState>>>,
}

impl StageHandler {
    /// The handler of a stage of `pipeline`.
    pub fn new(pipeline: &Pipeline, stage: &Stage) -> Self {
        let input = pipeline.topic(&stage.input);
        let output = pipeline.topic(&stage.output);
        StageHandler {
            ingress: input.is_some_and(|t| t.role == TopicRole::Ingress),
            input_codec: input.map_or(Codec::Json, |t| t.codec),
            output: Arc::from(stage.output.as_str()),
            output_codec: output.map_or(Codec::Json, |t| t.codec),
            key_field: pipeline.key_field.clone(),
            velocity: RwLock::new(AHashMap::new()),
            stage: stage.clone(),
        }
    }

    fn decode(&self, payload: &[u8]) -> Result<TxState, HandlerError> {
        let bad = |e: &dyn std::fmt::Display| HandlerError::permanent(format!("undecodable payload: {e}"));
        if self.ingress {
            let tx: Transaction = self.input_codec.decode(payload).map_err(|e| bad(&e))?;
            tx.validate().map_err(|e| HandlerError::permanent(format!("invalid transaction: {e}")))?;
            Ok(TxState::new(tx))
        } else {
            self.input_codec.decode(payload).map_err(|e| bad(&e))
        }
    }

    fn velocity_state(&self, spec: &actio_engine::velocity::VelocitySpec, partition: i32) -> Arc<VelocityState> {
        if let Some(s) = self.velocity.read().get(&partition) {
            return s.clone();
        }
        self.velocity.write().entry(partition).or_insert_with(|| Arc::new(spec.new_state())).clone()
    }

    fn key_of(&self, st: &TxState) -> String {
        let tx = &st.tx;
        match self.key_field.as_str() {
            "account_id" => tx.account_id.clone(),
            "device_id" => tx.device_id.clone().unwrap_or_default(),
            "merchant_id" => tx.merchant_id.clone(),
            _ => tx.card_id.clone(),
        }
    }

    /// The runtime spec of this stage.
    pub fn spec(&self, properties: &[(String, String)]) -> StageSpec {
        let l = &self.stage.limits;
        StageSpec {
            name: self.stage.name.clone(),
            group: self.stage.group.clone(),
            input: self.stage.input.clone(),
            dlq: Arc::from(self.stage.dlq.as_str()),
            ordering: l.ordering,
            max_in_flight_per_partition: l.max_in_flight_per_partition,
            max_in_flight: l.max_in_flight,
            commit_interval: l.commit_interval,
            drain_timeout: l.drain_timeout,
            retry: l.retry.clone(),
            threads: l.threads,
            from_earliest: true,
            properties: properties.to_vec(),
        }
    }
}

impl Handler for StageHandler {
    fn handle(&self, record: &Record) -> Result<Vec<Output>, HandlerError> {
        let mut st = self.decode(&record.payload)?;
        let encode_err = |e: actio_core::CodecError| HandlerError::permanent(format!("cannot encode output: {e}"));
        let payload: Bytes = match &self.stage.logic {
            StageLogic::Rules(rules) => {
                rules.current().eval(&mut st);
                self.output_codec.encode(&st).map_err(encode_err)?.into()
            }
            StageLogic::Velocity { spec, rules } => {
                spec.update(&self.velocity_state(spec, record.tp.partition), &mut st);
                if let Some(rules) = rules {
                    rules.current().eval(&mut st);
                }
                self.output_codec.encode(&st).map_err(encode_err)?.into()
            }
            StageLogic::Score(model) => {
                let key = self.key_of(&st);
                let decision = model.decide(&st, &key, &self.stage.rules_version);
                self.output_codec.encode(&decision).map_err(encode_err)?.into()
            }
        };
        Ok(vec![Output { topic: self.output.clone(), payload }])
    }

    fn partitions_revoked(&self, partitions: &[TopicPartition]) {
        let mut v = self.velocity.write();
        for tp in partitions {
            v.remove(&tp.partition);
        }
    }
}

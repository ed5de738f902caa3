//! actio pipelines: `pipeline.toml` and the stage kinds it names.
//!
//! Loading is two steps (parse, then resolve): [`config`] deserializes the file with
//! no I/O beyond reading it; [`Pipeline::load`] then checks the chain (every stage
//! reads an ingress topic or an earlier stage's output), loads each stage's own
//! files and compiles its rules once, so a pipeline that loads is a pipeline that
//! runs. Every error names the file, the field and, where the parser knows it, the
//! line.
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod faults;
pub mod graph;
pub mod kinds;
pub mod launch;
pub mod reload;
mod resolve;
pub mod services;
pub mod stages;

pub use config::{FaultKind, TopicRole};
pub use kinds::{Kind, Logic, StageLogic, Writes};
pub use kinds::template::Env;
pub use error::{ConfigError, ConfigErrors};
pub use resolve::{Limits, Pipeline, Stage, Topic};
pub use services::Service;

//! `route`: sends each transaction to topics chosen per message — by CEL
//! conditions, or by a topic name made from its fields or headers — so that one
//! deployment carries several flows (each route's topic read by its own stages) or
//! writes per-tenant outputs (`{service}_lastdata`).
//!
//! ```toml
//! [[stage]]
//! kind = "route"
//! output = "sensors.unrouted"   # the default target (see `unmatched`)
//! mode = "first"                # or "all": every route whose `when` holds
//! unmatched = "output"          # or "dlq"
//! [[stage.route]]
//! when = "tx.kind == 'error'"   # CEL over tx.* and features.*; absent = always
//! to = "sensors.errors"
//! [[stage.route]]
//! to = "{service}_lastdata"     # {field} of the transaction, {header.<name>} of the message
//! ```
//!
//! Never silently nowhere: a message that no route takes, or whose templated target
//! is not a topic the pipeline declares (of role internal or egress), goes to the
//! stage's `output`, or with `unmatched = "dlq"` to the DLQ with the reason; both are
//! counted. Targets named literally are checked at load. A route stage ends a fused
//! service: what follows it reads its targets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actio_core::TxState;
use actio_engine::expr::{self, Node, Scope};
use actio_runtime::{HandlerCounter, HandlerError};
use serde::Deserialize;

use super::template::{Escape, Template};
use super::{Kind, Logic, Produced, ResolveCx, RunCx, StageLogic, Writes};
use crate::TopicRole;

#[cfg(test)]
mod tests;

/// The kind.
pub static KIND: Kind = Kind { name: "route", writes: Writes::Routes, resolve };

/// Messages no route took.
pub const UNMATCHED: &str = "actio_route_unmatched_total";
/// Messages whose templated target is not a declared topic.
pub const MISSING_TARGET: &str = "actio_route_missing_target_total";

/// Which routes a message takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The first whose `when` holds (the default).
    #[default]
    First,
    /// Every one whose `when` holds: a copy to each target.
    All,
}

/// Where a message goes that no route takes, or whose target does not exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// The stage's `output` (the default).
    #[default]
    Output,
    /// The DLQ, with the reason.
    Dlq,
}

/// A `route` stage's own fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The routes, in order (`[[stage.route]]`).
    #[serde(rename = "route")]
    pub routes: Vec<RouteEntry>,
    /// Which routes a message takes.
    #[serde(default)]
    pub mode: Mode,
    /// Where the rest goes.
    #[serde(default)]
    pub unmatched: Unmatched,
}

/// One route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// CEL condition over `tx.*` and `features.*`; absent: always.
    pub when: Option<String>,
    /// A topic, or a template: `{field}` (a field of the schema), `{header.<name>}`.
    pub to: String,
}

/// A compiled `route` stage.
#[derive(Debug)]
pub struct Route {
    routes: Vec<Compiled>,
    mode: Mode,
    unmatched: Unmatched,
    features: Vec<String>,
    /// Topics a templated target may name: declared, of role internal or egress.
    targets: Vec<Arc<str>>,
    unmatched_count: AtomicU64,
    missing: AtomicU64,
}

#[derive(Debug)]
struct Compiled {
    when: Option<(String, Node)>,
    to: Template,
}

fn resolve(cx: &mut ResolveCx<'_>) -> Option<Arc<dyn Logic>> {
    let c: RouteConfig = cx.config()?;
    if c.routes.is_empty() {
        cx.error("route", "expected at least one [[stage.route]]");
        return None;
    }
    let targets: Vec<Arc<str>> = cx.topics.iter().filter(|t| matches!(t.role, TopicRole::Internal | TopicRole::Egress)).map(|t| Arc::from(t.name.as_str())).collect();
    let scope = Scope::new(cx.schema, cx.features);
    let mut routes = Vec::new();
    let mut ok = true;
    for (i, r) in c.routes.iter().enumerate() {
        let when = match &r.when {
            None => None,
            Some(w) => match expr::compile(w, &scope) {
                Ok(n) => Some((w.clone(), n)),
                Err(e) => {
                    cx.error(&format!("route[{i}].when"), e);
                    ok = false;
                    continue;
                }
            },
        };
        let to = match Template::parse(&r.to, cx.schema, cx.env) {
            Ok(p) => p,
            Err(e) => {
                cx.error(&format!("route[{i}].to"), e);
                ok = false;
                continue;
            }
        };
        if let Some(t) = to.literal()
            && !targets.iter().any(|x| **x == *t)
        {
            cx.error(&format!("route[{i}].to"), format!("{t:?} is not a declared topic of role internal or egress; declare it in a [[topic]]"));
            ok = false;
        }
        routes.push(Compiled { when, to });
    }
    ok.then(|| {
        Arc::new(Route { routes, mode: c.mode, unmatched: c.unmatched, features: scope.features, targets, unmatched_count: AtomicU64::new(0), missing: AtomicU64::new(0) })
            as Arc<dyn Logic>
    })
}

impl Route {
    /// The topic `to` names for this message, or why there is none.
    fn render(&self, to: &Template, st: &TxState, cx: &RunCx<'_>) -> Result<Arc<str>, String> {
        let name = match to.literal() {
            Some(t) => t.to_string(),
            None => to.render(st, cx.schema, cx.headers, Escape::Raw)?,
        };
        self.targets.iter().find(|x| ***x == *name).cloned().ok_or_else(|| format!("topic {name:?} is not declared"))
    }
}

impl StageLogic for Route {
    type State = ();

    fn describe(&self) -> Vec<String> {
        let mode = match self.mode {
            Mode::First => "the first route whose `when` holds",
            Mode::All => "every route whose `when` holds",
        };
        let rest = match self.unmatched {
            Unmatched::Output => "the rest to the stage's output",
            Unmatched::Dlq => "the rest to the DLQ",
        };
        let mut lines = vec![format!("{} routes: {mode}; {rest}", self.routes.len())];
        lines.extend(self.routes.iter().map(|r| format!("{} → {}", r.when.as_ref().map_or("always", |w| w.0.as_str()), r.to.source())));
        lines
    }

    fn outputs(&self) -> Vec<String> {
        self.routes.iter().filter_map(|r| r.to.literal().map(str::to_string)).collect()
    }

    fn output_templates(&self) -> Vec<String> {
        self.routes.iter().filter(|r| r.to.literal().is_none()).map(|r| r.to.source().to_string()).collect()
    }

    fn new_state(&self) {}

    fn run(&self, _: &(), st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError> {
        let table = expr::feature_table(&self.features, &st);
        let mut to: Vec<Arc<str>> = Vec::new();
        let mut missing: Vec<String> = Vec::new();
        for r in &self.routes {
            let holds = r.when.as_ref().is_none_or(|(_, n)| n.eval_bool(&st, &table).unwrap_or(false));
            if !holds {
                continue;
            }
            match self.render(&r.to, &st, cx) {
                Ok(t) if !to.contains(&t) => to.push(t),
                Ok(_) => {}
                Err(why) => missing.push(format!("route to {:?}: {why}", r.to.source())),
            }
            if self.mode == Mode::First {
                break;
            }
        }
        if !missing.is_empty() {
            self.missing.fetch_add(1, Ordering::Relaxed);
        }
        if to.is_empty() && missing.is_empty() {
            self.unmatched_count.fetch_add(1, Ordering::Relaxed);
        }
        if to.is_empty() || !missing.is_empty() {
            match self.unmatched {
                Unmatched::Output => to.push(cx.output.clone()),
                Unmatched::Dlq if missing.is_empty() => return Err(HandlerError::permanent("route: no route's `when` holds for this transaction")),
                Unmatched::Dlq => return Err(HandlerError::permanent(format!("route: {}", missing.join("; ")))),
            }
        }
        Ok(Produced::Routed(to, st))
    }

    fn counters(&self) -> Vec<HandlerCounter> {
        vec![
            HandlerCounter::new(UNMATCHED, "Messages a route stage sent to its output or the DLQ because no route's `when` held.", self.unmatched_count.load(Ordering::Relaxed)),
            HandlerCounter::new(MISSING_TARGET, "Messages a route stage sent to its output or the DLQ because a route's templated target is not a declared topic.", self.missing.load(Ordering::Relaxed)),
        ]
    }
}

//! Text made from a message: `{field}` (a field of the schema) and `{header.<name>}`
//! (a header of the consumed message), the rest as written. `route` names topics
//! with it, `enrich` URLs and request bodies.
//!
//! `{env.NAME}` and `{env.NAME:-default}` are read once, when the pipeline loads, from
//! the process's environment: what differs between deployments (an API's address in
//! a cluster against `127.0.0.1` on a laptop) stays out of the pipeline's files
//! without a second copy of them. An unset variable without a default is a load
//! error that names it.

use actio_core::{Headers, Schema, TxState};

/// Where `{env.NAME}` is looked up: the process's environment ([`Env::process`]) or,
/// for a test, any function. It remembers the names asked for, so a deployment tool
/// can say which variables a pipeline reads ([`crate::Pipeline::env`]).
pub struct Env<'a> {
    lookup: &'a (dyn Fn(&str) -> Option<String> + Sync),
    read: parking_lot::Mutex<std::collections::BTreeSet<String>>,
}

impl Env<'static> {
    /// The process's environment.
    pub fn process() -> Env<'static> {
        Env::new(&|name| std::env::var(name).ok())
    }
}

impl<'a> Env<'a> {
    /// Variables from `lookup`.
    pub fn new(lookup: &'a (dyn Fn(&str) -> Option<String> + Sync)) -> Env<'a> {
        Env { lookup, read: Default::default() }
    }

    /// The variable's value, if it is set.
    pub fn get(&self, name: &str) -> Option<String> {
        self.read.lock().insert(name.to_string());
        (self.lookup)(name)
    }

    /// The names asked for so far, sorted.
    pub fn read(&self) -> Vec<String> {
        self.read.lock().iter().cloned().collect()
    }
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("read", &self.read()).finish()
    }
}

/// How a value is written into the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As it is (topic names: checked against the declared topics).
    Raw,
    /// Percent-encoded, for a URL's path or query.
    Url,
    /// As the inside of a JSON string.
    Json,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(usize),
    Header(String),
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Compiles `t`, reading its `{env.…}` from `env`; an error says which `{…}` is
    /// wrong.
    pub fn parse(t: &str, schema: &Schema, env: &Env) -> Result<Template, String> {
        let mut pieces = Vec::new();
        // Adjacent text (an `{env.…}` is text once read) is one piece, so a template
        // that names no field stays a literal.
        let push_text = |pieces: &mut Vec<Piece>, p: &str, written: bool| {
            if written && p.contains('}') {
                return Err(format!("unmatched `}}` in {t:?}"));
            }
            match pieces.last_mut() {
                Some(Piece::Text(last)) => last.push_str(p),
                _ if p.is_empty() => {}
                _ => pieces.push(Piece::Text(p.to_string())),
            }
            Ok(())
        };
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            push_text(&mut pieces, &rest[..open], true)?;
            let Some(close) = rest[open..].find('}') else { return Err(format!("unclosed `{{` in {t:?}")) };
            let name = &rest[open + 1..open + close];
            if let Some(var) = name.strip_prefix("env.") {
                let (var, default) = match var.split_once(":-") {
                    Some((v, d)) => (v, Some(d)),
                    None => (var, None),
                };
                if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("{{{name}}} in {t:?}: {var:?} is no environment variable name (letters, digits, `_`)"));
                }
                let value = match (env.get(var).filter(|v| !v.is_empty()), default) {
                    (Some(v), _) => v,
                    (None, Some(d)) => d.to_string(),
                    (None, None) => {
                        return Err(format!("{{{name}}} in {t:?}: the environment variable {var} is not set (set it, or give a default: {{env.{var}:-…}})"));
                    }
                };
                push_text(&mut pieces, &value, false)?;
            } else {
                match name.strip_prefix("header.") {
                    Some(h) if !h.is_empty() => pieces.push(Piece::Header(h.to_string())),
                    _ => match schema.slot(name) {
                        Some(slot) => pieces.push(Piece::Field(slot)),
                        None => {
                            return Err(format!(
                                "{{{name}}} in {t:?} is no field of the schema ({}), no {{header.<name>}} and no {{env.<NAME>}}",
                                schema.names()
                            ));
                        }
                    },
                }
            }
            rest = &rest[open + close + 1..];
        }
        push_text(&mut pieces, rest, true)?;
        Ok(Template { source: t.to_string(), pieces })
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text before the first field or header, with `{env.…}` read.
    pub fn head(&self) -> &str {
        match self.pieces.first() {
            Some(Piece::Text(t)) => t,
            _ => "",
        }
    }

    /// The text, if it names no field and no header.
    pub fn literal(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Text(t)] => Some(t),
            _ => None,
        }
    }

    /// The text for this message, or why there is none (an absent field or header).
    pub fn render(&self, st: &TxState, schema: &Schema, headers: &Headers, escape: Escape) -> Result<String, String> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for p in &self.pieces {
            let value = match p {
                Piece::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Piece::Field(slot) => match schema.json_value(&st.tx, *slot) {
                    serde_json::Value::Null => return Err(format!("field {:?} is absent", schema.field(*slot).name)),
                    serde_json::Value::String(s) => s,
                    v => v.to_string(),
                },
                Piece::Header(h) => match headers.get(h).map(std::str::from_utf8) {
                    Some(Ok(v)) => v.to_string(),
                    Some(Err(_)) => return Err(format!("header {h:?} is not UTF-8")),
                    None => return Err(format!("header {h:?} is absent")),
                },
            };
            match escape {
                Escape::Raw => out.push_str(&value),
                Escape::Url => {
                    for b in value.bytes() {
                        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                            out.push(b as char);
                        } else {
                            out.push_str(&format!("%{b:02X}"));
                        }
                    }
                }
                Escape::Json => {
                    let quoted = serde_json::Value::String(value).to_string();
                    out.push_str(&quoted[1..quoted.len() - 1]);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn schema() -> Schema {
        let text = "[record]\nid = \"id\"\ntime = \"at\"\n\n[[field]]\nname = \"at\"\ntype = \"timestamp\"\n\n[[field]]\nname = \"id\"\ntype = \"string\"\n\n[[field]]\nname = \"account\"\ntype = \"string\"\n\n[decision]\noutcomes = [\"pass\"]\n";
        Schema::from_toml(text, std::path::Path::new("schema.toml")).unwrap()
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "RISK_API" => Some("http://risk.internal:8080".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn env_is_read_at_load_and_joins_the_text_around_it() {
        let s = schema();
        let t = Template::parse("{env.RISK_API}/risk/{account}", &s, &Env::new(&env)).unwrap();
        assert_eq!(t.pieces, vec![Piece::Text("http://risk.internal:8080/risk/".into()), Piece::Field(s.slot("account").unwrap())]);
        let t = Template::parse("{env.NOT_SET:-http://127.0.0.1:18099}/x", &s, &Env::new(&env)).unwrap();
        assert_eq!(t.literal(), Some("http://127.0.0.1:18099/x"), "a default, and no field: a literal");
        let t = Template::parse("{env.EMPTY:-fallback}", &s, &Env::new(&env)).unwrap();
        assert_eq!(t.literal(), Some("fallback"), "an empty variable takes the default");
        let e = Env::new(&env);
        let t = Template::parse("{env.RISK_API:-unused}", &s, &e).unwrap();
        assert_eq!(t.literal(), Some("http://risk.internal:8080"));
        let _ = Template::parse("{env.NOT_SET:-x}{account}", &s, &e).unwrap();
        assert_eq!(e.read(), ["NOT_SET", "RISK_API"], "the names read, set or not");
    }

    #[test]
    fn an_unset_variable_without_a_default_names_it() {
        let e = Template::parse("{env.NOT_SET}/risk", &schema(), &Env::new(&env)).unwrap_err();
        assert!(e.contains("NOT_SET is not set") && e.contains("{env.NOT_SET:-…}"), "{e}");
        let e = Template::parse("{env.bad-name}", &schema(), &Env::new(&env)).unwrap_err();
        assert!(e.contains("\"bad-name\" is no environment variable name"), "{e}");
        let e = Template::parse("{nope}", &schema(), &Env::new(&env)).unwrap_err();
        assert!(e.contains("no {env.<NAME>}"), "{e}");
    }
}

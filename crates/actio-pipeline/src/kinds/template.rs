//! Text made from a message: `{field}` (a field of the schema) and `{header.<name>}`
//! (a header of the consumed message), the rest as written. `route` names topics
//! with it, `enrich` URLs and request bodies.

use actio_core::{Headers, Schema, TxState};

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
    /// Compiles `t`; an error says which `{…}` is wrong.
    pub fn parse(t: &str, schema: &Schema) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = t;
        let text = |p: &str| if p.contains('}') { Err(format!("unmatched `}}` in {t:?}")) } else { Ok(Piece::Text(p.to_string())) };
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(text(&rest[..open])?);
            }
            let Some(close) = rest[open..].find('}') else { return Err(format!("unclosed `{{` in {t:?}")) };
            let name = &rest[open + 1..open + close];
            match name.strip_prefix("header.") {
                Some(h) if !h.is_empty() => pieces.push(Piece::Header(h.to_string())),
                _ => match schema.slot(name) {
                    Some(slot) => pieces.push(Piece::Field(slot)),
                    None => return Err(format!("{{{name}}} in {t:?} is no field of the schema ({}) and no {{header.<name>}}", schema.names())),
                },
            }
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(text(rest)?);
        }
        Ok(Template { source: t.to_string(), pieces })
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
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

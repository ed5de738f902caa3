//! A pipeline's declared records: the transaction's fields (types, constraints,
//! derived fields) and the decision's shape, compiled at load into **slots**.
//!
//! The engine knows no business field by name. A pipeline's `schema.toml` declares
//! them (format: `docs/pipeline-model.md`); [`Schema::from_toml`] compiles it once.
//! A transaction is then a [`Tx`]: one [`Value`] per slot, raw fields in declaration
//! order followed by derived ones. JSON ingress decodes straight into the slots
//! ([`Schema::decode_json`]: no per-transaction map, every error naming its field);
//! between stages the slots travel in the compact binary codec and are checked
//! against the schema on arrival ([`Schema::check`]). Derived fields are CEL: this
//! crate reserves their slots and the engine computes them (it owns the expression
//! compiler), once, at ingress.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

pub use crate::tx::Scalar;

/// Most fields (raw and derived) a schema may declare.
pub const MAX_FIELDS: usize = 256;
/// Default longest string value, in bytes.
pub const DEFAULT_MAX_LEN: usize = 1024;
/// Default most entries of a map field.
pub const DEFAULT_MAX_ENTRIES: usize = 64;
/// Default longest key of a map field, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 128;

/// The type of a declared field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// UTF-8 text.
    String,
    /// A 64-bit integer (JSON integers only).
    Int,
    /// A double (JSON numbers).
    Float,
    /// true / false.
    Bool,
    /// An instant: RFC 3339 string or integer ns since the epoch in JSON, int ns to rules.
    Timestamp,
    /// One string among declared `values`; stored as its index.
    Enum,
    /// An open object of scalars (bool, int, float, string), read as `tx.<map>.<key>`.
    Map,
}

impl FieldType {
    /// The name as written in `schema.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
            FieldType::Enum => "enum",
            FieldType::Map => "map",
        }
    }
}

/// One value of a transaction's slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// Absent (an optional field, or a derived field not computed yet).
    Null,
    /// bool.
    Bool(bool),
    /// int and timestamp (ns since the epoch).
    Int(i64),
    /// float.
    Float(f64),
    /// string.
    Str(String),
    /// enum: the index into the field's `values`.
    Enum(u32),
    /// map: entries sorted by key, keys unique.
    Map(Vec<(String, Scalar)>),
}

impl Value {
    /// The entry `key` of a map value.
    pub fn map_get(&self, key: &str) -> Option<&Scalar> {
        match self {
            Value::Map(m) => m.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| &m[i].1),
            _ => None,
        }
    }
}

/// A transaction: one value per slot of its pipeline's [`Schema`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tx {
    /// Raw fields in declaration order, then derived fields.
    pub values: Vec<Value>,
}

/// A declared field (raw or derived).
#[derive(Debug, Clone)]
pub struct FieldDecl {
    /// Its name, as JSON and rules spell it.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// May be absent / null.
    pub optional: bool,
    /// What it means (for the JSON Schema).
    pub description: Option<String>,
    /// Strings: longest value in bytes; maps: longest string value.
    pub max_len: usize,
    /// Strings: shortest value in bytes (default 0).
    pub min_len: usize,
    /// int / float: inclusive lower bound.
    pub min: Option<f64>,
    /// int / float: inclusive upper bound.
    pub max: Option<f64>,
    /// Strings: a regular expression the whole value matches.
    pub pattern: Option<Arc<regex::Regex>>,
    /// Enums: the allowed strings, in index order.
    pub values: Arc<[String]>,
    /// Maps: most entries.
    pub max_entries: usize,
    /// Maps: longest key in bytes.
    pub max_key_len: usize,
    /// Derived fields: the CEL source computing it, and its line in `schema.toml`.
    pub derived: Option<(String, Option<usize>)>,
    /// Its line in `schema.toml`.
    pub line: Option<usize>,
}

/// What every decision carries besides the engine's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionDecl {
    /// Outcome names in rising severity; the first is the default.
    pub outcomes: Vec<String>,
    /// Slots of the transaction fields echoed under `fields`.
    pub fields: Vec<usize>,
    /// Names of the computed features echoed under `features` (checked against the
    /// stages by the pipeline), with their lines in `schema.toml`.
    pub features: Vec<(String, Option<usize>)>,
}

/// A compiled schema.
#[derive(Debug, Clone)]
pub struct Schema {
    file: PathBuf,
    fields: Vec<FieldDecl>,
    raw: usize,
    id: usize,
    time: usize,
    decision: DecisionDecl,
}

/// An error in a file actio reads whose entries name declared fields (`schema.toml`, a
/// load scenario): file, line, the entry at fault (`-` for the file as a whole), what was
/// expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), if field == "-" { String::new() } else { format!(": field `{field}`") })]
pub struct FileError {
    /// The file at fault.
    pub file: PathBuf,
    /// Its line, when known.
    pub line: Option<usize>,
    /// The entry at fault (`field[3].max_len`, `stage[1].input`, `record.time`, …); `-`
    /// for the file as a whole.
    pub field: String,
    /// What was expected.
    pub message: String,
}

impl FileError {
    /// An error at a byte span of a file's text.
    pub fn at(file: &Path, text: &str, span: std::ops::Range<usize>, field: impl Into<String>, message: impl Into<String>) -> Self {
        FileError { file: file.to_path_buf(), line: line_of(text, span.start), field: field.into(), message: message.into() }
    }

    /// An error of the file as a whole (no line, no entry).
    pub fn whole(file: &Path, message: impl Into<String>) -> Self {
        FileError { file: file.to_path_buf(), line: None, field: "-".into(), message: message.into() }
    }

    /// Reads a file actio was told to load; failing, an error naming it.
    pub fn read(path: &Path) -> Result<String, FileError> {
        std::fs::read_to_string(path).map_err(|e| FileError::whole(path, format!("cannot read: {e}")))
    }
}

/// A transaction that does not fit its schema: which field, and what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {problem}")]
pub struct InvalidField {
    /// The field at fault (for map entries `<map>.<key>`).
    pub field: String,
    /// What was expected.
    pub problem: String,
}

impl InvalidField {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidField { field: field.into(), problem: problem.into() }
    }
}

// ── schema.toml as written ───────────────────────────────────────────────────────

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    record: RecordConfig,
    #[serde(rename = "field")]
    fields: Vec<FieldConfig>,
    #[serde(rename = "derived", default)]
    derived: Vec<DerivedConfig>,
    decision: DecisionConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordConfig {
    id: Spanned<String>,
    time: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldConfig {
    name: Spanned<String>,
    #[serde(rename = "type")]
    ty: Spanned<String>,
    #[serde(default)]
    optional: bool,
    description: Option<String>,
    max_len: Option<Spanned<usize>>,
    min_len: Option<Spanned<usize>>,
    min: Option<Spanned<f64>>,
    max: Option<Spanned<f64>>,
    pattern: Option<Spanned<String>>,
    values: Option<Spanned<Vec<String>>>,
    max_entries: Option<Spanned<usize>>,
    max_key_len: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DerivedConfig {
    name: Spanned<String>,
    #[serde(rename = "type")]
    ty: Spanned<String>,
    cel: Spanned<String>,
    #[serde(default)]
    optional: bool,
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionConfig {
    outcomes: Spanned<Vec<String>>,
    #[serde(default)]
    fields: Vec<Spanned<String>>,
    #[serde(default)]
    features: Vec<Spanned<String>>,
}

/// The 1-based line of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> Option<usize> {
    (offset <= text.len()).then(|| text[..offset].bytes().filter(|b| *b == b'\n').count() + 1)
}

/// A TOML parse error of `text` as (line, message): the message quotes the offending
/// line, which names the field where the parser's message does not. Every file actio
/// reads reports its syntax errors through this.
pub fn toml_error(text: &str, e: &toml::de::Error) -> (Option<usize>, String) {
    let line = e.span().and_then(|s| line_of(text, s.start));
    let at = line.and_then(|l| text.lines().nth(l - 1)).map(|l| format!(" (at `{}`)", l.trim())).unwrap_or_default();
    (line, format!("{}{at}", e.message().trim()))
}

/// Whether `s` is an identifier rules can name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && !s.starts_with(|c: char| c.is_ascii_digit()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

struct Loader<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Loader<'_> {
    fn err<T>(&self, at: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) -> FileError {
        FileError { file: self.file.to_path_buf(), line: line_of(self.text, at.span().start), field: field.into(), message: message.into() }
    }

    fn line<T>(&self, at: &Spanned<T>) -> Option<usize> {
        line_of(self.text, at.span().start)
    }
}

/// Every field type, in the order error messages list them.
const ALL_TYPES: [FieldType; 7] = [FieldType::String, FieldType::Int, FieldType::Float, FieldType::Bool, FieldType::Timestamp, FieldType::Enum, FieldType::Map];

/// A type by the name `schema.toml` spells it ([`FieldType::as_str`]).
fn parse_type(s: &str) -> Option<FieldType> {
    ALL_TYPES.into_iter().find(|t| t.as_str() == s)
}

impl Schema {
    /// Loads and compiles a `schema.toml`.
    pub fn load(path: &Path) -> Result<Schema, FileError> {
        Self::from_toml(&FileError::read(path)?, path)
    }

    /// Compiles schema text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &Path) -> Result<Schema, FileError> {
        let raw: SchemaFile = toml::from_str(text).map_err(|e| {
            let (line, message) = toml_error(text, &e);
            FileError { file: file.to_path_buf(), line, field: "-".into(), message }
        })?;
        let l = Loader { file, text };
        let mut fields: Vec<FieldDecl> = Vec::new();
        for (i, f) in raw.fields.iter().enumerate() {
            let at = format!("field[{i}]");
            let name = f.name.get_ref();
            Self::check_name(&l, &fields, &f.name, &at)?;
            let ty = parse_type(f.ty.get_ref()).ok_or_else(|| l.err(&f.ty, format!("field \"{name}\".type"), format!("unknown type {:?}; expected one of {}", f.ty.get_ref(), ALL_TYPES.map(FieldType::as_str).join(", "))))?;
            let only = |opt: bool, key: &str, for_types: &str, span: std::ops::Range<usize>| -> Result<(), FileError> {
                if opt {
                    return Err(FileError {
                        file: file.to_path_buf(),
                        line: line_of(text, span.start),
                        field: format!("field \"{name}\".{key}"),
                        message: format!("`{key}` applies to {for_types} fields only, not to a {} field", ty.as_str()),
                    });
                }
                Ok(())
            };
            let is = |t: &[FieldType]| t.contains(&ty);
            if let Some(v) = &f.max_len {
                only(!is(&[FieldType::String, FieldType::Map]), "max_len", "string and map", v.span())?;
            }
            if let Some(v) = &f.min_len {
                only(!is(&[FieldType::String]), "min_len", "string", v.span())?;
                if *v.get_ref() > f.max_len.as_ref().map_or(DEFAULT_MAX_LEN, |m| *m.get_ref()) {
                    return Err(l.err(v, format!("field \"{name}\".min_len"), "expected min_len ≤ max_len"));
                }
            }
            for (key, v) in [("min", &f.min), ("max", &f.max)] {
                if let Some(v) = v {
                    only(!is(&[FieldType::Int, FieldType::Float]), key, "int and float", v.span())?;
                    if !v.get_ref().is_finite() {
                        return Err(l.err(v, format!("field \"{name}\".{key}"), "expected a finite number"));
                    }
                }
            }
            if let (Some(lo), Some(hi)) = (&f.min, &f.max)
                && lo.get_ref() > hi.get_ref()
            {
                return Err(l.err(hi, format!("field \"{name}\".max"), format!("expected max ≥ min ({})", lo.get_ref())));
            }
            if let Some(v) = &f.pattern {
                only(!is(&[FieldType::String]), "pattern", "string", v.span())?;
            }
            if let Some(v) = &f.values {
                only(!is(&[FieldType::Enum]), "values", "enum", v.span())?;
            }
            for (key, v) in [("max_entries", &f.max_entries), ("max_key_len", &f.max_key_len)] {
                if let Some(v) = v {
                    only(!is(&[FieldType::Map]), key, "map", v.span())?;
                }
            }
            for (key, v) in [("max_len", &f.max_len), ("max_entries", &f.max_entries), ("max_key_len", &f.max_key_len)] {
                if let Some(v) = v
                    && (*v.get_ref() == 0 || *v.get_ref() > 1 << 20)
                {
                    return Err(l.err(v, format!("field \"{name}\".{key}"), "expected 1..=1048576"));
                }
            }
            let pattern = match &f.pattern {
                Some(p) => Some(Arc::new(
                    regex::Regex::new(&format!("^(?:{})$", p.get_ref()))
                        .map_err(|e| l.err(p, format!("field \"{name}\".pattern"), format!("not a regular expression: {e}")))?,
                )),
                None => None,
            };
            let values: Arc<[String]> = match (&f.values, ty) {
                (Some(v), _) => {
                    let vs = v.get_ref();
                    if vs.is_empty() {
                        return Err(l.err(v, format!("field \"{name}\".values"), "expected at least one value"));
                    }
                    if let Some(d) = vs.iter().enumerate().find(|(i, x)| vs[..*i].contains(x)) {
                        return Err(l.err(v, format!("field \"{name}\".values"), format!("{:?} is listed twice", d.1)));
                    }
                    vs.clone().into()
                }
                (None, FieldType::Enum) => return Err(l.err(&f.ty, format!("field \"{name}\".values"), "an enum field needs `values` (its allowed strings)")),
                (None, _) => Arc::from(Vec::new()),
            };
            fields.push(FieldDecl {
                name: name.clone(),
                ty,
                optional: f.optional || ty == FieldType::Map,
                description: f.description.clone(),
                max_len: f.max_len.as_ref().map_or(DEFAULT_MAX_LEN, |v| *v.get_ref()),
                min_len: f.min_len.as_ref().map_or(0, |v| *v.get_ref()),
                min: f.min.as_ref().map(|v| *v.get_ref()),
                max: f.max.as_ref().map(|v| *v.get_ref()),
                pattern,
                values,
                max_entries: f.max_entries.as_ref().map_or(DEFAULT_MAX_ENTRIES, |v| *v.get_ref()),
                max_key_len: f.max_key_len.as_ref().map_or(DEFAULT_MAX_KEY_LEN, |v| *v.get_ref()),
                derived: None,
                line: l.line(&f.name),
            });
        }
        let raw_len = fields.len();
        for (i, d) in raw.derived.iter().enumerate() {
            let at = format!("derived[{i}]");
            let name = d.name.get_ref();
            Self::check_name(&l, &fields, &d.name, &at)?;
            let ty = parse_type(d.ty.get_ref())
                .filter(|t| !matches!(t, FieldType::Enum | FieldType::Map))
                .ok_or_else(|| l.err(&d.ty, format!("derived \"{name}\".type"), format!("unknown type {:?} for a derived field; expected one of string, int, float, bool, timestamp", d.ty.get_ref())))?;
            fields.push(FieldDecl {
                name: name.clone(),
                ty,
                optional: d.optional,
                description: d.description.clone(),
                max_len: usize::MAX,
                min_len: 0,
                min: None,
                max: None,
                pattern: None,
                values: Arc::from(Vec::new()),
                max_entries: 0,
                max_key_len: 0,
                derived: Some((d.cel.get_ref().clone(), l.line(&d.cel))),
                line: l.line(&d.name),
            });
        }
        if fields.len() > MAX_FIELDS {
            return Err(FileError { file: file.to_path_buf(), line: None, field: "field".into(), message: format!("at most {MAX_FIELDS} fields and derived fields") });
        }
        let find = |s: &Spanned<String>, key: &str, want: FieldType| -> Result<usize, FileError> {
            let i = fields.iter().take(raw_len).position(|f| f.name == *s.get_ref()).ok_or_else(|| l.err(s, key, format!("unknown field {:?}; declare it in a [[field]]", s.get_ref())))?;
            if fields[i].ty != want || fields[i].optional {
                return Err(l.err(s, key, format!("field {:?} must be a required {} field", s.get_ref(), want.as_str())));
            }
            Ok(i)
        };
        let id = find(&raw.record.id, "record.id", FieldType::String)?;
        let time = find(&raw.record.time, "record.time", FieldType::Timestamp)?;
        let outcomes = raw.decision.outcomes.get_ref().clone();
        if outcomes.is_empty() || outcomes.len() > 16 {
            return Err(l.err(&raw.decision.outcomes, "decision.outcomes", "expected 1..=16 outcome names, mildest first"));
        }
        for (i, o) in outcomes.iter().enumerate() {
            if !is_identifier(o) {
                return Err(l.err(&raw.decision.outcomes, "decision.outcomes", format!("expected identifiers, got {o:?}")));
            }
            if outcomes[..i].contains(o) {
                return Err(l.err(&raw.decision.outcomes, "decision.outcomes", format!("{o:?} is listed twice")));
            }
        }
        let mut echo = Vec::new();
        for (i, f) in raw.decision.fields.iter().enumerate() {
            let slot = fields.iter().position(|x| x.name == *f.get_ref()).ok_or_else(|| {
                l.err(f, format!("decision.fields[{i}]"), format!("unknown field {:?}; declared: {}", f.get_ref(), fields.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")))
            })?;
            if echo.contains(&slot) {
                return Err(l.err(f, format!("decision.fields[{i}]"), format!("{:?} is listed twice", f.get_ref())));
            }
            echo.push(slot);
        }
        let features = raw.decision.features.iter().map(|f| (f.get_ref().clone(), l.line(f))).collect();
        Ok(Schema { file: file.to_path_buf(), fields, raw: raw_len, id, time, decision: DecisionDecl { outcomes, fields: echo, features } })
    }

    fn check_name(l: &Loader<'_>, fields: &[FieldDecl], name: &Spanned<String>, at: &str) -> Result<(), FileError> {
        let n = name.get_ref();
        if !is_identifier(n) {
            return Err(l.err(name, format!("{at}.name"), format!("expected an identifier of [A-Za-z0-9_] (not starting with a digit, ≤ 64), got {n:?}")));
        }
        if fields.iter().any(|f| f.name == *n) {
            return Err(l.err(name, format!("{at}.name"), format!("field {n:?} is declared twice")));
        }
        Ok(())
    }

    /// The file it was loaded from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Every field, raw then derived, in slot order.
    pub fn fields(&self) -> &[FieldDecl] {
        &self.fields
    }

    /// The raw (ingress) fields.
    pub fn raw_fields(&self) -> &[FieldDecl] {
        &self.fields[..self.raw]
    }

    /// The slot of a field by name.
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// The field in `slot`.
    pub fn field(&self, slot: usize) -> &FieldDecl {
        &self.fields[slot]
    }

    /// Every field's name, for error messages.
    pub fn names(&self) -> String {
        self.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The decision's declaration.
    pub fn decision(&self) -> &DecisionDecl {
        &self.decision
    }

    /// The slot of the transaction id.
    pub fn id_slot(&self) -> usize {
        self.id
    }

    /// The slot of the event time.
    pub fn time_slot(&self) -> usize {
        self.time
    }

    /// The transaction id of `tx`.
    pub fn id_of<'a>(&self, tx: &'a Tx) -> &'a str {
        match tx.values.get(self.id) {
            Some(Value::Str(s)) => s,
            _ => "",
        }
    }

    /// The event time of `tx`, ns since the epoch.
    pub fn time_of(&self, tx: &Tx) -> i64 {
        match tx.values.get(self.time) {
            Some(Value::Int(t)) => *t,
            _ => 0,
        }
    }

    /// A transaction with every slot null (derived ones included).
    pub fn empty(&self) -> Tx {
        Tx { values: vec![Value::Null; self.fields.len()] }
    }

    /// Decodes an ingress JSON object into slots (derived ones left null) and checks
    /// every constraint. Errors name the field.
    pub fn decode_json(&self, bytes: &[u8]) -> Result<Tx, InvalidField> {
        if bytes.len() > crate::codec::MAX_PAYLOAD_BYTES {
            return Err(InvalidField::new("-", format!("payload of {} bytes is over the limit of {}", bytes.len(), crate::codec::MAX_PAYLOAD_BYTES)));
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut failed: Option<InvalidField> = None;
        let seed = TxSeed { schema: self, failed: &mut failed };
        let tx = match seed.deserialize(&mut de).and_then(|tx| de.end().map(|()| tx)) {
            Ok(tx) => tx,
            Err(e) => return Err(failed.unwrap_or_else(|| InvalidField::new("-", format!("not a JSON object of the declared fields: {e}")))),
        };
        Ok(tx)
    }

    /// Checks a transaction that came from another stage: slot count and each slot's
    /// type against the schema (internal topics are trusted to hold the constraints).
    pub fn check(&self, tx: &Tx) -> Result<(), InvalidField> {
        if tx.values.len() != self.fields.len() {
            return Err(InvalidField::new("-", format!("expected {} slots (the schema's fields), got {}: written by another schema?", self.fields.len(), tx.values.len())));
        }
        for (f, v) in self.fields.iter().zip(&tx.values) {
            let ok = match (f.ty, v) {
                (_, Value::Null) => f.optional,
                (FieldType::String, Value::Str(_)) | (FieldType::Bool, Value::Bool(_)) | (FieldType::Float, Value::Float(_)) | (FieldType::Map, Value::Map(_)) => true,
                (FieldType::Int | FieldType::Timestamp, Value::Int(_)) => true,
                (FieldType::Enum, Value::Enum(i)) => (*i as usize) < f.values.len(),
                _ => false,
            };
            if !ok {
                return Err(InvalidField::new(&f.name, format!("expected a {} value, got {v:?}", f.ty.as_str())));
            }
        }
        Ok(())
    }

    /// The ingress JSON of `tx` (raw fields only; absent optional ones left out).
    pub fn encode_json(&self, tx: &Tx) -> Vec<u8> {
        // Serializing plain values into a Vec cannot fail.
        serde_json::to_vec(&JsonOf { schema: self, tx }).unwrap_or_default()
    }

    /// A JSON value of slot `slot` of `tx` (timestamps as RFC 3339, enums as strings).
    pub fn json_value(&self, tx: &Tx, slot: usize) -> serde_json::Value {
        serde_json::to_value(SlotJson { f: &self.fields[slot], v: &tx.values[slot] }).unwrap_or(serde_json::Value::Null)
    }

    /// The key extractor over `names` (one or more required fields).
    pub fn key(&self, names: &[String]) -> Result<KeyExtractor, String> {
        if names.is_empty() {
            return Err("expected at least one key field".into());
        }
        let mut parts = Vec::new();
        for n in names {
            let slot = self.slot(n).ok_or_else(|| format!("unknown field {n:?}; declared: {}", self.names()))?;
            let f = &self.fields[slot];
            if slot >= self.raw {
                return Err(format!("field {n:?} is derived: a key is made of fields the producer sends (the load generator and producers key records before any derived field exists)"));
            }
            if f.optional || f.ty == FieldType::Map {
                return Err(format!("field {n:?} cannot be a key: a key field must be required and not a map"));
            }
            parts.push((slot, f.values.clone()));
        }
        Ok(KeyExtractor { parts })
    }
}

/// Builds a transaction's message key from its declared key fields: their values joined
/// by `|`. Compiled once at resolve time and shared by every place that needs the key.
#[derive(Debug, Clone)]
pub struct KeyExtractor {
    parts: Vec<(usize, Arc<[String]>)>,
}

impl KeyExtractor {
    /// The key of `tx`.
    pub fn key(&self, tx: &Tx) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (i, (slot, names)) in self.parts.iter().enumerate() {
            if i > 0 {
                out.push('|');
            }
            match tx.values.get(*slot) {
                Some(Value::Str(s)) => out.push_str(s),
                Some(Value::Int(v)) => {
                    let _ = write!(out, "{v}");
                }
                Some(Value::Float(v)) => {
                    let _ = write!(out, "{v}");
                }
                Some(Value::Bool(v)) => {
                    let _ = write!(out, "{v}");
                }
                Some(Value::Enum(e)) => out.push_str(names.get(*e as usize).map_or("", String::as_str)),
                _ => {}
            }
        }
        out
    }
}

// ── JSON ingress: decoded straight into slots ──────────────────────────────────────

struct TxSeed<'s, 'f> {
    schema: &'s Schema,
    failed: &'f mut Option<InvalidField>,
}

impl<'de> DeserializeSeed<'de> for TxSeed<'_, '_> {
    type Value = Tx;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Tx, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TxSeed<'_, '_> {
    type Value = Tx;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of the schema's fields")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tx, A::Error> {
        let s = self.schema;
        let mut tx = s.empty();
        let mut seen = [0u64; MAX_FIELDS / 64];
        let raw = s.raw_fields();
        while let Some(key) = map.next_key::<KeyStr<'de>>()? {
            let k = key.as_str();
            let Some(slot) = raw.iter().position(|f| f.name.len() == k.len() && f.name == k) else {
                let named = if k.is_empty() { "\"\"" } else { k };
                *self.failed = Some(InvalidField::new(named, format!("unknown field; the schema declares: {}", raw.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "))));
                return Err(de::Error::custom("unknown field"));
            };
            let f = &raw[slot];
            if seen[slot / 64] & (1 << (slot % 64)) != 0 {
                *self.failed = Some(InvalidField::new(k, "given twice"));
                return Err(de::Error::custom("duplicate field"));
            }
            seen[slot / 64] |= 1 << (slot % 64);
            let mut problem: Option<InvalidField> = None;
            match map.next_value_seed(ValueSeed { f, problem: &mut problem }) {
                Ok(v) => tx.values[slot] = v,
                Err(e) => {
                    // Without a problem of the value's own, the JSON itself broke off
                    // (syntax, EOF): undecodable, not a bad field.
                    *self.failed = Some(problem.unwrap_or_else(|| InvalidField::new("-", format!("not JSON (in the value of `{}`): {e}", f.name))));
                    return Err(e);
                }
            }
        }
        for (slot, f) in raw.iter().enumerate() {
            if seen[slot / 64] & (1 << (slot % 64)) == 0 {
                if f.ty == FieldType::Map {
                    tx.values[slot] = Value::Map(Vec::new());
                } else if !f.optional {
                    *self.failed = Some(InvalidField::new(&f.name, format!("missing (a required {} field)", f.ty.as_str())));
                    return Err(de::Error::custom("missing field"));
                }
            }
        }
        Ok(tx)
    }
}

/// serde_json's messages end with " at line 1 column 17": the field says where.
fn strip_position(m: &str) -> String {
    m.rfind(" at line ").map_or(m, |i| &m[..i]).to_string()
}

/// A JSON key, borrowed when it has no escapes.
enum KeyStr<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl KeyStr<'_> {
    fn as_str(&self) -> &str {
        match self {
            KeyStr::Borrowed(s) => s,
            KeyStr::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for KeyStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<KeyStr<'de>, E> {
                Ok(KeyStr::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyStr<'de>, E> {
                Ok(KeyStr::Owned(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

struct ValueSeed<'a> {
    f: &'a FieldDecl,
    problem: &'a mut Option<InvalidField>,
}

impl ValueSeed<'_> {
    fn fail<E: de::Error>(&mut self, problem: String) -> E {
        *self.problem = Some(InvalidField::new(&self.f.name, problem.clone()));
        E::custom(problem)
    }

    fn wrong<E: de::Error>(&mut self, got: &str) -> E {
        let want = match self.f.ty {
            FieldType::String => "a string".to_string(),
            FieldType::Int => "an integer".to_string(),
            FieldType::Float => "a number".to_string(),
            FieldType::Bool => "true or false".to_string(),
            FieldType::Timestamp => "an RFC 3339 timestamp string or integer ns since the Unix epoch".to_string(),
            FieldType::Enum => format!("one of {:?}", self.f.values),
            FieldType::Map => "an object of booleans, numbers and strings".to_string(),
        };
        let null = if got == "null" && !self.f.optional { " (the field is required)" } else { "" };
        self.fail(format!("expected {want}, got {got}{null}"))
    }

    fn number<E: de::Error>(&mut self, v: f64, shown: &dyn fmt::Display) -> Result<(), E> {
        if let Some(lo) = self.f.min
            && v < lo
        {
            return Err(self.fail(format!("{shown} is below the minimum {lo}")));
        }
        if let Some(hi) = self.f.max
            && v > hi
        {
            return Err(self.fail(format!("{shown} is above the maximum {hi}")));
        }
        Ok(())
    }

    fn int<E: de::Error>(mut self, v: i64) -> Result<Value, E> {
        match self.f.ty {
            FieldType::Int => {
                self.number(v as f64, &v)?;
                Ok(Value::Int(v))
            }
            FieldType::Float => {
                self.number(v as f64, &v)?;
                Ok(Value::Float(v as f64))
            }
            FieldType::Timestamp if v >= 0 => Ok(Value::Int(v)),
            // Negative ns have no RFC 3339 form here: reject rather than let a
            // re-encoded copy say 1970 (found by the fuzzer).
            FieldType::Timestamp => Err(self.fail(format!("expected ns since the Unix epoch (≥ 0), got {v}"))),
            _ => Err(self.wrong("an integer")),
        }
    }

    fn string<E: de::Error>(mut self, v: &str) -> Result<Value, E> {
        match self.f.ty {
            FieldType::String => {
                if v.len() > self.f.max_len {
                    return Err(self.fail(format!("expected at most {} bytes, got {}", self.f.max_len, v.len())));
                }
                if v.len() < self.f.min_len {
                    return Err(self.fail(format!("expected at least {} byte(s), got {}", self.f.min_len, v.len())));
                }
                if let Some(p) = &self.f.pattern
                    && !p.is_match(v)
                {
                    let src = p.as_str();
                    let src = src.strip_prefix("^(?:").and_then(|s| s.strip_suffix(")$")).unwrap_or(src);
                    return Err(self.fail(format!("{v:?} does not match the pattern {src:?}")));
                }
                Ok(Value::Str(v.to_string()))
            }
            FieldType::Enum => match self.f.values.iter().position(|x| x == v) {
                Some(i) => Ok(Value::Enum(i as u32)),
                None => Err(self.fail(format!("expected one of {:?}, got {v:?}", self.f.values))),
            },
            FieldType::Timestamp => crate::time::parse_rfc3339_ns(v).map(Value::Int).ok_or_else(|| self.fail(format!("expected an RFC 3339 timestamp, got {v:?}"))),
            _ => Err(self.wrong("a string")),
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} value", self.f.ty.as_str())
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<Value, E> {
        if self.f.ty == FieldType::Bool { Ok(Value::Bool(v)) } else { Err(self.wrong("a boolean")) }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.int(v)
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<Value, E> {
        match i64::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) if self.f.ty == FieldType::Float => {
                self.number(v as f64, &v)?;
                Ok(Value::Float(v as f64))
            }
            Err(_) => Err(self.fail(format!("{v} is out of the 64-bit integer range"))),
        }
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<Value, E> {
        if self.f.ty != FieldType::Float {
            return Err(self.wrong(&format!("the number {v}")));
        }
        if !v.is_finite() {
            return Err(self.fail("expected a finite number".into()));
        }
        self.number(v, &v)?;
        Ok(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.string(v)
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<Value, E> {
        if self.f.optional {
            Ok(if self.f.ty == FieldType::Map { Value::Map(Vec::new()) } else { Value::Null })
        } else {
            Err(self.wrong("null"))
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_seq<A: de::SeqAccess<'de>>(mut self, _: A) -> Result<Value, A::Error> {
        Err(self.wrong("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        if self.f.ty != FieldType::Map {
            return Err(self.wrong("an object"));
        }
        let mut entries: Vec<(String, Scalar)> = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            if entries.len() >= self.f.max_entries {
                return Err(self.fail(format!("expected at most {} entries", self.f.max_entries)));
            }
            if k.len() > self.f.max_key_len {
                return Err(self.fail(format!("entry name longer than {} bytes", self.f.max_key_len)));
            }
            let v: Scalar = match map.next_value() {
                Ok(v) => v,
                Err(e) => {
                    *self.problem = Some(InvalidField::new(format!("{}.{k}", self.f.name), strip_position(&e.to_string())));
                    return Err(e);
                }
            };
            if let Scalar::Str(s) = &v
                && s.len() > self.f.max_len
            {
                *self.problem = Some(InvalidField::new(format!("{}.{k}", self.f.name), format!("expected at most {} bytes", self.f.max_len)));
                return Err(de::Error::custom("entry too long"));
            }
            if let Scalar::Float(x) = v
                && !x.is_finite()
            {
                *self.problem = Some(InvalidField::new(format!("{}.{k}", self.f.name), "expected a finite number"));
                return Err(de::Error::custom("not finite"));
            }
            entries.push((k, v));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(self.fail(format!("entry {:?} given twice", w[0].0)));
        }
        Ok(Value::Map(entries))
    }
}

// ── JSON egress of slots ───────────────────────────────────────────────────────────

/// The raw fields of a transaction as a JSON object.
struct JsonOf<'a> {
    schema: &'a Schema,
    tx: &'a Tx,
}

impl Serialize for JsonOf<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = self.schema.raw_fields();
        let mut m = s.serialize_map(None)?;
        for (f, v) in fields.iter().zip(&self.tx.values) {
            if *v == Value::Null || matches!(v, Value::Map(e) if e.is_empty()) {
                continue;
            }
            m.serialize_entry(&f.name, &SlotJson { f, v })?;
        }
        m.end()
    }
}

struct SlotJson<'a> {
    f: &'a FieldDecl,
    v: &'a Value,
}

impl Serialize for SlotJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.f.ty, self.v) {
            (_, Value::Null) => s.serialize_unit(),
            (FieldType::Timestamp, Value::Int(t)) => s.serialize_str(&crate::time::format_rfc3339_ns(*t)),
            (_, Value::Int(i)) => s.serialize_i64(*i),
            (_, Value::Float(x)) => s.serialize_f64(*x),
            (_, Value::Bool(b)) => s.serialize_bool(*b),
            (_, Value::Str(x)) => s.serialize_str(x),
            (_, Value::Enum(e)) => s.serialize_str(self.f.values.get(*e as usize).map_or("", String::as_str)),
            (_, Value::Map(entries)) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

// ── JSON Schema (2020-12) of the ingress and egress records ────────────────────────

impl Schema {
    fn property(f: &FieldDecl) -> serde_json::Value {
        use serde_json::json;
        let mut p = match f.ty {
            FieldType::String => {
                // Lengths are bytes at run time; JSON Schema counts characters, so the
                // bounds here are exact for ASCII and looser otherwise.
                let mut p = json!({"type": "string"});
                if f.derived.is_none() {
                    p["maxLength"] = json!(f.max_len);
                }
                if f.min_len > 0 {
                    p["minLength"] = json!(f.min_len);
                }
                if let Some(r) = &f.pattern {
                    let src = r.as_str();
                    p["pattern"] = json!(src);
                }
                p
            }
            FieldType::Int => json!({"type": "integer"}),
            FieldType::Float => json!({"type": "number"}),
            FieldType::Bool => json!({"type": "boolean"}),
            FieldType::Timestamp => json!({"oneOf": [
                {"type": "string", "format": "date-time", "description": "RFC 3339"},
                {"type": "integer", "minimum": 0, "description": "ns since the Unix epoch"}
            ]}),
            FieldType::Enum => json!({"type": "string", "enum": &*f.values}),
            FieldType::Map => json!({
                "type": "object",
                "maxProperties": f.max_entries,
                "propertyNames": {"maxLength": f.max_key_len},
                "additionalProperties": {"oneOf": [
                    {"type": "boolean"}, {"type": "integer"}, {"type": "number"},
                    {"type": "string", "maxLength": f.max_len}
                ]}
            }),
        };
        if let Some(lo) = f.min {
            p["minimum"] = json_number(lo, f.ty);
        }
        if let Some(hi) = f.max {
            p["maximum"] = json_number(hi, f.ty);
        }
        if let Some(d) = &f.description {
            p["description"] = json!(d);
        }
        if f.optional && f.ty != FieldType::Map {
            // Absent or null.
            p = json!({"anyOf": [p, {"type": "null"}]});
        }
        p
    }

    /// The JSON Schema of the ingress record (what producers write).
    pub fn ingress_json_schema(&self, title: &str) -> serde_json::Value {
        use serde_json::json;
        let props: serde_json::Map<String, serde_json::Value> = self.raw_fields().iter().map(|f| (f.name.clone(), Self::property(f))).collect();
        let required: Vec<&str> = self.raw_fields().iter().filter(|f| !f.optional).map(|f| f.name.as_str()).collect();
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": title,
            "description": format!("Generated from {} by `actio schema`; do not edit.", self.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
            "type": "object",
            "additionalProperties": false,
            "required": required,
            "properties": props,
        })
    }

    /// The JSON Schema of the egress record (the decision).
    pub fn egress_json_schema(&self, title: &str) -> serde_json::Value {
        use serde_json::json;
        let d = &self.decision;
        let echoed: serde_json::Map<String, serde_json::Value> = d.fields.iter().map(|s| (self.fields[*s].name.clone(), Self::property(&self.fields[*s]))).collect();
        let features: serde_json::Map<String, serde_json::Value> = d.features.iter().map(|(n, _)| (n.clone(), json!({"type": "number"}))).collect();
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": title,
            "description": format!("Generated from {} by `actio schema`; do not edit.", self.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
            "type": "object",
            "additionalProperties": false,
            "required": ["tx_id", "key", "decision", "score", "rule_hits", "override_rule", "model_version", "rules_version", "created_at", "fields", "features"],
            "properties": {
                "tx_id": {"type": "string", "description": "The transaction's id."},
                "key": {"type": "string", "description": "The message key the transaction travelled under."},
                "decision": {"type": "string", "enum": d.outcomes, "description": "The outcome, mildest first."},
                "score": {"type": "number", "minimum": 0, "maximum": 1, "description": "The model's score."},
                "rule_hits": {"type": "array", "items": {"type": "string"}, "description": "Ids of the active rules that fired."},
                "override_rule": {"type": ["string", "null"], "description": "The rule whose action overrode the score's outcome, if any."},
                "model_version": {"type": "string"},
                "rules_version": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time", "description": "The transaction's event time."},
                "fields": {"type": "object", "additionalProperties": false, "properties": echoed, "description": "Transaction fields echoed (schema.toml [decision] fields)."},
                "features": {"type": "object", "additionalProperties": false, "properties": features, "description": "Computed features echoed (schema.toml [decision] features); absent when not computed."},
            },
        })
    }
}

fn json_number(v: f64, ty: FieldType) -> serde_json::Value {
    if ty == FieldType::Int && v.fract() == 0.0 && v.abs() < 9.0e15 { serde_json::json!(v as i64) } else { serde_json::json!(v) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
pub(crate) mod tests {
    use super::*;

    pub(crate) const SCHEMA: &str = r#"
[record]
id = "id"
time = "at"

[[field]]
name = "id"
type = "string"
min_len = 1
max_len = 8

[[field]]
name = "who"
type = "string"
pattern = "[a-z]+"

[[field]]
name = "n"
type = "int"
min = 0
max = 100

[[field]]
name = "x"
type = "float"
optional = true

[[field]]
name = "kind"
type = "enum"
values = ["a", "b"]

[[field]]
name = "at"
type = "timestamp"

[[field]]
name = "extra"
type = "map"
max_entries = 2

[[derived]]
name = "twice"
type = "int"
cel = "tx.n * 2"

[decision]
outcomes = ["ok", "no"]
fields = ["who", "twice"]
"#;

    fn schema() -> Schema {
        Schema::from_toml(SCHEMA, Path::new("schema.toml")).unwrap()
    }

    #[test]
    fn json_decodes_into_slots_and_round_trips() {
        let s = schema();
        let tx = s.decode_json(br#"{"id":"t1","who":"ann","n":7,"kind":"b","at":"2026-11-24T12:00:00Z","extra":{"z":1,"a":"q"}}"#).unwrap();
        assert_eq!(tx.values.len(), 8);
        assert_eq!(tx.values[2], Value::Int(7));
        assert_eq!(tx.values[3], Value::Null);
        assert_eq!(tx.values[4], Value::Enum(1));
        assert_eq!(tx.values[6].map_get("a"), Some(&Scalar::Str("q".into())));
        assert_eq!(tx.values[7], Value::Null, "derived slots wait for the engine");
        assert_eq!(s.id_of(&tx), "t1");
        s.check(&Tx { values: tx.values[..7].iter().cloned().chain([Value::Int(14)]).collect() }).unwrap();
        let again = s.decode_json(&s.encode_json(&tx)).unwrap();
        assert_eq!(again, tx);
        assert_eq!(s.key(&["who".into(), "kind".into()]).unwrap().key(&tx), "ann|b");
        assert!(s.key(&["twice".into()]).unwrap_err().contains("derived"), "keys are raw fields");
    }

    #[test]
    fn every_bad_input_names_its_field() {
        let s = schema();
        let base = r#""id":"t1","who":"ann","n":7,"kind":"a","at":5"#;
        let bad = |json: String| s.decode_json(json.as_bytes()).unwrap_err();
        let e = bad(format!("{{{base},\"n2\":1}}"));
        assert_eq!(e.field, "n2", "{e}");
        assert!(e.problem.contains("unknown field"), "{e}");
        let e = bad(r#"{"id":"t1","who":"ann","n":"7","kind":"a","at":5}"#.into());
        assert_eq!((e.field.as_str(), e.problem.contains("expected an integer")), ("n", true), "{e}");
        let e = bad(r#"{"id":"t1","who":"ann","n":101,"kind":"a","at":5}"#.into());
        assert_eq!(e.field, "n", "{e}");
        assert!(e.problem.contains("maximum 100"), "{e}");
        let e = bad(r#"{"id":"t1","who":"ann","n":1.5,"kind":"a","at":5}"#.into());
        assert_eq!(e.field, "n", "{e}");
        let e = bad(r#"{"id":"","who":"ann","n":1,"kind":"a","at":5}"#.into());
        assert!(e.field == "id" && e.problem.contains("at least 1 byte"), "{e}");
        let e = bad(r#"{"id":"toolongid","who":"ann","n":1,"kind":"a","at":5}"#.into());
        assert_eq!(e.field, "id", "{e}");
        assert!(e.problem.contains("at most 8 bytes"), "{e}");
        let e = bad(r#"{"id":"t","who":"Ann","n":1,"kind":"a","at":5}"#.into());
        assert!(e.field == "who" && e.problem.contains("pattern"), "{e}");
        let e = bad(r#"{"id":"t","who":"ann","n":1,"kind":"c","at":5}"#.into());
        assert_eq!(e.field, "kind", "{e}");
        let e = bad(r#"{"id":"t","who":"ann","kind":"a","at":5}"#.into());
        assert!(e.field == "n" && e.problem.contains("missing"), "{e}");
        let e = bad(r#"{"id":"t","who":"ann","n":null,"kind":"a","at":5}"#.into());
        assert!(e.field == "n" && e.problem.contains("required"), "{e}");
        let e = bad(format!("{{{base},\"at\":6}}"));
        assert!(e.field == "at" && e.problem.contains("twice"), "{e}");
        let e = bad(r#"{"id":"t","who":"ann","n":1,"kind":"a","at":-1}"#.into());
        assert_eq!(e.field, "at", "{e}");
        let e = bad(format!("{{{base},\"extra\":{{\"a\":1,\"b\":2,\"c\":3}}}}"));
        assert_eq!(e.field, "extra", "{e}");
        let e = bad(format!("{{{base},\"extra\":{{\"a\":[1]}}}}"));
        assert_eq!(e.field, "extra.a", "{e}");
        let e = bad("[1]".into());
        assert_eq!(e.field, "-", "{e}");
        let e = bad(r#"{"id": "t", "who": "#.into());
        assert_eq!(e.field, "-", "a broken-off document is undecodable, not a bad field: {e}");
        assert!(s.decode_json(b"{").is_err());
        assert!(s.decode_json(format!("{{{base}}} x").as_bytes()).is_err(), "trailing bytes");
        s.decode_json(format!("{{{base},\"x\":null,\"extra\":null}}").as_bytes()).unwrap();
        s.decode_json(format!("{{{base},\"x\":3}}").as_bytes()).unwrap();
    }

    #[test]
    fn schema_errors_name_file_line_and_field() {
        let bad = |from: &str, to: &str| {
            assert!(SCHEMA.contains(from), "{from}");
            Schema::from_toml(&SCHEMA.replacen(from, to, 1), Path::new("schema.toml")).unwrap_err()
        };
        let e = bad("type = \"float\"", "type = \"decimal\"");
        assert_eq!(e.field, "field \"x\".type", "{e}");
        assert!(e.to_string().starts_with("schema.toml:25:"), "{e}");
        let e = bad("time = \"at\"", "time = \"when\"");
        assert_eq!((e.field.as_str(), e.line), ("record.time", Some(4)), "{e}");
        let e = bad("time = \"at\"", "time = \"n\"");
        assert!(e.message.contains("timestamp"), "{e}");
        let e = bad("fields = [\"who\", \"twice\"]", "fields = [\"who\", \"thrice\"]");
        assert_eq!(e.field, "decision.fields[1]", "{e}");
        let e = bad("pattern = \"[a-z]+\"", "pattern = \"[a-z\"");
        assert_eq!(e.field, "field \"who\".pattern", "{e}");
        let e = bad("max_entries = 2", "max_entries = 2\nmin = 1");
        assert!(e.message.contains("int and float"), "{e}");
        let e = bad("values = [\"a\", \"b\"]", "");
        assert_eq!(e.field, "field \"kind\".values", "{e}");
        let e = bad("name = \"x\"", "name = \"n\"");
        assert!(e.message.contains("declared twice"), "{e}");
        let e = bad("optional = true", "optional = true\nunknown = 1");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn the_json_schemas_list_the_declared_fields() {
        let s = schema();
        let i = s.ingress_json_schema("t");
        assert_eq!(i["required"], serde_json::json!(["id", "who", "n", "kind", "at"]));
        assert_eq!(i["properties"]["n"]["maximum"], 100);
        assert_eq!(i["properties"]["kind"]["enum"], serde_json::json!(["a", "b"]));
        let e = s.egress_json_schema("t");
        assert_eq!(e["properties"]["decision"]["enum"], serde_json::json!(["ok", "no"]));
        assert!(e["properties"]["fields"]["properties"]["twice"].is_object());
    }
}

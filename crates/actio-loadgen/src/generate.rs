//! Synthetic transactions for any pipeline, drawn field by field as a scenario file
//! says: the engine knows no business field, so neither does the load generator.
//!
//! A **scenario** (`pipelines/<name>/scenarios/*.toml`; commented example:
//! `pipelines/fraud/scenarios/baseline.toml`) gives each raw field of the pipeline's
//! schema a distribution, and declares **episodes**: short runs of correlated
//! transactions (a card-testing burst, geo hopping) so that rules actually fire.
//! [`Scenario::load`] parses the file and resolves its `base` (no schema needed);
//! [`Generator::new`] checks it against the schema and compiles it once into one
//! generator per slot, so [`Generator::next`] does no lookup by name.
//!
//! ```toml
//! seed = 42                 # optional (default 42); the CLI's --seed overrides it
//! base = "baseline.toml"    # optional: start from another scenario (relative to this file)
//! episode_share = 0.02      # share of transactions that belong to episodes (0..=1; default 0)
//!
//! [[field]]
//! name = "user_id"          # a raw field of the schema
//! gen = "zipf"
//! n = 1000000
//! exponent = 0.7
//! format = "user-{}"
//!
//! [[episode]]
//! name = "burst"
//! weight = 1                # relative frequency among episodes (default 1)
//! length = 12               # transactions per episode
//! key = "user_id"           # the field the episode's transactions share (a fresh value)
//! [[episode.field]]         # an override, drawn anew for each of its transactions
//! name = "channel"          # or `map.entry`, e.g. "attrs.synthetic_fraud"
//! gen = "const"
//! value = "ecom"
//! ```
//!
//! With `base`, a `[[field]]` or `[[episode]]` replaces the base's entry of the same
//! name in place (or is appended) and top-level keys override. A field the scenario
//! does not list is absent (optional fields) or an error (required ones); derived
//! fields are left null for the pipeline to compute at ingress.
//!
//! Generators (`gen`), and the field types they make:
//! - `id` (string): the transaction id `<run_id>-<seq>`.
//! - `send_time` (timestamp): the intended send time.
//! - `const` (any but map): `value`; timestamps take int ns or an RFC 3339 string,
//!   enums their string.
//! - `zipf` (int, string): `n`, `exponent`: a rank 1..=n with Zipf popularity.
//! - `uniform` (int, float, string, timestamp): `min`, `max`, inclusive.
//! - `lognormal` (int, float): `median`, `sigma` (default 1.0), optional `min`/`max`
//!   clamps; ints are rounded.
//! - `choice` (any but map): `values`, optional `weights` (default equal).
//! - `copy` (the copied field's type): `of`: the value of an earlier field.
//! - `mix` (any): `options = [{ share = 0.97, gen = …, … }, …]`, shares summing to 1.
//! - `map` (map): `entries = { <name> = { gen = …, … } }`, each entry a generator of a
//!   scalar.
//!
//! String fields drawn from integers (`zipf`, `uniform`) take `format`: `{}` is replaced
//! by the integer, `{:x}` by it in hex (default `"{}"`). Options on any generator:
//! - `per = "<earlier field>"`: draw from an RNG seeded by that field's value (and
//!   this field's name and the seed), so the value is a stable function of it: a
//!   card's home country, a merchant's category.
//! - `only_if = { <earlier field> = [values…] }`: generated only when that field's
//!   value is among them, absent otherwise (optional fields and map entries).
//! - `null_share = 0.1`: absent with this probability (optional fields and map entries).
//!
//! Fields are generated in the scenario's order, so `per`, `copy` and `only_if` see the
//! values drawn before. With probability `episode_share` a transaction belongs to an
//! episode: a new one starts while fewer than [`MAX_OPEN_EPISODES`] run, then an open
//! one (at random) takes the transaction. Its key field takes the episode's fresh value
//! (for `zipf` with `n`, a value in n+1..=2n, outside the normal population; for
//! `uniform`, as many values above `max`), its overrides replace the fields they name,
//! and fields drawn `per` the key follow the fresh key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actio_core::schema::{FieldDecl, FieldType, Value, line_of};
use actio_core::tx::Scalar;
use actio_core::{Schema, Tx};
use rand::distr::Uniform;
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Zipf};
use serde::Deserialize;
use toml::Spanned;

/// The seed of a scenario that sets none.
pub const DEFAULT_SEED: u64 = 42;
/// Most episodes open at once.
pub const MAX_OPEN_EPISODES: usize = 16;
/// Longest chain of `base` files.
const MAX_BASE_DEPTH: usize = 8;
/// Deepest nesting of `mix` options and `map` entries.
const MAX_NESTING: usize = 8;
/// Largest Zipf population (f64 holds every rank exactly; 2n fits i64).
const MAX_ZIPF_N: u64 = 1 << 52;

// ── The scenario file as written ─────────────────────────────────────────────────

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    seed: Option<u64>,
    base: Option<Spanned<String>>,
    episode_share: Option<Spanned<f64>>,
    #[serde(default, rename = "field")]
    fields: Vec<Spanned<GenSpec>>,
    #[serde(default, rename = "episode")]
    episodes: Vec<Spanned<EpisodeSpec>>,
}

/// One generator as written: a `[[field]]`, an `[[episode.field]]`, a `mix` option or
/// a `map` entry (`name` and `share` apply to some of these only; checked on compile).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenSpec {
    name: Option<String>,
    share: Option<f64>,
    #[serde(rename = "gen")]
    kind: GenKind,
    n: Option<u64>,
    exponent: Option<f64>,
    format: Option<String>,
    min: Option<toml::Value>,
    max: Option<toml::Value>,
    median: Option<f64>,
    sigma: Option<f64>,
    values: Option<Vec<toml::Value>>,
    weights: Option<Vec<f64>>,
    value: Option<toml::Value>,
    of: Option<String>,
    options: Option<Vec<GenSpec>>,
    entries: Option<BTreeMap<String, GenSpec>>,
    per: Option<String>,
    only_if: Option<BTreeMap<String, Vec<toml::Value>>>,
    null_share: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GenKind {
    Id,
    SendTime,
    Const,
    Zipf,
    Uniform,
    Lognormal,
    Choice,
    Copy,
    Mix,
    Map,
}

impl GenKind {
    fn as_str(self) -> &'static str {
        match self {
            GenKind::Id => "id",
            GenKind::SendTime => "send_time",
            GenKind::Const => "const",
            GenKind::Zipf => "zipf",
            GenKind::Uniform => "uniform",
            GenKind::Lognormal => "lognormal",
            GenKind::Choice => "choice",
            GenKind::Copy => "copy",
            GenKind::Mix => "mix",
            GenKind::Map => "map",
        }
    }

    /// The keys besides the common options (`per`, `only_if`, `null_share`) it takes.
    fn takes(self) -> &'static [&'static str] {
        match self {
            GenKind::Id | GenKind::SendTime => &[],
            GenKind::Const => &["value"],
            GenKind::Zipf => &["n", "exponent", "format"],
            GenKind::Uniform => &["min", "max", "format"],
            GenKind::Lognormal => &["median", "sigma", "min", "max"],
            GenKind::Choice => &["values", "weights"],
            GenKind::Copy => &["of"],
            GenKind::Mix => &["options"],
            GenKind::Map => &["entries"],
        }
    }

    /// The field types it makes (map entries take any scalar), for error messages.
    fn makes(self) -> &'static str {
        match self {
            GenKind::Id => "string fields",
            GenKind::SendTime => "timestamp fields",
            GenKind::Const | GenKind::Choice => "every field type but map",
            GenKind::Zipf => "int and string fields",
            GenKind::Uniform => "int, float, string and timestamp fields",
            GenKind::Lognormal => "int and float fields",
            GenKind::Copy => "fields of the copied field's type",
            GenKind::Mix => "the types its options make",
            GenKind::Map => "map fields",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EpisodeSpec {
    name: String,
    weight: Option<f64>,
    length: u32,
    key: String,
    #[serde(default, rename = "field")]
    fields: Vec<Spanned<GenSpec>>,
}

// ── The scenario, resolved ───────────────────────────────────────────────────────

/// Where an entry was written: errors name it.
#[derive(Debug, Clone)]
struct Loc {
    file: Arc<Path>,
    line: Option<usize>,
}

impl Loc {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ScenarioError {
        ScenarioError { file: self.file.to_path_buf(), line: self.line, field: field.into(), message: message.into() }
    }
}

#[derive(Debug, Clone)]
struct FieldEntry {
    name: String,
    spec: GenSpec,
    at: Loc,
}

#[derive(Debug, Clone)]
struct EpisodeEntry {
    name: String,
    weight: f64,
    length: u32,
    key: String,
    fields: Vec<FieldEntry>,
    at: Loc,
}

/// A scenario file, parsed and its `base` resolved; [`Generator::new`] checks it
/// against a schema.
#[derive(Debug, Clone)]
pub struct Scenario {
    file: PathBuf,
    seed: u64,
    episode_share: f64,
    episode_share_at: Option<Loc>,
    fields: Vec<FieldEntry>,
    episodes: Vec<EpisodeEntry>,
}

/// An error in a scenario file: file (a base file when the entry came from it), line
/// (when known), the entry at fault (`field "user_id"`, `episode "burst".key`, …), what
/// was expected. The same type as the schema's errors.
pub type ScenarioError = actio_core::FileError;

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

impl Scenario {
    /// Loads a scenario TOML (resolving `base`); errors name file, line (when known)
    /// and field.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        Self::from_toml(&ScenarioError::read(path)?, path)
    }

    /// Parses scenario text; `file` names it in errors and anchors a relative `base`.
    pub fn from_toml(text: &str, file: &Path) -> Result<Scenario, ScenarioError> {
        Self::parse(text, file, &mut vec![canonical(file)])
    }

    fn parse(text: &str, file: &Path, chain: &mut Vec<PathBuf>) -> Result<Scenario, ScenarioError> {
        let raw: ScenarioFile = toml::from_str(text).map_err(|e| {
            let (line, message) = actio_core::schema::toml_error(text, &e);
            ScenarioError { file: file.to_path_buf(), line, field: "-".into(), message }
        })?;
        let source: Arc<Path> = Arc::from(file);
        let loc = |span: std::ops::Range<usize>| Loc { file: source.clone(), line: line_of(text, span.start) };
        let mut sc = match &raw.base {
            Some(base) => {
                let at = loc(base.span());
                let path = file.parent().unwrap_or(Path::new("")).join(base.get_ref());
                if chain.len() > MAX_BASE_DEPTH {
                    return Err(at.err("base", format!("more than {MAX_BASE_DEPTH} bases in a chain")));
                }
                let key = canonical(&path);
                if chain.contains(&key) {
                    return Err(at.err("base", format!("{} is this scenario or one of its bases (a cycle)", path.display())));
                }
                let text = std::fs::read_to_string(&path).map_err(|e| at.err("base", format!("cannot read {}: {e}", path.display())))?;
                chain.push(key);
                let sc = Self::parse(&text, &path, chain);
                chain.pop();
                sc?
            }
            None => Scenario { file: file.to_path_buf(), seed: DEFAULT_SEED, episode_share: 0.0, episode_share_at: None, fields: Vec::new(), episodes: Vec::new() },
        };
        sc.file = file.to_path_buf();
        if let Some(seed) = raw.seed {
            sc.seed = seed;
        }
        if let Some(share) = &raw.episode_share {
            let at = loc(share.span());
            if !(0.0..=1.0).contains(share.get_ref()) {
                return Err(at.err("episode_share", format!("expected a share within 0..=1, got {}", share.get_ref())));
            }
            sc.episode_share = *share.get_ref();
            sc.episode_share_at = Some(at);
        }
        let fields = Self::entries(&raw.fields, &loc, "field")?;
        merge(&mut sc.fields, fields, |f| &f.name);
        let mut episodes: Vec<EpisodeEntry> = Vec::new();
        for (i, e) in raw.episodes.iter().enumerate() {
            let at = loc(e.span());
            let spec = e.get_ref();
            let label = format!("episode {:?}", spec.name);
            if spec.name.is_empty() {
                return Err(at.err(format!("episode[{i}].name"), "expected a name"));
            }
            if episodes.iter().any(|x| x.name == spec.name) {
                return Err(at.err(label, "declared twice in this file"));
            }
            let weight = spec.weight.unwrap_or(1.0);
            if !(weight.is_finite() && weight > 0.0) {
                return Err(at.err(format!("{label}.weight"), format!("expected a positive number, got {weight}")));
            }
            if spec.length == 0 {
                return Err(at.err(format!("{label}.length"), "expected at least 1 transaction"));
            }
            let fields = Self::entries(&spec.fields, &loc, &format!("{label}.field"))?;
            if let Some(f) = fields.iter().find(|f| f.name == spec.key) {
                return Err(f.at.err(format!("{label}.field {:?}", f.name), "this is the episode's key (it takes the episode's fresh value); it cannot also be overridden"));
            }
            episodes.push(EpisodeEntry { name: spec.name.clone(), weight, length: spec.length, key: spec.key.clone(), fields, at });
        }
        merge(&mut sc.episodes, episodes, |e| &e.name);
        Ok(sc)
    }

    /// The named generators of a `[[field]]` list, each with its line.
    fn entries(list: &[Spanned<GenSpec>], loc: &dyn Fn(std::ops::Range<usize>) -> Loc, what: &str) -> Result<Vec<FieldEntry>, ScenarioError> {
        let mut out: Vec<FieldEntry> = Vec::new();
        for (i, f) in list.iter().enumerate() {
            let at = loc(f.span());
            let spec = f.get_ref();
            let Some(name) = spec.name.clone() else {
                return Err(at.err(format!("{what}[{i}]"), "expected a `name` (the field it generates)"));
            };
            if spec.share.is_some() {
                return Err(at.err(format!("{what} {name:?}.share"), "`share` applies to the options of a gen = \"mix\" only"));
            }
            if out.iter().any(|x| x.name == name) {
                return Err(at.err(format!("{what} {name:?}"), "declared twice in this file"));
            }
            out.push(FieldEntry { name, spec: spec.clone(), at });
        }
        Ok(out)
    }

    /// The seed (same seed, same transactions).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The same scenario with another seed (the CLI's `--seed` overrides the file's).
    pub fn with_seed(mut self, seed: u64) -> Scenario {
        self.seed = seed;
        self
    }

    /// The file it was loaded from.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// Entries of `over` replace those of `base` with the same name in place; the others
/// are appended.
fn merge<T>(base: &mut Vec<T>, over: Vec<T>, name: impl Fn(&T) -> &String) {
    for e in over {
        match base.iter().position(|b| name(b) == name(&e)) {
            Some(i) => base[i] = e,
            None => base.push(e),
        }
    }
}

// ── Compiled generators ──────────────────────────────────────────────────────────

/// Cumulative weights: draws an index with probability proportional to its weight.
#[derive(Debug, Clone)]
struct Pick {
    cum: Vec<f64>,
}

impl Pick {
    fn new(weights: &[f64]) -> Result<Pick, String> {
        let mut cum = Vec::with_capacity(weights.len());
        let mut total = 0.0;
        for w in weights {
            if !(w.is_finite() && *w >= 0.0) {
                return Err(format!("expected weights ≥ 0, got {w}"));
            }
            total += w;
            cum.push(total);
        }
        // Every weight is finite and ≥ 0, so the total is too.
        if total <= 0.0 {
            return Err("expected at least one weight > 0".into());
        }
        Ok(Pick { cum })
    }

    fn draw<R: Rng>(&self, rng: &mut R) -> usize {
        let total = self.cum.last().copied().unwrap_or(0.0);
        let u = rng.random::<f64>() * total;
        self.cum.partition_point(|c| *c <= u).min(self.cum.len() - 1)
    }
}

/// `format`: `{}` is the integer, `{:x}` the integer in hex.
#[derive(Debug, Clone)]
struct Format {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Dec,
    Hex,
}

impl Format {
    fn parse(s: &str) -> Result<Format, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find(['{', '}']) {
            if i > 0 {
                parts.push(Part::Lit(rest[..i].to_string()));
            }
            rest = &rest[i..];
            if let Some(r) = rest.strip_prefix("{}") {
                parts.push(Part::Dec);
                rest = r;
            } else if let Some(r) = rest.strip_prefix("{:x}") {
                parts.push(Part::Hex);
                rest = r;
            } else {
                return Err(format!("`format` {s:?}: expected `{{}}` (the integer) or `{{:x}}` (in hex) and no other braces"));
            }
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Format { parts })
    }

    fn render(&self, n: i64) -> String {
        let mut out = String::with_capacity(24);
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Dec => {
                    let _ = write!(out, "{n}");
                }
                Part::Hex => {
                    let _ = write!(out, "{n:x}");
                }
            }
        }
        out
    }
}

/// What an integer draw becomes.
#[derive(Debug, Clone)]
enum IntOut {
    Int,
    Str(Format),
}

impl IntOut {
    fn value(&self, n: i64) -> Value {
        match self {
            IntOut::Int => Value::Int(n),
            IntOut::Str(f) => Value::Str(f.render(n)),
        }
    }
}

#[derive(Debug, Clone)]
enum IntDraw {
    Zipf { dist: Zipf<f64>, n: i64 },
    Uniform { dist: Uniform<i64>, lo: i64, hi: i64 },
}

impl IntDraw {
    fn sample<R: Rng>(&self, rng: &mut R) -> i64 {
        match self {
            IntDraw::Zipf { dist, n } => (dist.sample(rng) as i64).clamp(1, *n),
            IntDraw::Uniform { dist, .. } => dist.sample(rng),
        }
    }

    /// The population's extremes.
    fn range(&self) -> (i64, i64) {
        match self {
            IntDraw::Zipf { n, .. } => (1, *n),
            IntDraw::Uniform { lo, hi, .. } => (*lo, *hi),
        }
    }
}

#[derive(Debug, Clone)]
enum Node {
    Id,
    SendTime,
    /// The open episode's fresh key.
    EpisodeKey,
    Const(Value),
    Int { draw: IntDraw, out: IntOut },
    Float(Uniform<f64>),
    LogNormal { dist: LogNormal<f64>, lo: f64, hi: f64, round: bool },
    Choice { values: Vec<Value>, pick: Pick },
    /// `names`: an enum copied into a map entry becomes its string.
    Copy { slot: usize, names: Option<Arc<[String]>> },
    Mix { pick: Pick, options: Vec<Gen> },
    /// Entries sorted by name, as [`Value::Map`] keeps them.
    Map(Vec<(String, Gen)>),
}

#[derive(Debug, Clone, Copy)]
struct Per {
    slot: usize,
    salt: u64,
}

/// One compiled generator with its options.
#[derive(Debug, Clone)]
struct Gen {
    node: Node,
    per: Option<Per>,
    /// Every (slot, allowed values) must hold, or the value is absent.
    only_if: Vec<(usize, Vec<Value>)>,
    null_share: f64,
}

impl Gen {
    fn plain(node: Node) -> Gen {
        Gen { node, per: None, only_if: Vec::new(), null_share: 0.0 }
    }
}

/// A slot and its generator, in generation order.
#[derive(Debug, Clone)]
struct Step {
    slot: usize,
    generator: Gen,
}

#[derive(Debug, Clone)]
struct EpisodeKind {
    name: String,
    length: u32,
    /// Draws the fresh key of a new episode.
    fresh: (Uniform<i64>, IntOut),
    program: Vec<Step>,
}

#[derive(Debug)]
struct OpenEpisode {
    kind: usize,
    key: Value,
    left: u32,
}

/// What a generator may read besides the transaction so far.
struct Cx<'a> {
    seq: u64,
    created_at: i64,
    run_id: &'a str,
    key: Option<&'a Value>,
}

/// The hash of each slot's value, computed at its first `per` read in a transaction
/// (several fields drawn `per` the card hash it once).
struct PerHashes<'a>(&'a mut [Option<u64>]);

impl PerHashes<'_> {
    fn of(&mut self, tx: &Tx, slot: usize) -> u64 {
        *self.0[slot].get_or_insert_with(|| value_hash(&tx.values[slot]))
    }
}

/// A stable pseudo-random number of `x` (splitmix64's finalizer), so that a value drawn
/// `per` an entity is the same every time.
fn hash(x: u64, salt: u64) -> u64 {
    let mut z = x.wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn bytes_hash(b: &[u8]) -> u64 {
    let mut h = hash(b.len() as u64, 0x5CA1_AB1E);
    for c in b.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = hash(h ^ u64::from_le_bytes(w), 1);
    }
    h
}

fn scalar_hash(s: &Scalar) -> u64 {
    match s {
        Scalar::Bool(b) => hash(*b as u64, 11),
        Scalar::Int(i) => hash(*i as u64, 12),
        Scalar::Float(x) => hash(x.to_bits(), 13),
        Scalar::Str(s) => bytes_hash(s.as_bytes()),
    }
}

fn value_hash(v: &Value) -> u64 {
    match v {
        Value::Null => 0x0BAD_5EED,
        Value::Bool(b) => hash(*b as u64, 2),
        Value::Int(i) => hash(*i as u64, 3),
        Value::Float(x) => hash(x.to_bits(), 4),
        Value::Str(s) => bytes_hash(s.as_bytes()),
        Value::Enum(i) => hash(u64::from(*i), 5),
        Value::Map(m) => m.iter().fold(hash(m.len() as u64, 6), |h, (k, s)| hash(h ^ bytes_hash(k.as_bytes()) ^ scalar_hash(s).rotate_left(17), 7)),
    }
}

fn eval<R: Rng>(g: &Gen, tx: &Tx, rng: &mut R, cx: &Cx<'_>, hashes: &mut PerHashes<'_>) -> Value {
    for (slot, allowed) in &g.only_if {
        if !allowed.contains(&tx.values[*slot]) {
            return Value::Null;
        }
    }
    match g.per {
        Some(p) => draw(g, tx, &mut SmallRng::seed_from_u64(hash(hashes.of(tx, p.slot), p.salt)), cx, hashes),
        None => draw(g, tx, rng, cx, hashes),
    }
}

fn draw<R: Rng>(g: &Gen, tx: &Tx, rng: &mut R, cx: &Cx<'_>, hashes: &mut PerHashes<'_>) -> Value {
    if g.null_share > 0.0 && rng.random_bool(g.null_share) {
        return Value::Null;
    }
    match &g.node {
        Node::Id => Value::Str(id(cx.run_id, cx.seq)),
        Node::SendTime => Value::Int(cx.created_at),
        Node::EpisodeKey => cx.key.cloned().unwrap_or(Value::Null),
        Node::Const(v) => v.clone(),
        Node::Int { draw, out } => out.value(draw.sample(rng)),
        Node::Float(d) => Value::Float(d.sample(rng)),
        Node::LogNormal { dist, lo, hi, round } => {
            let x = dist.sample(rng).clamp(*lo, *hi);
            if *round { Value::Int(x.round() as i64) } else { Value::Float(x) }
        }
        Node::Choice { values, pick } => values[pick.draw(rng)].clone(),
        Node::Copy { slot, names } => match (&tx.values[*slot], names) {
            (Value::Enum(i), Some(names)) => names.get(*i as usize).map_or(Value::Null, |s| Value::Str(s.clone())),
            (v, _) => v.clone(),
        },
        Node::Mix { pick, options } => eval(&options[pick.draw(rng)], tx, rng, cx, hashes),
        Node::Map(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (k, g) in entries {
                let s = match eval(g, tx, rng, cx, hashes) {
                    Value::Bool(b) => Scalar::Bool(b),
                    Value::Int(i) => Scalar::Int(i),
                    Value::Float(x) => Scalar::Float(x),
                    Value::Str(s) => Scalar::Str(s),
                    // Null is an absent entry; compile admits no enum or map here.
                    _ => continue,
                };
                out.push((k.clone(), s));
            }
            Value::Map(out)
        }
    }
}

fn id(run_id: &str, seq: u64) -> String {
    let mut s = String::with_capacity(run_id.len() + 21);
    s.push_str(run_id);
    let _ = write!(s, "-{seq}");
    s
}

// ── Compiling a scenario against a schema ────────────────────────────────────────

/// What a generator makes: a field, or an entry of a map field.
#[derive(Clone, Copy)]
enum Target<'a> {
    Field(&'a FieldDecl),
    Entry(&'a FieldDecl),
}

impl Target<'_> {
    fn optional(self) -> bool {
        match self {
            Target::Field(f) => f.optional,
            Target::Entry(_) => true,
        }
    }

    fn describe(self) -> String {
        match self {
            Target::Field(f) => format!("a{} {} field", if f.ty == FieldType::Int { "n" } else { "" }, f.ty.as_str()),
            Target::Entry(m) => format!("an entry of the map field {:?}", m.name),
        }
    }
}

/// Where a generator sits: for errors, `per` salts and dependency checks.
struct Site<'a> {
    at: &'a Loc,
    /// `field "device_id".options[0]`
    label: String,
    /// `device_id.options[0]`: salts `per` draws.
    path: String,
    /// Slots generated before this one.
    placed: &'a [bool],
    depth: usize,
}

impl Site<'_> {
    fn err(&self, message: impl Into<String>) -> ScenarioError {
        self.at.err(&self.label, message)
    }

    fn nested(&self, label: &str, path: &str) -> Site<'_> {
        Site { at: self.at, label: format!("{}{label}", self.label), path: format!("{}{path}", self.path), placed: self.placed, depth: self.depth + 1 }
    }
}

struct Compiler<'a> {
    schema: &'a Schema,
    seed: u64,
    run_id: &'a str,
}

fn number(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(x) if x.is_finite() => Some(*x),
        _ => None,
    }
}

fn check_range(f: &FieldDecl, lo: f64, hi: f64) -> Result<(), String> {
    if let Some(m) = f.min
        && lo < m
    {
        return Err(format!("draws {lo}, below the field's minimum {m}"));
    }
    if let Some(m) = f.max
        && hi > m
    {
        return Err(format!("draws {hi}, above the field's maximum {m}"));
    }
    Ok(())
}

fn check_str(target: Target<'_>, s: &str) -> Result<(), String> {
    let f = match target {
        Target::Field(f) | Target::Entry(f) => f,
    };
    if s.len() > f.max_len {
        return Err(format!("{s:?} is longer than the field's max_len {}", f.max_len));
    }
    if let (Target::Field(_), Some(p)) = (target, &f.pattern)
        && !p.is_match(s)
    {
        let src = p.as_str();
        let src = src.strip_prefix("^(?:").and_then(|s| s.strip_suffix(")$")).unwrap_or(src);
        return Err(format!("{s:?} does not match the field's pattern {src:?}"));
    }
    Ok(())
}

/// A TOML value as a value of `target`, checked against its constraints.
fn value_for(target: Target<'_>, v: &toml::Value) -> Result<Value, String> {
    let f = match target {
        Target::Entry(_) => {
            return match v {
                toml::Value::Boolean(b) => Ok(Value::Bool(*b)),
                toml::Value::Integer(i) => Ok(Value::Int(*i)),
                toml::Value::Float(x) if x.is_finite() => Ok(Value::Float(*x)),
                toml::Value::String(s) => check_str(target, s).map(|()| Value::Str(s.clone())),
                _ => Err(format!("expected a boolean, number or string for a map entry, got {}", v.type_str())),
            };
        }
        Target::Field(f) => f,
    };
    match (f.ty, v) {
        (FieldType::String, toml::Value::String(s)) => check_str(target, s).map(|()| Value::Str(s.clone())),
        (FieldType::Int, toml::Value::Integer(i)) => check_range(f, *i as f64, *i as f64).map(|()| Value::Int(*i)),
        (FieldType::Float, toml::Value::Integer(_) | toml::Value::Float(_)) => {
            let x = number(v).ok_or_else(|| "expected a finite number".to_string())?;
            check_range(f, x, x).map(|()| Value::Float(x))
        }
        (FieldType::Bool, toml::Value::Boolean(b)) => Ok(Value::Bool(*b)),
        (FieldType::Timestamp, toml::Value::Integer(i)) if *i >= 0 => Ok(Value::Int(*i)),
        (FieldType::Timestamp, toml::Value::Integer(i)) => Err(format!("expected ns since the Unix epoch (≥ 0), got {i}")),
        (FieldType::Timestamp, toml::Value::String(s)) => actio_core::time::parse_rfc3339_ns(s).map(Value::Int).ok_or_else(|| format!("expected an RFC 3339 timestamp, got {s:?}")),
        (FieldType::Timestamp, toml::Value::Datetime(d)) => {
            actio_core::time::parse_rfc3339_ns(&d.to_string()).map(Value::Int).ok_or_else(|| format!("expected a full RFC 3339 date-time with offset, got {d}"))
        }
        (FieldType::Enum, toml::Value::String(s)) => match f.values.iter().position(|x| x == s) {
            Some(i) => Ok(Value::Enum(i as u32)),
            None => Err(format!("{s:?} is not one of the field's values {:?}", f.values)),
        },
        (FieldType::Map, _) => Err("a map field is generated by gen = \"map\"".into()),
        _ => Err(format!("expected a {} value, got a {}", f.ty.as_str(), v.type_str())),
    }
}

impl Compiler<'_> {
    /// The slot of a raw field the scenario names.
    fn raw_slot(&self, name: &str, at: &Loc, label: &str) -> Result<usize, ScenarioError> {
        let raw: Vec<&str> = self.schema.raw_fields().iter().map(|f| f.name.as_str()).collect();
        match self.schema.slot(name) {
            Some(s) if s < raw.len() => Ok(s),
            Some(_) => Err(at.err(label, format!("{name:?} is a derived field: the pipeline computes it at ingress"))),
            None => Err(at.err(label, format!("unknown field {name:?}; the schema's raw fields: {}", raw.join(", ")))),
        }
    }

    /// The slot of a field a generator depends on (`key` names the option), which must
    /// be generated before it.
    fn dependency(&self, name: &str, key: &str, site: &Site<'_>) -> Result<usize, ScenarioError> {
        let slot = self.raw_slot(name, site.at, &format!("{}.{key}", site.label))?;
        if !site.placed[slot] {
            return Err(site.at.err(format!("{}.{key}", site.label), format!("{name:?} is not generated before this field; `{key}` must name an earlier field of the scenario")));
        }
        Ok(slot)
    }

    fn compile(&self, spec: &GenSpec, target: Target<'_>, site: &Site<'_>) -> Result<Gen, ScenarioError> {
        if site.depth > MAX_NESTING {
            return Err(site.err(format!("nested deeper than {MAX_NESTING} levels")));
        }
        let kind = spec.kind;
        let given = [
            ("n", spec.n.is_some()),
            ("exponent", spec.exponent.is_some()),
            ("format", spec.format.is_some()),
            ("min", spec.min.is_some()),
            ("max", spec.max.is_some()),
            ("median", spec.median.is_some()),
            ("sigma", spec.sigma.is_some()),
            ("values", spec.values.is_some()),
            ("weights", spec.weights.is_some()),
            ("value", spec.value.is_some()),
            ("of", spec.of.is_some()),
            ("options", spec.options.is_some()),
            ("entries", spec.entries.is_some()),
        ];
        for (key, present) in given {
            if present && !kind.takes().contains(&key) {
                let takes = if kind.takes().is_empty() { "no settings but per, only_if, null_share".to_string() } else { kind.takes().join(", ") };
                return Err(site.err(format!("`{key}` does not apply to gen = {:?} (it takes {takes})", kind.as_str())));
            }
        }
        let mismatch = || site.err(format!("gen = {:?} cannot make {} (it makes {})", kind.as_str(), target.describe(), kind.makes()));
        let need = |key: &str| site.err(format!("gen = {:?} needs `{key}`", kind.as_str()));
        let fit = |r: Result<(), String>, key: &str| r.map_err(|m| site.err(format!("`{key}`: {m}")));

        let only_if = match &spec.only_if {
            None => Vec::new(),
            Some(conds) => {
                if !target.optional() {
                    return Err(site.err(format!("`only_if` applies to optional fields and map entries; this is {} the schema requires", target.describe())));
                }
                let mut out = Vec::new();
                for (name, values) in conds {
                    let slot = self.dependency(name, "only_if", site)?;
                    let on = Target::Field(self.schema.field(slot));
                    let values = values.iter().map(|v| value_for(on, v)).collect::<Result<Vec<_>, _>>().map_err(|m| site.err(format!("`only_if.{name}`: {m}")))?;
                    out.push((slot, values));
                }
                out
            }
        };
        let null_share = match spec.null_share {
            None => 0.0,
            Some(p) if !(0.0..=1.0).contains(&p) => return Err(site.err(format!("`null_share`: expected a share within 0..=1, got {p}"))),
            Some(_) if !target.optional() => return Err(site.err(format!("`null_share` applies to optional fields and map entries; this is {} the schema requires", target.describe()))),
            Some(p) => p,
        };
        let per = match &spec.per {
            None => None,
            Some(name) => Some(Per { slot: self.dependency(name, "per", site)?, salt: hash(bytes_hash(site.path.as_bytes()), self.seed) }),
        };
        let ty = match target {
            Target::Field(f) => Some(f.ty),
            Target::Entry(_) => None,
        };

        let node = match kind {
            GenKind::Id => {
                match ty {
                    Some(FieldType::String) | None => {}
                    _ => return Err(mismatch()),
                }
                for s in [id(self.run_id, 0), id(self.run_id, u64::MAX)] {
                    fit(check_str(target, &s), "id")?;
                }
                Node::Id
            }
            GenKind::SendTime => match ty {
                Some(FieldType::Timestamp) | None => Node::SendTime,
                _ => return Err(mismatch()),
            },
            GenKind::Const => {
                if ty == Some(FieldType::Map) {
                    return Err(mismatch());
                }
                let v = spec.value.as_ref().ok_or_else(|| need("value"))?;
                Node::Const(value_for(target, v).map_err(|m| site.err(format!("`value`: {m}")))?)
            }
            GenKind::Zipf => {
                let out = self.int_out(spec, target, site, &mismatch, false)?;
                let n = spec.n.ok_or_else(|| need("n"))?;
                let exponent = spec.exponent.ok_or_else(|| need("exponent"))?;
                if !(1..=MAX_ZIPF_N).contains(&n) {
                    return Err(site.err(format!("`n`: expected 1..={MAX_ZIPF_N}, got {n}")));
                }
                if !(exponent.is_finite() && exponent >= 0.0) {
                    return Err(site.err(format!("`exponent`: expected a number ≥ 0, got {exponent}")));
                }
                let dist = Zipf::new(n as f64, exponent).map_err(|e| site.err(format!("zipf: {e}")))?;
                let draw = IntDraw::Zipf { dist, n: n as i64 };
                self.check_ints(&draw, &out, target, site)?;
                Node::Int { draw, out }
            }
            GenKind::Uniform => {
                let lo = spec.min.as_ref().ok_or_else(|| need("min"))?;
                let hi = spec.max.as_ref().ok_or_else(|| need("max"))?;
                let ints = matches!((lo, hi), (toml::Value::Integer(_), toml::Value::Integer(_)));
                let floats = ty == Some(FieldType::Float) || (ty.is_none() && !ints && spec.format.is_none());
                if floats {
                    let (Some(a), Some(b)) = (number(lo), number(hi)) else {
                        return Err(site.err("`min` and `max`: expected finite numbers"));
                    };
                    if a > b {
                        return Err(site.err(format!("`max` ({b}) is below `min` ({a})")));
                    }
                    if let Target::Field(f) = target {
                        fit(check_range(f, a, b), "min/max")?;
                    }
                    Node::Float(Uniform::new_inclusive(a, b).map_err(|e| site.err(format!("uniform: {e}")))?)
                } else {
                    let out = self.int_out(spec, target, site, &mismatch, true)?;
                    let (toml::Value::Integer(a), toml::Value::Integer(b)) = (lo, hi) else {
                        return Err(site.err(format!("`min` and `max`: expected integers for {}", target.describe())));
                    };
                    let (a, b) = (*a, *b);
                    if a > b {
                        return Err(site.err(format!("`max` ({b}) is below `min` ({a})")));
                    }
                    if ty == Some(FieldType::Timestamp) && a < 0 {
                        return Err(site.err(format!("`min`: expected ns since the Unix epoch (≥ 0), got {a}")));
                    }
                    let dist = Uniform::new_inclusive(a, b).map_err(|e| site.err(format!("uniform: {e}")))?;
                    let draw = IntDraw::Uniform { dist, lo: a, hi: b };
                    self.check_ints(&draw, &out, target, site)?;
                    Node::Int { draw, out }
                }
            }
            GenKind::Lognormal => {
                let round = match ty {
                    Some(FieldType::Int) => true,
                    Some(FieldType::Float) | None => false,
                    _ => return Err(mismatch()),
                };
                let median = spec.median.ok_or_else(|| need("median"))?;
                let sigma = spec.sigma.unwrap_or(1.0);
                if !(median.is_finite() && median > 0.0) {
                    return Err(site.err(format!("`median`: expected a number > 0, got {median}")));
                }
                if !(sigma.is_finite() && sigma >= 0.0) {
                    return Err(site.err(format!("`sigma`: expected a number ≥ 0, got {sigma}")));
                }
                let bound = |v: &Option<toml::Value>, key: &str| -> Result<Option<f64>, ScenarioError> {
                    v.as_ref().map(|v| number(v).ok_or_else(|| site.err(format!("`{key}`: expected a finite number")))).transpose()
                };
                let (lo, hi) = (bound(&spec.min, "min")?, bound(&spec.max, "max")?);
                if let (Some(a), Some(b)) = (lo, hi)
                    && a > b
                {
                    return Err(site.err(format!("`max` ({b}) is below `min` ({a})")));
                }
                let (mut lo, mut hi) = (lo.unwrap_or(f64::NEG_INFINITY), hi.unwrap_or(f64::INFINITY));
                if let Target::Field(f) = target {
                    // Unbounded draws: the field's own range clamps them too.
                    if lo.is_finite() || hi.is_finite() {
                        fit(check_range(f, lo, hi), "min/max")?;
                    }
                    lo = lo.max(f.min.unwrap_or(f64::NEG_INFINITY));
                    hi = hi.min(f.max.unwrap_or(f64::INFINITY));
                }
                if round {
                    (lo, hi) = (lo.ceil(), hi.floor());
                    if lo > hi {
                        return Err(site.err("`min`..`max` holds no integer"));
                    }
                }
                let dist = LogNormal::new(median.ln(), sigma).map_err(|e| site.err(format!("lognormal: {e}")))?;
                Node::LogNormal { dist, lo, hi, round }
            }
            GenKind::Choice => {
                if ty == Some(FieldType::Map) {
                    return Err(mismatch());
                }
                let values = spec.values.as_ref().ok_or_else(|| need("values"))?;
                if values.is_empty() {
                    return Err(site.err("`values`: expected at least one value"));
                }
                let values = values.iter().enumerate().map(|(i, v)| value_for(target, v).map_err(|m| site.err(format!("`values[{i}]`: {m}")))).collect::<Result<Vec<_>, _>>()?;
                let weights = match &spec.weights {
                    Some(w) if w.len() != values.len() => return Err(site.err(format!("`weights`: expected one per value ({}), got {}", values.len(), w.len()))),
                    Some(w) => w.clone(),
                    None => vec![1.0; values.len()],
                };
                let pick = Pick::new(&weights).map_err(|m| site.err(format!("`weights`: {m}")))?;
                Node::Choice { values, pick }
            }
            GenKind::Copy => {
                let of = spec.of.as_ref().ok_or_else(|| need("of"))?;
                let slot = self.dependency(of, "of", site)?;
                let src = self.schema.field(slot);
                match target {
                    Target::Field(f) => {
                        if src.ty != f.ty || src.values != f.values {
                            return Err(site.err(format!("`of`: {of:?} is a {} field; it cannot be copied into {}", src.ty.as_str(), target.describe())));
                        }
                        if src.optional && !f.optional {
                            return Err(site.err(format!("`of`: {of:?} is optional (may be absent); it cannot be copied into a required field")));
                        }
                        Node::Copy { slot, names: None }
                    }
                    Target::Entry(_) => {
                        if src.ty == FieldType::Map {
                            return Err(site.err(format!("`of`: {of:?} is a map field; a map entry holds a scalar")));
                        }
                        Node::Copy { slot, names: (src.ty == FieldType::Enum).then(|| src.values.clone()) }
                    }
                }
            }
            GenKind::Mix => {
                let options = spec.options.as_ref().ok_or_else(|| need("options"))?;
                if options.is_empty() {
                    return Err(site.err("`options`: expected at least one option"));
                }
                let mut shares = Vec::with_capacity(options.len());
                let mut gens = Vec::with_capacity(options.len());
                for (i, o) in options.iter().enumerate() {
                    let sub = site.nested(&format!(".options[{i}]"), &format!(".options[{i}]"));
                    if o.name.is_some() {
                        return Err(sub.err("`name` applies to [[field]] entries only"));
                    }
                    let share = o.share.ok_or_else(|| sub.err("expected a `share` (of the field's draws)"))?;
                    if !(share.is_finite() && share >= 0.0) {
                        return Err(sub.err(format!("`share`: expected a number ≥ 0, got {share}")));
                    }
                    shares.push(share);
                    gens.push(self.compile(o, target, &sub)?);
                }
                let total: f64 = shares.iter().sum();
                if (total - 1.0).abs() > 1e-6 {
                    return Err(site.err(format!("`options`: the shares sum to {total}, not 1")));
                }
                Node::Mix { pick: Pick::new(&shares).map_err(|m| site.err(format!("`options`: {m}")))?, options: gens }
            }
            GenKind::Map => {
                let Target::Field(f) = target else { return Err(mismatch()) };
                if f.ty != FieldType::Map {
                    return Err(mismatch());
                }
                let entries = spec.entries.as_ref().ok_or_else(|| need("entries"))?;
                if entries.len() > f.max_entries {
                    return Err(site.err(format!("`entries`: {} entries, more than the field's max_entries {}", entries.len(), f.max_entries)));
                }
                let mut out = Vec::with_capacity(entries.len());
                for (k, e) in entries {
                    if e.name.is_some() {
                        return Err(site.err(format!("`entries.{k}.name`: the entry's name is its key; `name` applies to [[field]] entries only")));
                    }
                    out.push((k.clone(), self.entry(f, k, e, site)?));
                }
                Node::Map(out)
            }
        };
        Ok(Gen { node, per, only_if, null_share })
    }

    /// A generator of entry `key` of map field `map`.
    fn entry(&self, map: &FieldDecl, key: &str, spec: &GenSpec, site: &Site<'_>) -> Result<Gen, ScenarioError> {
        let sub = site.nested(&format!(".entries.{key}"), &format!(".{key}"));
        if key.is_empty() || key.len() > map.max_key_len {
            return Err(sub.err(format!("an entry name must be 1..={} bytes", map.max_key_len)));
        }
        if spec.share.is_some() {
            return Err(sub.err("`share` applies to the options of a gen = \"mix\" only"));
        }
        self.compile(spec, Target::Entry(map), &sub)
    }

    /// What an integer draw becomes for `target` (`format` for strings).
    fn int_out(&self, spec: &GenSpec, target: Target<'_>, site: &Site<'_>, mismatch: &dyn Fn() -> ScenarioError, timestamps: bool) -> Result<IntOut, ScenarioError> {
        let format = || Format::parse(spec.format.as_deref().unwrap_or("{}")).map_err(|m| site.err(m));
        match target {
            Target::Field(f) => match f.ty {
                FieldType::String => Ok(IntOut::Str(format()?)),
                FieldType::Int | FieldType::Timestamp if spec.format.is_some() => Err(site.err(format!("`format` applies to string fields and map entries, not to {}", target.describe()))),
                FieldType::Int => Ok(IntOut::Int),
                FieldType::Timestamp if timestamps => Ok(IntOut::Int),
                _ => Err(mismatch()),
            },
            Target::Entry(_) if spec.format.is_some() => Ok(IntOut::Str(format()?)),
            Target::Entry(_) => Ok(IntOut::Int),
        }
    }

    /// The extremes of an integer draw fit `target`.
    fn check_ints(&self, draw: &IntDraw, out: &IntOut, target: Target<'_>, site: &Site<'_>) -> Result<(), ScenarioError> {
        let (lo, hi) = draw.range();
        Self::check_extremes(lo, hi, out, target).map_err(|m| site.err(m))
    }

    fn check_extremes(lo: i64, hi: i64, out: &IntOut, target: Target<'_>) -> Result<(), String> {
        match (out, target) {
            (IntOut::Str(f), _) => {
                for n in [lo, hi] {
                    check_str(target, &f.render(n))?;
                }
                Ok(())
            }
            (IntOut::Int, Target::Field(f)) => check_range(f, lo as f64, hi as f64),
            (IntOut::Int, Target::Entry(_)) => Ok(()),
        }
    }
}

// ── The generator ────────────────────────────────────────────────────────────────

/// Makes the transactions of a scenario; deterministic per seed.
pub struct Generator {
    schema: Arc<Schema>,
    run_id: String,
    rng: StdRng,
    normal: Vec<Step>,
    kinds: Vec<EpisodeKind>,
    /// Picks the kind of a new episode (None without episodes).
    pick_kind: Option<Pick>,
    episode_share: f64,
    open: Vec<OpenEpisode>,
    /// Map slots: an absent map is an empty one (as JSON ingress decodes it).
    map_slots: Vec<usize>,
    /// Scratch for [`PerHashes`], one entry per slot.
    hashes: Vec<Option<u64>>,
    file: PathBuf,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("scenario", &self.file)
            .field("run_id", &self.run_id)
            .field("fields", &self.normal.len())
            .field("episodes", &self.kinds.iter().map(|k| k.name.as_str()).collect::<Vec<_>>())
            .field("open_episodes", &self.open.len())
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// Checks `scenario` against `schema` and compiles it: every field it names exists
    /// and its generator fits the field's type, every required raw field has a
    /// generator, and `per`, `copy` and `only_if` name earlier fields. `run_id`
    /// prefixes the transaction ids. Errors name the scenario file and field.
    pub fn new(schema: Arc<Schema>, scenario: &Scenario, run_id: &str) -> Result<Generator, ScenarioError> {
        let c = Compiler { schema: &schema, seed: scenario.seed, run_id };
        let n_slots = schema.fields().len();
        let placed_before = |steps: &[Step]| {
            let mut placed = vec![false; n_slots];
            for s in steps {
                placed[s.slot] = true;
            }
            placed
        };
        let mut normal: Vec<Step> = Vec::with_capacity(scenario.fields.len());
        for fe in &scenario.fields {
            let label = format!("field {:?}", fe.name);
            let slot = c.raw_slot(&fe.name, &fe.at, &label)?;
            let placed = placed_before(&normal);
            let site = Site { at: &fe.at, label, path: fe.name.clone(), placed: &placed, depth: 0 };
            let generator = c.compile(&fe.spec, Target::Field(schema.field(slot)), &site)?;
            normal.push(Step { slot, generator });
        }
        let placed = placed_before(&normal);
        if let Some(f) = schema.raw_fields().iter().enumerate().find(|(slot, f)| !f.optional && !placed[*slot]).map(|(_, f)| f) {
            return Err(ScenarioError {
                file: scenario.file.clone(),
                line: None,
                field: format!("field {:?}", f.name),
                message: format!("the schema requires this {} field but the scenario has no generator for it; add a [[field]]", f.ty.as_str()),
            });
        }
        let mut kinds = Vec::with_capacity(scenario.episodes.len());
        for ep in &scenario.episodes {
            kinds.push(Self::episode(&c, ep, &normal, &placed_before)?);
        }
        if scenario.episode_share > 0.0 && kinds.is_empty() {
            let at = scenario.episode_share_at.clone().unwrap_or(Loc { file: Arc::from(scenario.file.as_path()), line: None });
            return Err(at.err("episode_share", "episodes need at least one [[episode]]"));
        }
        let pick_kind = if kinds.is_empty() {
            None
        } else {
            let weights: Vec<f64> = scenario.episodes.iter().map(|e| e.weight).collect();
            Some(Pick::new(&weights).map_err(|m| ScenarioError { file: scenario.file.clone(), line: None, field: "episode".into(), message: m })?)
        };
        let map_slots = schema.raw_fields().iter().enumerate().filter(|(_, f)| f.ty == FieldType::Map).map(|(s, _)| s).collect();
        Ok(Generator {
            run_id: run_id.to_string(),
            rng: StdRng::seed_from_u64(scenario.seed),
            normal,
            kinds,
            pick_kind,
            episode_share: scenario.episode_share,
            open: Vec::new(),
            map_slots,
            hashes: vec![None; n_slots],
            file: scenario.file.clone(),
            schema,
        })
    }

    /// Compiles an episode: the normal program with the key taking the episode's fresh
    /// value and the overrides in place of what they name.
    fn episode(c: &Compiler<'_>, ep: &EpisodeEntry, normal: &[Step], placed_before: &dyn Fn(&[Step]) -> Vec<bool>) -> Result<EpisodeKind, ScenarioError> {
        let schema = c.schema;
        let label = format!("episode {:?}", ep.name);
        let key_label = format!("{label}.key");
        let key_slot = c.raw_slot(&ep.key, &ep.at, &key_label)?;
        let mut program: Vec<Step> = normal.to_vec();
        let Some(kpos) = program.iter().position(|s| s.slot == key_slot) else {
            return Err(ep.at.err(key_label, format!("{:?} has no generator in the scenario; the key must be a generated field", ep.key)));
        };
        let Node::Int { draw, out } = &program[kpos].generator.node else {
            return Err(ep.at.err(key_label, format!("{:?} must be generated by gen = \"zipf\" or \"uniform\" (integers), whose population leaves fresh values outside it", ep.key)));
        };
        let (lo, hi) = draw.range();
        let fresh_hi = (hi - lo).checked_add(1).and_then(|size| hi.checked_add(size)).ok_or_else(|| ep.at.err(&key_label, "the key's population is too large to draw fresh values beyond it"))?;
        Compiler::check_extremes(hi + 1, fresh_hi, out, Target::Field(schema.field(key_slot)))
            .map_err(|m| ep.at.err(&key_label, format!("fresh keys ({}..={fresh_hi}) do not fit the field: {m}", hi + 1)))?;
        let fresh_dist = Uniform::new_inclusive(hi + 1, fresh_hi).map_err(|e| ep.at.err(&key_label, e.to_string()))?;
        let fresh = (fresh_dist, out.clone());
        program[kpos] = Step { slot: key_slot, generator: Gen::plain(Node::EpisodeKey) };

        for fe in &ep.fields {
            let flabel = format!("{label}.field {:?}", fe.name);
            let (field, entry) = match fe.name.split_once('.') {
                Some((m, e)) => (m, Some(e)),
                None => (fe.name.as_str(), None),
            };
            let slot = c.raw_slot(field, &fe.at, &flabel)?;
            if slot == key_slot {
                return Err(fe.at.err(flabel, "this is the episode's key (it takes the episode's fresh value); it cannot also be overridden"));
            }
            let pos = program.iter().position(|s| s.slot == slot);
            let placed = placed_before(&program[..pos.unwrap_or(program.len())]);
            let decl = schema.field(slot);
            match entry {
                None => {
                    let site = Site { at: &fe.at, label: flabel, path: fe.name.clone(), placed: &placed, depth: 0 };
                    let generator = c.compile(&fe.spec, Target::Field(decl), &site)?;
                    match pos {
                        Some(p) => program[p].generator = generator,
                        None => program.push(Step { slot, generator }),
                    }
                }
                Some(key) => {
                    if decl.ty != FieldType::Map {
                        return Err(fe.at.err(flabel, format!("{field:?} is a {} field; `<field>.<entry>` names an entry of a map field", decl.ty.as_str())));
                    }
                    let site = Site { at: &fe.at, label: format!("{label}.field {field:?}"), path: field.to_string(), placed: &placed, depth: 0 };
                    let generator = c.entry(decl, key, &fe.spec, &site)?;
                    match pos {
                        Some(p) => {
                            let Node::Map(entries) = &mut program[p].generator.node else {
                                return Err(fe.at.err(flabel, format!("{field:?} is not generated by gen = \"map\"; its entries cannot be overridden")));
                            };
                            match entries.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
                                Ok(i) => entries[i].1 = generator,
                                Err(i) => entries.insert(i, (key.to_string(), generator)),
                            }
                            if entries.len() > decl.max_entries {
                                return Err(fe.at.err(flabel, format!("more entries than the field's max_entries {}", decl.max_entries)));
                            }
                        }
                        None => program.push(Step { slot, generator: Gen::plain(Node::Map(vec![(key.to_string(), generator)])) }),
                    }
                }
            }
        }
        Ok(EpisodeKind { name: ep.name.clone(), length: ep.length, fresh, program })
    }

    /// The id of the `seq`-th transaction: `<run_id>-<seq>`.
    pub fn id_of(&self, seq: u64) -> String {
        id(&self.run_id, seq)
    }

    /// The `seq`-th transaction, created at `created_at` (ns; the intended send time).
    /// Deterministic per seed. Derived slots are left null: the pipeline computes them
    /// at ingress.
    pub fn next(&mut self, seq: u64, created_at: i64) -> Tx {
        let mut tx = self.schema.empty();
        let episode = if self.episode_share > 0.0 && self.rng.random_bool(self.episode_share) { self.episode_turn() } else { None };
        let (program, key) = match &episode {
            Some((kind, key)) => (&self.kinds[*kind].program, Some(key)),
            None => (&self.normal, None),
        };
        let cx = Cx { seq, created_at, run_id: &self.run_id, key };
        self.hashes.fill(None);
        let mut hashes = PerHashes(&mut self.hashes);
        for step in program {
            let v = eval(&step.generator, &tx, &mut self.rng, &cx, &mut hashes);
            tx.values[step.slot] = v;
        }
        for slot in &self.map_slots {
            if tx.values[*slot] == Value::Null {
                tx.values[*slot] = Value::Map(Vec::new());
            }
        }
        tx
    }

    /// The episode that takes this transaction, and its key: a new one while fewer
    /// than [`MAX_OPEN_EPISODES`] run, then one of the open ones at random.
    fn episode_turn(&mut self) -> Option<(usize, Value)> {
        let pick = self.pick_kind.as_ref()?;
        if self.open.len() < MAX_OPEN_EPISODES {
            let kind = pick.draw(&mut self.rng);
            let k = &self.kinds[kind];
            let key = k.fresh.1.value(k.fresh.0.sample(&mut self.rng));
            self.open.push(OpenEpisode { kind, key, left: k.length });
        }
        let i = self.rng.random_range(0..self.open.len());
        self.open[i].left -= 1;
        if self.open[i].left == 0 {
            let e = self.open.swap_remove(i);
            return Some((e.kind, e.key));
        }
        Some((self.open[i].kind, self.open[i].key.clone()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn base_entries_are_replaced_by_name_in_place() {
        let names = |s: &Scenario| s.fields.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "seed = 1\n[[field]]\nname = \"n\"\ngen = \"const\"\nvalue = 1\n[[field]]\nname = \"kind\"\ngen = \"const\"\nvalue = \"a\"\n").unwrap();
        let b = dir.path().join("b.toml");
        std::fs::write(&b, "base = \"a.toml\"\n[[field]]\nname = \"note\"\ngen = \"const\"\nvalue = \"x\"\n[[field]]\nname = \"n\"\ngen = \"const\"\nvalue = 2\n").unwrap();
        let sc = Scenario::load(&b).unwrap();
        assert_eq!(names(&sc), ["n", "kind", "note"]);
        assert_eq!(sc.seed(), 1, "top-level keys the file leaves out come from the base");
        assert!(matches!(&sc.fields[0].spec.value, Some(toml::Value::Integer(2))));
    }

    const TEST_SCHEMA: &str = r#"
[record]
id = "id"
time = "at"
[[field]]
name = "id"
type = "string"
[[field]]
name = "at"
type = "timestamp"
[[field]]
name = "flag"
type = "bool"
[[field]]
name = "n"
type = "int"
min = 0
max = 100
[[field]]
name = "kind"
type = "enum"
values = ["a", "b"]
[[field]]
name = "note"
type = "string"
optional = true
[[field]]
name = "extra"
type = "map"
[decision]
outcomes = ["ok"]
"#;

    const TEST_OK: &str = r#"
[[field]]
name = "id"
gen = "id"
[[field]]
name = "at"
gen = "send_time"
[[field]]
name = "kind"
gen = "choice"
values = ["a", "b"]
[[field]]
name = "flag"
gen = "choice"
values = [true, false]
per = "kind"
[[field]]
name = "n"
gen = "uniform"
min = 0
max = 100
[[field]]
name = "note"
gen = "zipf"
n = 10
exponent = 1.0
format = "note-{:x}"
only_if = { kind = ["b"] }
null_share = 0.5
[[field]]
name = "extra"
gen = "map"
entries = { k = { gen = "copy", of = "kind" }, t = { gen = "lognormal", median = 3.0 } }
"#;

    /// Compiles `scenario` (written to a file) against the test schema.
    fn compile(scenario: &str) -> Result<Generator, ScenarioError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, scenario).unwrap();
        let schema = Arc::new(Schema::from_toml(TEST_SCHEMA, Path::new("schema.toml")).unwrap());
        let sc = Scenario::load(&path)?;
        Generator::new(schema, &sc, "run")
    }

    fn bad(from: &str, to: &str) -> ScenarioError {
        assert!(TEST_OK.contains(from), "{from}");
        let e = compile(&TEST_OK.replacen(from, to, 1)).map(|_| ()).unwrap_err();
        assert!(e.file.ends_with("s.toml"), "{e}");
        assert!(e.to_string().starts_with(&format!("{}", e.file.display())), "{e}");
        e
    }

    #[test]
    fn a_small_schema_compiles_and_round_trips() {
        let schema = Schema::from_toml(TEST_SCHEMA, Path::new("schema.toml")).unwrap();
        let mut g = compile(TEST_OK).unwrap();
        let (mut notes, mut flags) = (0, HashMap::new());
        for i in 0..2000 {
            let t = g.next(i, 10);
            schema.decode_json(&schema.encode_json(&t)).unwrap_or_else(|e| panic!("{e}"));
            let kind = t.values[4].clone();
            if let Value::Str(s) = &t.values[5] {
                assert!(s.starts_with("note-") && kind == Value::Enum(1), "{t:?}");
                notes += 1;
            }
            let Value::Enum(k) = kind else { panic!("{t:?}") };
            assert_eq!(flags.entry(k).or_insert(t.values[2].clone()), &t.values[2], "flag per kind");
            let names = ["a", "b"];
            assert_eq!(t.values[6].map_get("k"), Some(&Scalar::Str(names[k as usize].into())));
            assert!(matches!(t.values[6].map_get("t"), Some(Scalar::Float(x)) if *x > 0.0));
        }
        assert!((300..700).contains(&notes), "half of the half with kind b: {notes}");

        // A map field the scenario leaves out is an empty map, as JSON ingress has it.
        let (without, _) = TEST_OK.split_once("[[field]]\nname = \"extra\"").unwrap();
        let mut g = compile(without).unwrap();
        let t = g.next(0, 10);
        assert_eq!(t.values[6], Value::Map(Vec::new()));
        assert_eq!(schema.decode_json(&schema.encode_json(&t)).unwrap(), t);
    }

    #[test]
    fn scenario_errors_name_file_line_and_field() {
        let e = bad("name = \"n\"\ngen = \"uniform\"", "name = \"nope\"\ngen = \"uniform\"");
        assert_eq!(e.field, "field \"nope\"", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.line, Some(17), "the [[field]] header: {e}");
        assert!(e.to_string().contains("s.toml:17: field `field \"nope\"`: unknown field"), "{e}");

        let e = bad("name = \"flag\"\ngen = \"choice\"\nvalues = [true, false]", "name = \"flag\"\ngen = \"zipf\"\nn = 3\nexponent = 1.0");
        assert_eq!(e.field, "field \"flag\"", "{e}");
        assert!(e.message.contains("zipf") && e.message.contains("bool"), "{e}");

        let e = bad("[[field]]\nname = \"n\"\ngen = \"uniform\"\nmin = 0\nmax = 100\n", "");
        assert_eq!(e.field, "field \"n\"", "{e}");
        assert!(e.message.contains("requires"), "{e}");

        let e = bad("per = \"kind\"", "per = \"n\"");
        assert_eq!(e.field, "field \"flag\".per", "{e}");
        assert!(e.message.contains("earlier"), "{e}");

        let e = bad("max = 100\n", "max = 100\nonly_if = { kind = [\"a\"] }\n");
        assert_eq!(e.field, "field \"n\"", "{e}");
        assert!(e.message.contains("only_if"), "{e}");

        let e = bad("max = 100\n", "max = 101\n");
        assert!(e.message.contains("maximum"), "{e}");
        let e = bad("gen = \"send_time\"", "gen = \"sendtime\"");
        assert!(e.line == Some(7) && e.message.contains("unknown variant"), "{e}");
        let e = bad("exponent = 1.0", "exponent = 1.0\nmedian = 2.0");
        assert!(e.field == "field \"note\"" && e.message.contains("`median` does not apply"), "{e}");
        let e = bad("only_if = { kind = [\"b\"] }", "only_if = { kind = [\"c\"] }");
        assert!(e.message.contains("\"c\""), "{e}");
        let e = bad("of = \"kind\"", "of = \"extra\"");
        assert_eq!(e.field, "field \"extra\".entries.k.of", "{e}");
        let e = bad("values = [\"a\", \"b\"]", "values = [\"a\", \"c\"]");
        assert!(e.field == "field \"kind\"" && e.message.contains("values[1]"), "{e}");
        let e = bad("exponent = 1.0\nformat = \"note-{:x}\"", "exponent = 1.0\nformat = \"note-{:?}\"");
        assert!(e.message.contains("format"), "{e}");
    }

    #[test]
    fn episode_and_base_errors_name_file_and_field() {
        let ep = |s: &str| compile(&format!("episode_share = 0.1\n{TEST_OK}\n{s}")).map(|_| ()).unwrap_err();
        let e = compile(&format!("episode_share = 0.1\n{TEST_OK}")).map(|_| ()).unwrap_err();
        assert_eq!(e.field, "episode_share", "{e}");
        let e = ep("[[episode]]\nname = \"x\"\nlength = 2\nkey = \"kind\"\n");
        assert!(e.field == "episode \"x\".key" && e.message.contains("zipf"), "{e}");
        let e = ep("[[episode]]\nname = \"x\"\nlength = 2\nkey = \"n\"\n");
        assert!(e.message.contains("maximum"), "fresh keys 101..=201 exceed n's max 100: {e}");
        let e = ep("[[episode]]\nname = \"x\"\nlength = 2\nkey = \"note\"\n[[episode.field]]\nname = \"extra.q\"\ngen = \"zipf\"\nn = 1\nexponent = 1\nper = \"nope\"\n");
        assert!(e.field.starts_with("episode \"x\".field \"extra\".entries.q.per") && e.message.contains("unknown field"), "{e}");
        let e = ep("[[episode]]\nname = \"x\"\nlength = 2\nkey = \"note\"\n[[episode.field]]\nname = \"flag.q\"\ngen = \"const\"\nvalue = 1\n");
        assert!(e.message.contains("map field"), "{e}");
        // Overrides and map entries work.
        let mut g = compile(&format!(
            "episode_share = 0.5\n{TEST_OK}\n[[episode]]\nname = \"x\"\nlength = 3\nkey = \"note\"\n[[episode.field]]\nname = \"extra.q\"\ngen = \"const\"\nvalue = \"x\"\n[[episode.field]]\nname = \"n\"\ngen = \"const\"\nvalue = 7\n"
        ))
        .unwrap();
        let mut seen = 0;
        for i in 0..1000 {
            let t = g.next(i, 0);
            if t.values[6].map_get("q").is_some() {
                seen += 1;
                assert_eq!(t.values[3], Value::Int(7));
                let Value::Str(note) = &t.values[5] else { panic!("{t:?}") };
                let k = i64::from_str_radix(note.strip_prefix("note-").unwrap(), 16).unwrap();
                assert!((11..=20).contains(&k), "fresh key: {note}");
            }
        }
        assert!((400..600).contains(&seen), "{seen}");

        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        std::fs::write(&a, "base = \"b.toml\"\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "\n\nbase = \"a.toml\"\n").unwrap();
        let e = Scenario::load(&a).unwrap_err();
        assert!(e.file.ends_with("b.toml") && e.line == Some(3) && e.field == "base" && e.message.contains("cycle"), "{e}");
        std::fs::write(&a, "base = \"missing.toml\"\n").unwrap();
        let e = Scenario::load(&a).unwrap_err();
        assert!(e.file.ends_with("a.toml") && e.field == "base", "{e}");
        std::fs::write(dir.path().join("b.toml"), "[[field]]\nname = \"nope\"\ngen = \"id\"\n").unwrap();
        std::fs::write(&a, format!("base = \"b.toml\"\n{TEST_OK}")).unwrap();
        let schema = Arc::new(Schema::from_toml(TEST_SCHEMA, Path::new("schema.toml")).unwrap());
        let e = Generator::new(schema, &Scenario::load(&a).unwrap(), "r").unwrap_err();
        assert!(e.file.ends_with("b.toml") && e.line == Some(1) && e.field == "field \"nope\"", "an entry from the base names the base: {e}");
    }
}

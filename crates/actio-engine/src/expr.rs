//! CEL expressions compiled into a typed tree that reads a [`TxState`] in place.
//!
//! The `cel` crate parses (and validates syntax); this module walks its AST once and
//! builds [`Node`]s: field reads resolved to slots of the pipeline's schema (no name
//! lookups at run time), their static types checked ([`Ty`]),
//! features resolved to slots filled once per transaction, literals pre-typed,
//! `in [..]` over literals pre-built. Evaluation allocates nothing for the common
//! cases. Semantics follow CEL for the subset rules use; an expression outside the
//! subset is a load error naming the construct.

use std::borrow::Cow;
use std::sync::Arc;

use actio_core::schema::{FieldType, Scalar, Schema, Value as Slot};
use actio_core::tx::TxState;
use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators as op};

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// null (an absent optional field).
    Null,
    /// bool.
    Bool(bool),
    /// int.
    Int(i64),
    /// double.
    Double(f64),
    /// string (borrowed from the transaction or the rule when possible).
    Str(Cow<'a, str>),
}

impl Value<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Double(_) => "double",
            Value::Str(_) => "string",
        }
    }
}

/// A failed evaluation (type error, missing value): counted, never fatal.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// The static type of an expression, inferred at load: mismatches a rule author can
/// see in the source (a string field compared with a number) are load errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// bool
    Bool,
    /// int (and timestamps, ns)
    Int,
    /// double
    Double,
    /// string (and enums)
    Str,
    /// the null literal
    Null,
    /// known only at run time (map entries)
    Dyn,
}

impl Ty {
    /// The type's name as CEL spells it.
    pub fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "int",
            Ty::Double => "double",
            Ty::Str => "string",
            Ty::Null => "null",
            Ty::Dyn => "dyn",
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::Double)
    }

    /// Whether a value of this type can be compared (==) with one of `o` meaningfully.
    fn comparable(self, o: Ty) -> bool {
        matches!(self, Ty::Dyn | Ty::Null) || matches!(o, Ty::Dyn | Ty::Null) || self == o || (self.numeric() && o.numeric())
    }

    /// The type of a declared field as rules see it.
    pub fn of_field(t: FieldType) -> Ty {
        match t {
            FieldType::String | FieldType::Enum => Ty::Str,
            FieldType::Int | FieldType::Timestamp => Ty::Int,
            FieldType::Float => Ty::Double,
            FieldType::Bool => Ty::Bool,
            FieldType::Map => Ty::Dyn,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrFn {
    StartsWith,
    EndsWith,
    Contains,
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub enum Node {
    /// A literal.
    Lit(Value<'static>),
    /// `tx.<field>`: its slot (string, int, float, bool and timestamp fields).
    Slot(usize),
    /// `tx.<field>` of an enum field: its slot and the field's values.
    Enum(usize, Arc<[String]>),
    /// `tx.<map>.<name>`: the map field's slot and the entry name.
    Entry(usize, String),
    /// `features.<name>`: its slot in the per-transaction feature table.
    Feature(usize),
    /// `!x`
    Not(Box<Node>),
    /// `-x`
    Neg(Box<Node>),
    /// `a && b`
    And(Box<Node>, Box<Node>),
    /// `a || b`
    Or(Box<Node>, Box<Node>),
    /// comparisons
    #[allow(private_interfaces)]
    Cmp(Cmp, Box<Node>, Box<Node>),
    /// arithmetic
    #[allow(private_interfaces)]
    Arith(Arith, Box<Node>, Box<Node>),
    /// `x in [literals]`
    InList(Box<Node>, Vec<Value<'static>>),
    /// `c ? a : b`
    Cond(Box<Node>, Box<Node>, Box<Node>),
    /// `has(tx.attrs.x)`, `has(tx.<optional field>)`, `has(features.x)`: present and not null.
    Has(Box<Node>),
    /// `s.startsWith(p)` and friends
    #[allow(private_interfaces)]
    Str(StrFn, Box<Node>, Box<Node>),
    /// `size(s)`
    Size(Box<Node>),
    /// `int(x)`
    ToInt(Box<Node>),
    /// `double(x)`
    ToDouble(Box<Node>),
}

/// Names an expression may refer to, fixed at load.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The pipeline's schema: `tx.<field>` resolves to a slot of it.
    pub schema: Arc<Schema>,
    /// Slots below this are visible (a derived field sees only the fields before it).
    pub visible: usize,
    /// Feature names known at this point of the chain; a rule's `features.x` gets the
    /// index of `x` here.
    pub features: Vec<String>,
}

impl Scope {
    /// Every field of `schema`, and `features`.
    pub fn new(schema: &Arc<Schema>, features: &[String]) -> Scope {
        Scope { schema: schema.clone(), visible: schema.fields().len(), features: features.to_vec() }
    }
}

/// Per-transaction feature values, in `features` order (a [`Scope::features`]; NaN =
/// absent).
pub fn feature_table(features: &[String], st: &TxState) -> Vec<f64> {
    let mut t = vec![f64::NAN; features.len()];
    for f in &st.features {
        if let Some(i) = features.iter().position(|n| **n == *f.name) {
            t[i] = f.value;
        }
    }
    t
}

fn lit(l: &LiteralValue) -> Result<Value<'static>, String> {
    Ok(match l {
        LiteralValue::Boolean(b) => Value::Bool(*b.inner()),
        LiteralValue::Int(i) => Value::Int(*i.inner()),
        LiteralValue::UInt(u) => Value::Int(i64::try_from(*u.inner()).map_err(|_| "unsigned literal out of range".to_string())?),
        LiteralValue::Double(d) => Value::Double(*d.inner()),
        LiteralValue::String(s) => Value::Str(Cow::Owned(s.inner().to_string())),
        LiteralValue::Null => Value::Null,
        LiteralValue::Bytes(_) => return Err("bytes literals are not supported".into()),
    })
}

/// Compiles a CEL source string. Errors say what is wrong in words a rule author reads.
pub fn compile(source: &str, scope: &Scope) -> Result<Node, String> {
    compile_typed(source, scope).map(|(n, _)| n)
}

/// Compiles a CEL source string and infers its static type.
pub fn compile_typed(source: &str, scope: &Scope) -> Result<(Node, Ty), String> {
    if source.len() > 4096 {
        return Err("expression longer than 4096 characters".into());
    }
    let program = cel::Program::compile(source).map_err(|e| format!("CEL syntax: {e}"))?;
    let node = compile_node(program.expression(), scope)?;
    let ty = type_of(&node, scope)?;
    Ok((node, ty))
}

fn lit_ty(v: &Value<'_>) -> Ty {
    match v {
        Value::Null => Ty::Null,
        Value::Bool(_) => Ty::Bool,
        Value::Int(_) => Ty::Int,
        Value::Double(_) => Ty::Double,
        Value::Str(_) => Ty::Str,
    }
}

/// The static type of `n`; an error for what can only fail at run time.
fn type_of(n: &Node, scope: &Scope) -> Result<Ty, String> {
    let t = |x: &Node| type_of(x, scope);
    let want_bool = |x: &Node, op: &str| -> Result<(), String> {
        match t(x)? {
            Ty::Bool | Ty::Dyn => Ok(()),
            other => Err(format!("`{op}` wants a bool, got {}{}", other.name(), describe(x, scope))),
        }
    };
    Ok(match n {
        Node::Lit(v) => lit_ty(v),
        Node::Slot(s) => Ty::of_field(scope.schema.field(*s).ty),
        Node::Enum(..) => Ty::Str,
        Node::Entry(..) => Ty::Dyn,
        Node::Feature(_) => Ty::Double,
        Node::Not(x) => {
            want_bool(x, "!")?;
            Ty::Bool
        }
        Node::Neg(x) => match t(x)? {
            v @ (Ty::Int | Ty::Double | Ty::Dyn) => v,
            other => return Err(format!("`-` wants a number, got {}{}", other.name(), describe(x, scope))),
        },
        Node::And(a, b) | Node::Or(a, b) => {
            want_bool(a, "&& / ||")?;
            want_bool(b, "&& / ||")?;
            Ty::Bool
        }
        Node::Cmp(c, a, b) => {
            let (x, y) = (t(a)?, t(b)?);
            let ok = match c {
                Cmp::Eq | Cmp::Ne => x.comparable(y),
                _ => matches!(x, Ty::Dyn) || matches!(y, Ty::Dyn) || (x.numeric() && y.numeric()) || (x == Ty::Str && y == Ty::Str),
            };
            if !ok {
                return Err(format!("cannot compare {}{} with {}{}", x.name(), describe(a, scope), y.name(), describe(b, scope)));
            }
            Ty::Bool
        }
        Node::Arith(o, a, b) => {
            let (x, y) = (t(a)?, t(b)?);
            match (x, y) {
                (Ty::Dyn, _) | (_, Ty::Dyn) => Ty::Dyn,
                (Ty::Int, Ty::Int) => Ty::Int,
                (Ty::Str, Ty::Str) if *o == Arith::Add => Ty::Str,
                _ if x.numeric() && y.numeric() && *o != Arith::Rem => Ty::Double,
                _ => return Err(format!("arithmetic on {}{} and {}{}", x.name(), describe(a, scope), y.name(), describe(b, scope))),
            }
        }
        Node::InList(x, items) => {
            let xt = t(x)?;
            if let Some(bad) = items.iter().find(|i| !xt.comparable(lit_ty(i))) {
                return Err(format!("`in` compares {}{} with a list holding {}", xt.name(), describe(x, scope), lit_ty(bad).name()));
            }
            Ty::Bool
        }
        Node::Cond(c, a, b) => {
            want_bool(c, "?:")?;
            let (x, y) = (t(a)?, t(b)?);
            if x == y { x } else if x.numeric() && y.numeric() { Ty::Double } else { Ty::Dyn }
        }
        Node::Has(_) => Ty::Bool,
        Node::Str(_, a, b) => {
            for x in [a, b] {
                if !matches!(t(x)?, Ty::Str | Ty::Dyn) {
                    return Err(format!("string function on {}{}", t(x)?.name(), describe(x, scope)));
                }
            }
            Ty::Bool
        }
        Node::Size(x) => {
            if !matches!(t(x)?, Ty::Str | Ty::Dyn) {
                return Err(format!("size() wants a string, got {}{}", t(x)?.name(), describe(x, scope)));
            }
            Ty::Int
        }
        Node::ToInt(x) => {
            t(x)?;
            Ty::Int
        }
        Node::ToDouble(x) => {
            t(x)?;
            Ty::Double
        }
    })
}

/// " (field `x`)" for a field read, to name the field in a type error.
fn describe(n: &Node, scope: &Scope) -> String {
    match n {
        Node::Slot(s) | Node::Enum(s, _) | Node::Entry(s, _) => format!(" (field `tx.{}`)", scope.schema.field(*s).name),
        Node::Feature(i) => format!(" (feature `features.{}`)", scope.features[*i]),
        _ => String::new(),
    }
}

fn select_path(e: &IdedExpr) -> Option<Vec<&str>> {
    let mut segs = Vec::new();
    let mut cur = e;
    loop {
        match &cur.expr {
            Expr::Ident(n) => {
                segs.push(n.as_str());
                segs.reverse();
                return Some(segs);
            }
            Expr::Select(s) if !s.test => {
                segs.push(s.field.as_str());
                cur = &s.operand;
            }
            _ => return None,
        }
    }
}

fn field_slot(field: &str, scope: &Scope) -> Result<usize, String> {
    let sch = &scope.schema;
    match sch.slot(field) {
        Some(s) if s < scope.visible => Ok(s),
        Some(_) => Err(format!("field `tx.{field}` is derived after this one: a derived field sees only the fields declared before it")),
        None => Err(format!("unknown transaction field `tx.{field}`; {} declares: {}", sch.file().display(), sch.fields()[..scope.visible].iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "))),
    }
}

fn path_node(path: &[&str], scope: &Scope) -> Result<Node, String> {
    match path {
        ["tx", field, name] => {
            let slot = field_slot(field, scope)?;
            if scope.schema.field(slot).ty != FieldType::Map {
                return Err(format!("`tx.{field}` is a {} field, not a map: `tx.{field}.{name}` has nothing to select", scope.schema.field(slot).ty.as_str()));
            }
            Ok(Node::Entry(slot, name.to_string()))
        }
        ["tx", field] => {
            let slot = field_slot(field, scope)?;
            let f = scope.schema.field(slot);
            match f.ty {
                FieldType::Map => Err(format!("`tx.{field}` is a map: read an entry, `tx.{field}.<name>` (with `has(tx.{field}.<name>)`)")),
                FieldType::Enum => Ok(Node::Enum(slot, f.values.clone())),
                _ => Ok(Node::Slot(slot)),
            }
        }
        ["features", name] => scope.features.iter().position(|f| f == name).map(Node::Feature).ok_or_else(|| {
            if scope.features.is_empty() {
                format!("unknown feature `features.{name}`: no features are computed before this rule set")
            } else {
                format!("unknown feature `features.{name}`; known here: {}", scope.features.join(", "))
            }
        }),
        _ => Err(format!("unknown name `{}`; rules see `tx.<field>`, `tx.<map>.<name>` and `features.<name>`", path.join("."))),
    }
}

fn compile_node(e: &IdedExpr, scope: &Scope) -> Result<Node, String> {
    let b = |x: &IdedExpr| compile_node(x, scope).map(Box::new);
    match &e.expr {
        Expr::Literal(l) => lit(l).map(Node::Lit),
        Expr::Ident(_) => path_node(&select_path(e).unwrap_or_default(), scope),
        Expr::Select(s) if s.test => {
            let path = select_path(&s.operand).ok_or("has() takes a field path like has(tx.attrs.x)")?;
            let mut full = path.clone();
            full.push(&s.field);
            Ok(Node::Has(Box::new(path_node(&full, scope)?)))
        }
        Expr::Select(_) => {
            let path = select_path(e).ok_or("field selection on a computed value is not supported")?;
            path_node(&path, scope)
        }
        Expr::Call(c) => {
            let args = &c.args;
            let two = |f: fn(Box<Node>, Box<Node>) -> Node| -> Result<Node, String> {
                match args.as_slice() {
                    [a, bb] => Ok(f(b(a)?, b(bb)?)),
                    _ => Err(format!("`{}` takes two operands", c.func_name)),
                }
            };
            match (c.func_name.as_str(), &c.target) {
                (op::LOGICAL_AND, None) => two(Node::And),
                (op::LOGICAL_OR, None) => two(Node::Or),
                (op::LOGICAL_NOT, None) if args.len() == 1 => Ok(Node::Not(b(&args[0])?)),
                (op::NEGATE, None) if args.len() == 1 => Ok(Node::Neg(b(&args[0])?)),
                (op::EQUALS, None) => two(|x, y| Node::Cmp(Cmp::Eq, x, y)),
                (op::NOT_EQUALS, None) => two(|x, y| Node::Cmp(Cmp::Ne, x, y)),
                (op::LESS, None) => two(|x, y| Node::Cmp(Cmp::Lt, x, y)),
                (op::LESS_EQUALS, None) => two(|x, y| Node::Cmp(Cmp::Le, x, y)),
                (op::GREATER, None) => two(|x, y| Node::Cmp(Cmp::Gt, x, y)),
                (op::GREATER_EQUALS, None) => two(|x, y| Node::Cmp(Cmp::Ge, x, y)),
                (op::ADD, None) => two(|x, y| Node::Arith(Arith::Add, x, y)),
                (op::SUBSTRACT, None) => two(|x, y| Node::Arith(Arith::Sub, x, y)),
                (op::MULTIPLY, None) => two(|x, y| Node::Arith(Arith::Mul, x, y)),
                (op::DIVIDE, None) => two(|x, y| Node::Arith(Arith::Div, x, y)),
                (op::MODULO, None) => two(|x, y| Node::Arith(Arith::Rem, x, y)),
                (op::CONDITIONAL, None) if args.len() == 3 => Ok(Node::Cond(b(&args[0])?, b(&args[1])?, b(&args[2])?)),
                (op::IN, None) if args.len() == 2 => {
                    let Expr::List(list) = &args[1].expr else {
                        return Err("`in` is supported over a list literal, e.g. tx.code in [7995, 6051]".into());
                    };
                    let items = list
                        .elements
                        .iter()
                        .map(|x| match &x.expr {
                            Expr::Literal(l) => lit(l),
                            _ => Err("`in` lists must hold literals only".to_string()),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Node::InList(b(&args[0])?, items))
                }
                ("startsWith" | "endsWith" | "contains", Some(t)) if args.len() == 1 => {
                    let f = match c.func_name.as_str() {
                        "startsWith" => StrFn::StartsWith,
                        "endsWith" => StrFn::EndsWith,
                        _ => StrFn::Contains,
                    };
                    Ok(Node::Str(f, b(t)?, b(&args[0])?))
                }
                ("size", None) if args.len() == 1 => Ok(Node::Size(b(&args[0])?)),
                ("size", Some(t)) if args.is_empty() => Ok(Node::Size(b(t)?)),
                ("int", None) if args.len() == 1 => Ok(Node::ToInt(b(&args[0])?)),
                ("double", None) if args.len() == 1 => Ok(Node::ToDouble(b(&args[0])?)),
                (name, _) => Err(format!("function or operator `{name}` is not supported in rules")),
            }
        }
        Expr::List(_) => Err("list literals are only supported on the right of `in`".into()),
        Expr::Map(_) | Expr::Struct(_) => Err("map and struct literals are not supported in rules".into()),
        Expr::Comprehension(_) => Err("macros over lists (all, exists, map, filter) are not supported in rules".into()),
        Expr::Unspecified => Err("empty expression".into()),
    }
}


fn num(v: &Value<'_>) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Double(d) => Some(*d),
        _ => None,
    }
}

fn values_equal(a: &Value<'_>, b: &Value<'_>) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x == y,
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Null, Value::Null) => true,
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false, // heterogeneous equality is false in CEL, not an error
        },
    }
}

impl Node {
    /// Evaluates against a transaction state and its feature table.
    pub fn eval<'a>(&'a self, st: &'a TxState, features: &[f64]) -> Result<Value<'a>, EvalError> {
        let err = |m: String| Err(EvalError(m));
        match self {
            Node::Lit(v) => Ok(match v {
                Value::Str(s) => Value::Str(Cow::Borrowed(s.as_ref())),
                other => other.clone(),
            }),
            Node::Slot(i) => Ok(match st.tx.values.get(*i) {
                Some(Slot::Str(s)) => Value::Str(Cow::Borrowed(s)),
                Some(Slot::Int(v)) => Value::Int(*v),
                Some(Slot::Float(v)) => Value::Double(*v),
                Some(Slot::Bool(v)) => Value::Bool(*v),
                _ => Value::Null,
            }),
            Node::Enum(i, names) => Ok(match st.tx.values.get(*i) {
                Some(Slot::Enum(e)) => names.get(*e as usize).map_or(Value::Null, |n| Value::Str(Cow::Borrowed(n))),
                _ => Value::Null,
            }),
            Node::Entry(i, name) => Ok(match st.tx.values.get(*i).and_then(|m| m.map_get(name)) {
                None => Value::Null,
                Some(Scalar::Bool(b)) => Value::Bool(*b),
                Some(Scalar::Int(i)) => Value::Int(*i),
                Some(Scalar::Float(f)) => Value::Double(*f),
                Some(Scalar::Str(s)) => Value::Str(Cow::Borrowed(s)),
            }),
            Node::Feature(i) => match features.get(*i) {
                Some(v) if !v.is_nan() => Ok(Value::Double(*v)),
                _ => Ok(Value::Null),
            },
            Node::Not(x) => match x.eval(st, features)? {
                Value::Bool(b) => Ok(Value::Bool(!b)),
                v => err(format!("`!` wants a bool, got {}", v.type_name())),
            },
            Node::Neg(x) => match x.eval(st, features)? {
                Value::Int(i) => i.checked_neg().map(Value::Int).ok_or_else(|| EvalError("int overflow".into())),
                Value::Double(d) => Ok(Value::Double(-d)),
                v => err(format!("`-` wants a number, got {}", v.type_name())),
            },
            // CEL's && and || are commutative about errors: false && error = false.
            Node::And(a, b) => match (a.eval(st, features), b.eval(st, features)) {
                (Ok(Value::Bool(false)), _) | (_, Ok(Value::Bool(false))) => Ok(Value::Bool(false)),
                (Ok(Value::Bool(true)), Ok(Value::Bool(true))) => Ok(Value::Bool(true)),
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(x), Ok(y)) => err(format!("`&&` wants bools, got {} and {}", x.type_name(), y.type_name())),
            },
            Node::Or(a, b) => match (a.eval(st, features), b.eval(st, features)) {
                (Ok(Value::Bool(true)), _) | (_, Ok(Value::Bool(true))) => Ok(Value::Bool(true)),
                (Ok(Value::Bool(false)), Ok(Value::Bool(false))) => Ok(Value::Bool(false)),
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(x), Ok(y)) => err(format!("`||` wants bools, got {} and {}", x.type_name(), y.type_name())),
            },
            Node::Cmp(c, a, b) => {
                let (x, y) = (a.eval(st, features)?, b.eval(st, features)?);
                match c {
                    Cmp::Eq => Ok(Value::Bool(values_equal(&x, &y))),
                    Cmp::Ne => Ok(Value::Bool(!values_equal(&x, &y))),
                    _ => {
                        let ord = match (&x, &y) {
                            (Value::Str(p), Value::Str(q)) => p.partial_cmp(q),
                            (Value::Int(p), Value::Int(q)) => p.partial_cmp(q),
                            _ => match (num(&x), num(&y)) {
                                (Some(p), Some(q)) => p.partial_cmp(&q),
                                _ => return err(format!("cannot compare {} with {}", x.type_name(), y.type_name())),
                            },
                        };
                        let Some(o) = ord else { return Ok(Value::Bool(false)) }; // NaN
                        use std::cmp::Ordering::*;
                        Ok(Value::Bool(match c {
                            Cmp::Lt => o == Less,
                            Cmp::Le => o != Greater,
                            Cmp::Gt => o == Greater,
                            _ => o != Less,
                        }))
                    }
                }
            }
            Node::Arith(o, a, b) => {
                let (x, y) = (a.eval(st, features)?, b.eval(st, features)?);
                match (&x, &y) {
                    (Value::Int(p), Value::Int(q)) => {
                        let r = match o {
                            Arith::Add => p.checked_add(*q),
                            Arith::Sub => p.checked_sub(*q),
                            Arith::Mul => p.checked_mul(*q),
                            Arith::Div => p.checked_div(*q),
                            Arith::Rem => p.checked_rem(*q),
                        };
                        r.map(Value::Int).ok_or_else(|| EvalError("int overflow or division by zero".into()))
                    }
                    (Value::Str(p), Value::Str(q)) if *o == Arith::Add => Ok(Value::Str(Cow::Owned(format!("{p}{q}")))),
                    _ => match (num(&x), num(&y)) {
                        (Some(p), Some(q)) => Ok(Value::Double(match o {
                            Arith::Add => p + q,
                            Arith::Sub => p - q,
                            Arith::Mul => p * q,
                            Arith::Div => p / q,
                            Arith::Rem => return err("`%` wants ints".into()),
                        })),
                        _ => err(format!("arithmetic on {} and {}", x.type_name(), y.type_name())),
                    },
                }
            }
            Node::InList(x, items) => {
                let v = x.eval(st, features)?;
                Ok(Value::Bool(items.iter().any(|i| values_equal(&v, i))))
            }
            Node::Cond(c, a, b) => match c.eval(st, features)? {
                Value::Bool(true) => a.eval(st, features),
                Value::Bool(false) => b.eval(st, features),
                v => err(format!("`?:` wants a bool condition, got {}", v.type_name())),
            },
            Node::Has(x) => Ok(Value::Bool(!matches!(x.eval(st, features)?, Value::Null))),
            Node::Str(f, s, p) => match (s.eval(st, features)?, p.eval(st, features)?) {
                (Value::Str(s), Value::Str(p)) => Ok(Value::Bool(match f {
                    StrFn::StartsWith => s.starts_with(p.as_ref()),
                    StrFn::EndsWith => s.ends_with(p.as_ref()),
                    StrFn::Contains => s.contains(p.as_ref()),
                })),
                (x, y) => err(format!("string function on {} and {}", x.type_name(), y.type_name())),
            },
            Node::Size(x) => match x.eval(st, features)? {
                Value::Str(s) => Ok(Value::Int(s.chars().count() as i64)),
                v => err(format!("size() wants a string, got {}", v.type_name())),
            },
            Node::ToInt(x) => match x.eval(st, features)? {
                Value::Int(i) => Ok(Value::Int(i)),
                Value::Double(d) if d.is_finite() && d.abs() < 9.2e18 => Ok(Value::Int(d.trunc() as i64)),
                Value::Str(s) => s.parse().map(Value::Int).map_err(|_| EvalError(format!("int(): not an integer: {s:?}"))),
                v => err(format!("int() of {}", v.type_name())),
            },
            Node::ToDouble(x) => match x.eval(st, features)? {
                Value::Int(i) => Ok(Value::Double(i as f64)),
                Value::Double(d) => Ok(Value::Double(d)),
                Value::Str(s) => s.parse().map(Value::Double).map_err(|_| EvalError(format!("double(): not a number: {s:?}"))),
                v => err(format!("double() of {}", v.type_name())),
            },
        }
    }

    /// Evaluates to a bool; anything else is an error.
    pub fn eval_bool(&self, st: &TxState, features: &[f64]) -> Result<bool, EvalError> {
        match self.eval(st, features)? {
            Value::Bool(b) => Ok(b),
            v => Err(EvalError(format!("the rule's `when` must be a bool, got {}", v.type_name()))),
        }
    }
}

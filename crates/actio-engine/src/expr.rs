//! CEL expressions compiled into a typed tree that reads a [`TxState`] in place.
//!
//! The `cel` crate parses (and validates syntax); this module walks its AST once and
//! builds [`Node`]s: field reads resolved to an enum (no name lookups at run time),
//! features resolved to slots filled once per transaction, literals pre-typed,
//! `in [..]` over literals pre-built. Evaluation allocates nothing for the common
//! cases. Semantics follow CEL for the subset rules use; an expression outside the
//! subset is a load error naming the construct.

use std::borrow::Cow;

use actio_core::tx::{AttrValue, TxState};
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

/// A transaction field rules can read (`tx.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxField {
    /// `tx.id`
    Id,
    /// `tx.card_id`
    CardId,
    /// `tx.account_id`
    AccountId,
    /// `tx.device_id` (null when absent)
    DeviceId,
    /// `tx.merchant_id`
    MerchantId,
    /// `tx.amount` (double, major units)
    Amount,
    /// `tx.amount_minor` (int)
    AmountMinor,
    /// `tx.currency`
    Currency,
    /// `tx.mcc` (int)
    Mcc,
    /// `tx.country`
    Country,
    /// `tx.card_country`
    CardCountry,
    /// `tx.ip_country` (null when absent)
    IpCountry,
    /// `tx.channel` ("pos", "ecom", "atm", "moto")
    Channel,
    /// `tx.card_age_days` (int)
    CardAgeDays,
    /// `tx.hour` (UTC hour of creation, int 0..23)
    Hour,
    /// `tx.created_at` (int, ns since the epoch)
    CreatedAt,
}

impl TxField {
    /// Every field, with its name.
    pub const ALL: [(&'static str, TxField); 16] = [
        ("id", TxField::Id),
        ("card_id", TxField::CardId),
        ("account_id", TxField::AccountId),
        ("device_id", TxField::DeviceId),
        ("merchant_id", TxField::MerchantId),
        ("amount", TxField::Amount),
        ("amount_minor", TxField::AmountMinor),
        ("currency", TxField::Currency),
        ("mcc", TxField::Mcc),
        ("country", TxField::Country),
        ("card_country", TxField::CardCountry),
        ("ip_country", TxField::IpCountry),
        ("channel", TxField::Channel),
        ("card_age_days", TxField::CardAgeDays),
        ("hour", TxField::Hour),
        ("created_at", TxField::CreatedAt),
    ];

    /// A field by name.
    pub fn by_name(name: &str) -> Option<TxField> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    /// Reads the field.
    pub fn read<'a>(self, st: &'a TxState) -> Value<'a> {
        let tx = &st.tx;
        let s = |v: &'a str| Value::Str(Cow::Borrowed(v));
        match self {
            TxField::Id => s(&tx.id),
            TxField::CardId => s(&tx.card_id),
            TxField::AccountId => s(&tx.account_id),
            TxField::DeviceId => tx.device_id.as_deref().map_or(Value::Null, s),
            TxField::MerchantId => s(&tx.merchant_id),
            TxField::Amount => Value::Double(tx.amount()),
            TxField::AmountMinor => Value::Int(tx.amount_minor),
            TxField::Currency => s(&tx.currency),
            TxField::Mcc => Value::Int(tx.mcc as i64),
            TxField::Country => s(&tx.country),
            TxField::CardCountry => s(&tx.card_country),
            TxField::IpCountry => tx.ip_country.as_deref().map_or(Value::Null, s),
            TxField::Channel => s(tx.channel.as_str()),
            TxField::CardAgeDays => Value::Int(tx.card_age_days as i64),
            TxField::Hour => Value::Int(tx.created_at.div_euclid(3_600_000_000_000).rem_euclid(24)),
            TxField::CreatedAt => Value::Int(tx.created_at),
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
    /// `tx.<field>`.
    Field(TxField),
    /// `tx.attrs.<name>`.
    Attr(String),
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
    /// `has(tx.attrs.x)`, `has(tx.device_id)`, `has(features.x)`: present and not null.
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
#[derive(Debug, Default, Clone)]
pub struct Scope {
    /// Feature names known at this point of the chain; a rule's `features.x` gets the
    /// index of `x` here.
    pub features: Vec<String>,
}

/// Per-transaction feature values, in [`Scope::features`] order (NaN = absent).
pub fn feature_table(scope: &Scope, st: &TxState) -> Vec<f64> {
    let mut t = vec![f64::NAN; scope.features.len()];
    for f in &st.features {
        if let Some(i) = scope.features.iter().position(|n| **n == *f.name) {
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
    if source.len() > 4096 {
        return Err("expression longer than 4096 characters".into());
    }
    let program = cel::Program::compile(source).map_err(|e| format!("CEL syntax: {e}"))?;
    compile_node(program.expression(), scope)
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

fn path_node(path: &[&str], scope: &Scope) -> Result<Node, String> {
    match path {
        ["tx", "attrs", name] => Ok(Node::Attr(name.to_string())),
        ["tx", field] => TxField::by_name(field).map(Node::Field).ok_or_else(|| {
            let names: Vec<&str> = TxField::ALL.iter().map(|(n, _)| *n).collect();
            format!("unknown transaction field `tx.{field}`; expected one of {}", names.join(", "))
        }),
        ["features", name] => scope.features.iter().position(|f| f == name).map(Node::Feature).ok_or_else(|| {
            if scope.features.is_empty() {
                format!("unknown feature `features.{name}`: no features are computed before this rule set")
            } else {
                format!("unknown feature `features.{name}`; known here: {}", scope.features.join(", "))
            }
        }),
        _ => Err(format!("unknown name `{}`; rules see `tx.<field>`, `tx.attrs.<name>` and `features.<name>`", path.join("."))),
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
                        return Err("`in` is supported over a list literal, e.g. tx.mcc in [7995, 6051]".into());
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
            Node::Field(f) => Ok(f.read(st)),
            Node::Attr(name) => Ok(match st.tx.attrs.get(name) {
                None => Value::Null,
                Some(AttrValue::Bool(b)) => Value::Bool(*b),
                Some(AttrValue::Int(i)) => Value::Int(*i),
                Some(AttrValue::Float(f)) => Value::Double(*f),
                Some(AttrValue::Str(s)) => Value::Str(Cow::Borrowed(s)),
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

//! Derived fields: the `[[derived]]` entries of a pipeline's `schema.toml`, CEL over
//! the raw fields (and the derived fields declared before), compiled at load and
//! computed once per transaction at ingress into their slots. Later stages read them
//! like any field; nothing recomputes them.

use std::sync::Arc;

use actio_core::schema::{FieldType, InvalidField, Schema, FileError, Value as Slot};
use actio_core::tx::TxState;

use crate::expr::{self, Node, Scope, Ty, Value};

#[derive(Debug)]
struct Derived {
    slot: usize,
    name: String,
    ty: FieldType,
    optional: bool,
    node: Node,
}

/// A schema's derived fields, compiled.
#[derive(Debug)]
pub struct DerivedFields {
    fields: Vec<Derived>,
}

impl DerivedFields {
    /// Compiles every derived field of `schema`; an expression that does not compile,
    /// reads a field declared after it, or whose type is not the declared one is an
    /// error naming `schema.toml`, the line and the field.
    pub fn compile(schema: &Arc<Schema>) -> Result<DerivedFields, FileError> {
        let mut fields = Vec::new();
        for (slot, f) in schema.fields().iter().enumerate() {
            let Some((cel, line)) = &f.derived else { continue };
            let err = |message: String| FileError { file: schema.file().to_path_buf(), line: *line, field: format!("derived \"{}\".cel", f.name), message };
            let scope = Scope { schema: schema.clone(), visible: slot, features: Vec::new() };
            let (node, ty) = expr::compile_typed(cel, &scope).map_err(err)?;
            let want = Ty::of_field(f.ty);
            if ty != want && ty != Ty::Dyn {
                let hint = match (want, ty) {
                    (Ty::Double, Ty::Int) => ": wrap it in double()",
                    (Ty::Int, Ty::Double) => ": wrap it in int()",
                    _ => "",
                };
                return Err(err(format!("declared {} but the expression gives {}{hint}", f.ty.as_str(), ty.name())));
            }
            fields.push(Derived { slot, name: f.name.clone(), ty: f.ty, optional: f.optional, node });
        }
        Ok(DerivedFields { fields })
    }

    /// Fills the derived slots of a transaction that just entered. A failed
    /// evaluation, or null in a required derived field, refuses the transaction.
    pub fn fill(&self, st: &mut TxState) -> Result<(), InvalidField> {
        for d in &self.fields {
            let value = match d.node.eval(st, &[]) {
                Ok(v) => to_slot(v, d.ty),
                Err(e) => Err(e.0),
            };
            let value = value.and_then(|v| if v == Slot::Null && !d.optional { Err("the expression gave null".to_string()) } else { Ok(v) });
            match value {
                Ok(v) => st.tx.values[d.slot] = v,
                Err(problem) => return Err(InvalidField { field: d.name.clone(), problem: format!("derived field: {problem}") }),
            }
        }
        Ok(())
    }
}

fn to_slot(v: Value<'_>, ty: FieldType) -> Result<Slot, String> {
    Ok(match (ty, v) {
        (_, Value::Null) => Slot::Null,
        (FieldType::Bool, Value::Bool(b)) => Slot::Bool(b),
        (FieldType::Int | FieldType::Timestamp, Value::Int(i)) => Slot::Int(i),
        (FieldType::Float, Value::Double(d)) if d.is_finite() => Slot::Float(d),
        (FieldType::Float, Value::Int(i)) => Slot::Float(i as f64),
        (FieldType::Float, Value::Double(_)) => return Err("the expression gave a non-finite number".into()),
        (FieldType::String, Value::Str(s)) => Slot::Str(s.into_owned()),
        (t, v) => return Err(format!("declared {} but the expression gave {v:?}", t.as_str())),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::path::Path;

    fn with(derived: &str) -> Result<(Arc<Schema>, DerivedFields), FileError> {
        let text = format!("{}\n{derived}{}", crate::tests::SCHEMA_FIELDS, crate::tests::DECISION);
        let schema = Arc::new(Schema::from_toml(&text, Path::new("schema.toml"))?);
        let d = DerivedFields::compile(&schema)?;
        Ok((schema, d))
    }

    #[test]
    fn derived_fields_are_computed_once_in_order() {
        let (schema, d) = with("[[derived]]\nname = \"big\"\ntype = \"bool\"\ncel = \"tx.amount > 100.0\"\n").unwrap();
        let mut st = crate::tests::state(&schema, r#"{"id":"t","user":"u","shop":"s","amount_minor":12345,"kind":"a","at":7200000000000}"#);
        d.fill(&mut st).unwrap();
        let get = |n: &str| st.tx.values[schema.slot(n).unwrap()].clone();
        assert_eq!(get("amount"), Slot::Float(123.45));
        assert_eq!(get("hour"), Slot::Int(2));
        assert_eq!(get("big"), Slot::Bool(true), "reads the derived field before it");
    }

    #[test]
    fn a_derived_field_that_fails_to_compile_or_has_the_wrong_type_is_named() {
        let e = with("[[derived]]\nname = \"bad\"\ntype = \"int\"\ncel = \"tx.amount_minor +\"\n").unwrap_err();
        assert_eq!(e.field, "derived \"bad\".cel", "{e}");
        assert!(e.message.contains("CEL syntax") && e.line.is_some(), "{e}");
        let e = with("[[derived]]\nname = \"bad\"\ntype = \"float\"\ncel = \"tx.amount_minor * 2\"\n").unwrap_err();
        assert!(e.message.contains("declared float but the expression gives int: wrap it in double()"), "{e}");
        let e = with("[[derived]]\nname = \"bad\"\ntype = \"int\"\ncel = \"tx.nope + 1\"\n").unwrap_err();
        assert!(e.message.contains("unknown transaction field `tx.nope`"), "{e}");
        let e = with("[[derived]]\nname = \"bad\"\ntype = \"int\"\ncel = \"tx.user + 1\"\n").unwrap_err();
        assert!(e.message.contains("arithmetic on string (field `tx.user`) and int"), "{e}");
    }

    #[test]
    fn a_failing_derived_field_refuses_the_transaction() {
        let (schema, d) = with("[[derived]]\nname = \"ratio\"\ntype = \"int\"\ncel = \"100 / (tx.amount_minor - 5)\"\n").unwrap();
        let mut st = TxState::new(schema.decode_json(br#"{"id":"t","user":"u","shop":"s","amount_minor":5,"kind":"a","at":0}"#).unwrap());
        let e = d.fill(&mut st).unwrap_err();
        assert_eq!(e.field, "ratio", "{e}");
    }
}

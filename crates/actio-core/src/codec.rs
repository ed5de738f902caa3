//! Wire codecs: JSON at the edges (any Kafka client can read and write it) and
//! [postcard](https://docs.rs/postcard) between stages.
//!
//! postcard is a maintained, `serde`-based compact binary format (varint integers,
//! no schema on the wire); we chose it over `bincode`, whose last release is
//! unusable. Both directions are total: bad bytes give a [`CodecError`] that names
//! the path of the field at fault, never a panic.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest payload any codec will try to decode (bytes); bigger ones are rejected
/// before parsing so that a hostile producer cannot make a stage allocate without bound.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// A payload encoding, chosen per topic in the pipeline config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// UTF-8 JSON.
    Json,
    /// postcard binary.
    Postcard,
}

/// A payload that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{codec:?} payload: {}{message}", path.as_deref().map(|p| format!("field `{p}`: ")).unwrap_or_default())]
pub struct CodecError {
    /// Which codec failed.
    pub codec: Codec,
    /// Path of the field at fault (`attrs.x`, `amount_minor`), when known.
    pub path: Option<String>,
    /// What went wrong.
    pub message: String,
}

impl Codec {
    /// Encodes a value.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        let r = match self {
            Codec::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
            Codec::Postcard => postcard::to_stdvec(value).map_err(|e| e.to_string()),
        };
        r.map_err(|message| CodecError { codec: self, path: None, message })
    }

    /// Decodes a value, naming the field at fault on error.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(CodecError {
                codec: self,
                path: None,
                message: format!("{} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit", bytes.len()),
            });
        }
        match self {
            Codec::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                    let path = e.path().to_string();
                    CodecError {
                        codec: self,
                        path: (path != ".").then_some(path),
                        message: e.into_inner().to_string(),
                    }
                })?;
                de.end().map_err(|e| CodecError { codec: self, path: None, message: e.to_string() })?;
                Ok(value)
            }
            Codec::Postcard => postcard::from_bytes(bytes)
                .map_err(|e| CodecError { codec: self, path: None, message: e.to_string() }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::schema::Schema;
    use crate::tx::TxState;

    const GOOD: &str = r#"{"id":"t1","who":"ann","n":19,"kind":"a","at":"2026-11-24T12:00:00.5Z","extra":{"3ds":false,"s":"y"}}"#;

    fn schema() -> Schema {
        Schema::from_toml(crate::schema::tests::SCHEMA, std::path::Path::new("schema.toml")).unwrap()
    }

    #[test]
    fn json_ingress_decodes_and_round_trips_through_postcard() {
        let s = schema();
        let mut tx = s.decode_json(GOOD.as_bytes()).unwrap();
        assert!(s.check(&tx).is_err(), "the derived slot is not computed yet");
        tx.values[7] = crate::schema::Value::Int(38);
        assert_eq!(s.time_of(&tx) % 1_000_000_000, 500_000_000);
        let st = TxState::new(tx);
        let bin = Codec::Postcard.encode(&st).unwrap();
        assert!(bin.len() < GOOD.len(), "postcard {} bytes vs json {}", bin.len(), GOOD.len());
        let back: TxState = Codec::Postcard.decode(&bin).unwrap();
        assert_eq!(back, st);
        s.check(&back.tx).unwrap();
    }

    #[test]
    fn oversized_and_trailing_garbage_are_errors() {
        let huge = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert!(schema().decode_json(&huge).is_err());
        assert!(Codec::Json.decode::<serde_json::Value>(&huge).is_err());
        let trailing = format!("{GOOD} {{}}");
        assert!(schema().decode_json(trailing.as_bytes()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let s = schema();
            let _ = s.decode_json(&bytes);
            if let Ok(st) = Codec::Postcard.decode::<TxState>(&bytes) {
                let _ = s.check(&st.tx);
            }
        }
    }
}

//! The `v` field every message carries.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// Protocol version 1: serializes as `1` and refuses any other number, so a message of
/// another version fails to decode with a clear error instead of being misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct V1;

impl Serialize for V1 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(PROTOCOL_VERSION)
    }
}

impl<'de> Deserialize<'de> for V1 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == PROTOCOL_VERSION {
            Ok(V1)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported protocol version {n}, this build speaks {PROTOCOL_VERSION}"
            )))
        }
    }
}

impl JsonSchema for V1 {
    fn schema_name() -> Cow<'static, str> {
        "ProtocolVersion".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "integer", "const": 1, "description": "protocol version" })
    }
}

//! Decoding with limits: every inbound payload goes through [`decode`], which turns
//! each way a message can be bad into a typed [`DecodeError`] with its [`ErrorCode`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ErrorCode;
use crate::version::PROTOCOL_VERSION;

/// Default ceiling for one message's payload (bytes).
pub const DEFAULT_MAX_PAYLOAD: usize = 256 * 1024;

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than the limit; not parsed at all.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The `v` field is missing or not the version this build speaks.
    #[error("unsupported protocol version (found {found}, expected {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// What the message said, or `missing`.
        found: String,
    },
    /// A field this version does not define.
    #[error("unknown field: {0}")]
    UnknownField(String),
    /// Anything else: not JSON, wrong types, missing fields, invalid ids.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Oversized { .. } => ErrorCode::Oversized,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownField(_) => ErrorCode::UnknownField,
            DecodeError::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

#[derive(serde::Deserialize)]
struct Probe {
    v: Option<serde_json::Value>,
}

/// Decodes `bytes` as `T`, refusing payloads over `limit` bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::Oversized {
            size: bytes.len(),
            limit,
        });
    }
    match serde_json::from_slice::<T>(bytes) {
        Ok(v) => Ok(v),
        Err(e) => {
            // Classify: a wrong version explains every other failure, so check it first.
            if let Ok(probe) = serde_json::from_slice::<Probe>(bytes) {
                match probe.v {
                    Some(serde_json::Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION) => {}
                    Some(other) => {
                        return Err(DecodeError::UnsupportedVersion {
                            found: other.to_string(),
                        });
                    }
                    None => {
                        return Err(DecodeError::UnsupportedVersion {
                            found: "missing".to_owned(),
                        });
                    }
                }
            }
            let msg = e.to_string();
            if msg.starts_with("unknown field") {
                Err(DecodeError::UnknownField(msg))
            } else {
                Err(DecodeError::Malformed(msg))
            }
        }
    }
}

/// Encodes a message. Serialization of these types cannot fail (string keys, no
/// non-finite floats); a failure would be a bug, reported as `Internal` by callers.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(msg)
}

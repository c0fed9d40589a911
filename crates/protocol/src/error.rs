//! The closed set of error codes that cross the wire, and what the transport does with each.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An error that crosses the wire: in a rejection reply, in a dead letter's
/// `Flotilla-Reason` header, in an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or JSON of the wrong shape.
    Malformed,
    /// A field this protocol version does not define.
    UnknownField,
    /// A `v` other than the one this build speaks.
    UnsupportedVersion,
    /// Larger than the configured payload limit.
    Oversized,
    /// Well-formed but breaks a rule (empty task, too few roles, ...).
    Invalid,
    /// A role that is not configured.
    UnknownRole,
    /// A session id that has no record.
    UnknownSession,
    /// A message whose body names another session than its subject.
    WrongSession,
    /// A result that is not what the task's current holder committed to the task
    /// record: a forgery (or a replay of an older attempt).
    Forged,
    /// An answer for a question nobody is waiting for (answered already, timed out, or
    /// never asked): nothing to do.
    NotAwaitingInput,
    /// The session pool is full: retry after `retry_after_ms`.
    PoolFull,
    /// A dependency (NATS, KV) failed: retry.
    Unavailable,
    /// A bug: report it.
    Internal,
}

/// What the receiver of a message does when handling fails with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient: leave the message for redelivery (nak with a delay).
    Retry,
    /// Poison: terminate it so it moves to the dead-letter queue with its reason.
    DeadLetter,
}

impl ErrorCode {
    /// The wire name (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Oversized => "oversized",
            ErrorCode::Invalid => "invalid",
            ErrorCode::UnknownRole => "unknown_role",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::WrongSession => "wrong_session",
            ErrorCode::Forged => "forged",
            ErrorCode::NotAwaitingInput => "not_awaiting_input",
            ErrorCode::PoolFull => "pool_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// What a consumer does with a message that failed with this code.
    pub fn disposition(self) -> Disposition {
        match self {
            ErrorCode::PoolFull | ErrorCode::Unavailable | ErrorCode::Internal => {
                Disposition::Retry
            }
            _ => Disposition::DeadLetter,
        }
    }

    /// The HTTP-like status used in NATS micro error headers.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::PoolFull => 503,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
            ErrorCode::Oversized => 413,
            ErrorCode::UnknownSession => 404,
            ErrorCode::NotAwaitingInput => 409,
            _ => 400,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

//! NATS header names Flotilla sets and reads.

/// JetStream de-duplication id; unique per logical message ([`crate::MessageId`]).
pub const MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context ([`crate::TraceParent`]).
pub const TRACEPARENT: &str = "traceparent";
/// The session a message belongs to (also in its subject and body; all three must agree).
pub const SESSION: &str = "Flotilla-Session";
/// Attempt number of a task dispatch (1-based).
pub const ATTEMPT: &str = "Flotilla-Attempt";
/// On a task message: the public key (an nkey) of the `serve` that signed it, registered
/// at `signer.<key>` in the session-records bucket.
pub const SIGNER: &str = "Flotilla-Signer";
/// On a task message: the batch of task messages signed together, each message's
/// digest (hex of the first 16 bytes of SHA-256 over `<subject>\n<payload>`) joined by
/// `,`. The message's own digest is one of them.
pub const SIGNED_BATCH: &str = "Flotilla-Signed-Batch";
/// On a task message: hex of the Ed25519 signature over `flotilla-batch-v1\n<batch>`
/// (the `Flotilla-Signed-Batch` value).
pub const SIGNATURE: &str = "Flotilla-Signature";
/// On a tool call with side effects: its idempotency key (also in the body,
/// [`crate::ToolCall::idempotency_key`]).
pub const IDEMPOTENCY_KEY: &str = "Flotilla-Idempotency-Key";
/// On a dead letter: why it was dead-lettered (an [`crate::ErrorCode`] name).
pub const REASON: &str = "Flotilla-Reason";
/// On a dead letter: the human-readable detail.
pub const DETAIL: &str = "Flotilla-Detail";
/// On a dead letter: the stream it came from.
pub const ORIGIN_STREAM: &str = "Flotilla-Stream";
/// On a dead letter: its sequence in that stream.
pub const ORIGIN_SEQUENCE: &str = "Flotilla-Sequence";
/// On a dead letter: how many times it had been delivered.
pub const DELIVERIES: &str = "Flotilla-Deliveries";
/// On a dead letter: the subject it was published to.
pub const ORIGIN_SUBJECT: &str = "Flotilla-Subject";

/// A message's `Flotilla-Session` header names another session than the message
/// itself (its subject, or its body): refused as `wrong_session`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {SESSION} names session {header:?}, but the message is for {}", .expected.as_deref().unwrap_or("no session"))]
pub struct SessionHeaderMismatch {
    /// What the header said.
    pub header: String,
    /// The session the subject or body names (`None`: they name none).
    pub expected: Option<String>,
}

/// Checks the `Flotilla-Session` header (`header`, if the message has one) against
/// the session the message's subject or body names. The header is optional for
/// clients (Flotilla's own publishers always set it); when present it must agree.
pub fn check_session(
    header: Option<&str>,
    expected: Option<&crate::SessionId>,
) -> Result<(), SessionHeaderMismatch> {
    match (header, expected) {
        (None, _) => Ok(()),
        (Some(h), Some(s)) if h == s.as_str() => Ok(()),
        (Some(h), s) => Err(SessionHeaderMismatch {
            header: h.to_owned(),
            expected: s.map(|s| s.as_str().to_owned()),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::SessionId;

    #[test]
    fn the_session_header_is_optional_but_must_agree() {
        let s = SessionId::parse("s1").unwrap();
        assert_eq!(check_session(None, Some(&s)), Ok(()));
        assert_eq!(check_session(None, None), Ok(()));
        assert_eq!(check_session(Some("s1"), Some(&s)), Ok(()));
        let e = check_session(Some("s2"), Some(&s)).unwrap_err();
        assert!(
            e.to_string().contains("\"s2\"") && e.to_string().contains("s1"),
            "{e}"
        );
        assert!(check_session(Some("s1"), None).is_err());
    }
}

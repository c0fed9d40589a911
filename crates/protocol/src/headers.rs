//! NATS header names Flotilla sets and reads.

/// JetStream de-duplication id; unique per logical message ([`crate::MessageId`]).
pub const MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context ([`crate::TraceParent`]).
pub const TRACEPARENT: &str = "traceparent";
/// The session a message belongs to (also in its subject and body; all three must agree).
pub const SESSION: &str = "Flotilla-Session";
/// Attempt number of a task dispatch (1-based).
pub const ATTEMPT: &str = "Flotilla-Attempt";
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

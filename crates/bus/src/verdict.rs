//! What a handler decides about a delivery, and carrying that decision out: every
//! consumer loop (workers, orchestrator, admission queue, dead-letter mover) settles its
//! deliveries the same way.

use std::time::Duration;

use flotilla_protocol::ErrorCode;

use crate::Bus;
use crate::delivery::Delivery;
use crate::kv::KvError;
use crate::publish::PublishError;

/// What to do with a delivery after handling it.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Handled (or a harmless duplicate): ack.
    Ack,
    /// Transient failure: redeliver after the delay.
    Retry(Duration, String),
    /// Poison: dead-letter with the code.
    Poison(ErrorCode, String),
}

impl From<KvError> for Verdict {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Corrupt { .. } => Verdict::Poison(ErrorCode::Malformed, e.to_string()),
            other => Verdict::Retry(Duration::from_millis(500), other.to_string()),
        }
    }
}

impl From<PublishError> for Verdict {
    fn from(e: PublishError) -> Self {
        Verdict::Retry(Duration::from_millis(500), e.to_string())
    }
}

/// Applies a verdict to a delivery. Shared by every consumer loop.
pub async fn settle(bus: &Bus, d: &Delivery, verdict: Result<(), VerdictError>) {
    let res = match verdict.map_err(|e| e.0) {
        Ok(()) | Err(Verdict::Ack) => d.ack(bus).await,
        Err(Verdict::Retry(delay, why)) => {
            tracing::debug!(reason = %why, ?delay, "redelivering later");
            d.nak(delay).await
        }
        Err(Verdict::Poison(code, why)) => {
            tracing::warn!(code = %code, reason = %why, subject = d.subject(), "dead-lettering message");
            d.dead_letter(bus, code, &why).await
        }
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "could not settle delivery; it will be redelivered");
    }
}

/// A handler's failure, carrying what to do with the message.
#[derive(Debug)]
pub struct VerdictError(pub(crate) Verdict);

impl VerdictError {
    /// Redeliver after `delay`.
    pub fn retry(delay: Duration, why: impl Into<String>) -> Self {
        Self(Verdict::Retry(delay, why.into()))
    }
    /// Dead-letter with `code`.
    pub fn poison(code: ErrorCode, why: impl Into<String>) -> Self {
        Self(Verdict::Poison(code, why.into()))
    }
    /// Nothing to do: ack and drop (a duplicate or fenced message).
    pub fn drop_it() -> Self {
        Self(Verdict::Ack)
    }
}

impl<E: Into<Verdict>> From<E> for VerdictError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

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
    /// JetStream did not answer (a stream without a leader while a cluster elects one,
    /// a server restarting): the handler is run again in place, backed off, while the
    /// delivery is kept alive, so an outage does not spend the message's deliveries;
    /// past [`OUTAGE_PATIENCE`] it is redelivered.
    Outage(String),
    /// Poison: dead-letter with the code.
    Poison(ErrorCode, String),
}

/// How long a handler is re-run in place while JetStream does not answer, counted from
/// the outage's start, before its message is handed back for redelivery. Covers a cluster electing new stream leaders
/// after losing a node (seconds) with room to spare.
pub const OUTAGE_PATIENCE: Duration = Duration::from_secs(60);

/// The waits between in-place re-runs during an outage.
pub(crate) const OUTAGE_BACKOFF: flotilla_protocol::Backoff =
    flotilla_protocol::Backoff::exponential(Duration::from_millis(200), Duration::from_secs(5))
        .with_jitter(flotilla_protocol::Jitter::Half);

/// Runs `op` again, backed off like a handler in place, while its error is an outage
/// (`outage` says which) and for at most [`OUTAGE_PATIENCE`]. For a write that comes
/// after work that must not be repeated (a model call): left to the handler's in-place
/// re-run, the outage would run the whole handler, and the call, again. `op` must be
/// safe to repeat, and a write that got no answer may have landed: the caller reads a
/// conflict after a retry with that in mind.
pub async fn outlast<T, E, F, Fut>(op: F, outage: impl Fn(&E) -> bool) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    retry_while(op, outage, OUTAGE_BACKOFF, OUTAGE_PATIENCE).await
}

/// Runs `op` again, waiting `backoff` between tries, while its error is one that
/// waiting helps (`again` says which) and for at most `patience`; any other outcome is
/// returned as it is.
pub(crate) async fn retry_while<T, E, F, Fut>(
    mut op: F,
    again: impl Fn(&E) -> bool,
    backoff: flotilla_protocol::Backoff,
    patience: Duration,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = tokio::time::Instant::now();
    let mut retry = 0;
    loop {
        match op().await {
            Err(e) if again(&e) && started.elapsed() < patience => {
                tracing::debug!(retry, "not possible yet; trying again");
                tokio::time::sleep(backoff.delay(retry)).await;
                retry += 1;
            }
            other => return other,
        }
    }
}

impl From<KvError> for Verdict {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Corrupt { .. } => Verdict::Poison(ErrorCode::Malformed, e.to_string()),
            KvError::Unavailable { .. } => Verdict::Outage(e.to_string()),
            other => Verdict::Retry(Duration::from_millis(500), other.to_string()),
        }
    }
}

impl From<PublishError> for Verdict {
    fn from(e: PublishError) -> Self {
        match e {
            // A stream without a leader answers like a stream that is not there.
            PublishError::Unavailable { .. } | PublishError::NoStream { .. } => {
                Verdict::Outage(e.to_string())
            }
            other => Verdict::Retry(Duration::from_millis(500), other.to_string()),
        }
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
        Err(Verdict::Outage(why)) => {
            tracing::warn!(reason = %why, subject = d.subject(), seq = d.stream_sequence(), "jetstream unavailable past the patience; redelivering later");
            d.nak(OUTAGE_BACKOFF.max).await
        }
        Err(Verdict::Poison(code, why)) => {
            tracing::warn!(code = %code, reason = %why, subject = d.subject(), seq = d.stream_sequence(), "dead-lettering message");
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
    /// JetStream did not answer: worth running the handler again in place.
    pub fn is_outage(&self) -> bool {
        matches!(self.0, Verdict::Outage(_))
    }

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

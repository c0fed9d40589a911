//! Dead letters: the mover that takes messages which exhausted their deliveries out of
//! the work queues, and the operations behind `flotilla dlq ls|show|replay`.
//!
//! The server announces an exhausted message with a core NATS advisory
//! (`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`). Core messages
//! are lost when nobody listens, so the advisories stream captures them and every
//! `serve` shares one durable consumer on it. For each advisory the mover copies the
//! message into the dead-letter stream (reason `max_deliveries`, message id
//! `dlq.<stream>.<seq>`), deletes it from the work queue, and, for a task, commits the
//! attempt as failed (its claim fenced first, so a late holder's commit is refused), so
//! the session retries it or fails visibly instead of waiting forever: the orchestrator
//! takes the commit as the task's result. A task commit the orchestrators' consumer
//! gave up on is copied to the dead-letter stream and left in place (it is the
//! record). Every step is idempotent, so a crash anywhere is safe.

use std::time::{Duration, SystemTime};

use flotilla_bus::kv::{Applied, Start, Step};
use flotilla_bus::{
    Bus, DeadLetter, Delivery, PoolConsumer, PoolSettings, StreamError, StreamHandle, VerdictError,
};
use flotilla_protocol::subject::keys;
use flotilla_protocol::task_machine;
use flotilla_protocol::{
    DEFAULT_MAX_PAYLOAD, InboxMessage, MessageId, TaskRecord, decode, epoch_ms, headers,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The reason recorded for messages that exhausted their deliveries.
pub const MAX_DELIVERIES: &str = "max_deliveries";

/// The fields of a max-deliveries advisory the mover uses.
#[derive(Debug, Deserialize)]
struct Advisory {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
}

/// Moves exhausted messages to the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetterMover {
    bus: Bus,
}

impl DeadLetterMover {
    /// A mover over `bus`.
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), flotilla_bus::ConsumerError> {
        let settings = PoolSettings {
            max_deliver: -1,
            concurrency: 16,
            ..PoolSettings::default()
        };
        let consumer = PoolConsumer::for_advisories(&self.bus, settings).await?;
        let bus = self.bus.clone();
        consumer
            .serve(bus, shutdown, move |d: Delivery| {
                let this = self.clone();
                async move {
                    let verdict = this.handle(&d).await;
                    (d, verdict)
                }
            })
            .await;
        Ok(())
    }

    async fn handle(&self, d: &Delivery) -> Result<(), VerdictError> {
        let Ok(adv) = serde_json::from_slice::<Advisory>(d.payload()) else {
            tracing::warn!("unreadable max-deliveries advisory dropped");
            return Ok(());
        };
        let names = self.bus.names();
        // A commit the orchestrators' consumer gave up on is copied, not moved: it is
        // the task's record.
        let commit = adv.stream == names.stream_sessions();
        if !adv.stream.starts_with(&names.stream_inbox_prefix())
            && adv.stream != names.stream_submit()
            && !commit
        {
            return Ok(());
        }
        let retry = |e: String| VerdictError::retry(Duration::from_secs(1), e);
        let stream = self
            .bus
            .stream(&adv.stream)
            .await
            .map_err(|e| retry(e.to_string()))?;
        let msg = match stream.message(adv.stream_seq).await {
            Ok(m) => m,
            // Already moved (or acked late): nothing to do.
            Err(_) => return Ok(()),
        };
        let letter = DeadLetter {
            stream: adv.stream.clone(),
            sequence: adv.stream_seq,
            deliveries: adv.deliveries,
            subject: msg.subject.to_string(),
            reason: MAX_DELIVERIES.to_owned(),
            detail: format!(
                "delivered {} times to consumer {} without an acknowledgement",
                adv.deliveries, adv.consumer
            ),
            traceparent: msg.headers.get(headers::TRACEPARENT).map(|v| v.to_string()),
            session: msg.headers.get(headers::SESSION).map(|v| v.to_string()),
            payload: msg.payload.clone(),
        };
        self.bus.store_dead_letter(&letter).await.map_err(retry)?;
        tracing::warn!(stream = %adv.stream, seq = adv.stream_seq, subject = %letter.subject, "dead-lettered after max deliveries");
        if commit {
            return Ok(());
        }
        // A task that can never be delivered is a failed attempt: the orchestrator
        // retries it or fails the session naming it.
        if let Ok(InboxMessage::Task(task)) =
            decode::<InboxMessage>(&msg.payload, DEFAULT_MAX_PAYLOAD)
        {
            // Committed to the task record first, like any holder's outcome: the
            // orchestrator accepts only results that their task record vouches for.
            let reason = format!("dead-lettered after {} deliveries", adv.deliveries);
            let claim_key = keys::claim(&task.session_id, &task.role, &task.task_id);
            let commit_key = keys::task(&task.session_id, &task.role, &task.task_id);
            let now = epoch_ms(SystemTime::now());
            // (From the stream leader: a lagging replica's answer could fail an attempt
            // that was committed.)
            let committed = self
                .bus
                .sessions()
                .get_latest::<TaskRecord>(&commit_key)
                .await?
                .map(|(r, _)| r);
            // The claim first (fenced: a late holder's commit is refused), then the
            // failure committed on it, which the orchestrator takes as the result.
            let applied = self
                .bus
                .sessions()
                .transition(
                    &claim_key,
                    Start::Read,
                    8,
                    |current: Option<&TaskRecord>| match task_machine::abandon(
                        current,
                        committed.as_ref(),
                        &task,
                        now,
                    ) {
                        Some(rec) => Step::Write(rec.clone(), Some(rec)),
                        None => Step::Keep(None),
                    },
                )
                .await?;
            let (fenced, revision) = match applied {
                Applied::Written {
                    value: Some(rec),
                    revision,
                } => (rec, revision),
                Applied::Written { value: None, .. } | Applied::Kept(_) => {
                    return self.delete_moved(&stream, adv.stream_seq).await;
                }
                Applied::Contended => {
                    return Err(retry("task claim kept changing".into()));
                }
            };
            let failed = task_machine::commit(
                &fenced,
                flotilla_protocol::TaskOutcome::Failed { reason },
                None,
                now,
            );
            let headers = flotilla_bus::message_headers(
                &MessageId::commit(&task.session_id, &task.task_id, task.attempt),
                Some(&task.session_id),
                Some(task.attempt),
                letter
                    .traceparent
                    .as_deref()
                    .and_then(|t| flotilla_protocol::TraceParent::parse(t).ok()),
            );
            // Refused: the claim moved on since (a newer attempt); the next handling
            // finds nothing to do.
            self.bus
                .sessions()
                .put_fenced(&commit_key, &failed, &claim_key, revision, headers)
                .await?;
        }
        self.delete_moved(&stream, adv.stream_seq).await
    }

    /// Removes a dead-lettered message from its work queue.
    async fn delete_moved(&self, stream: &StreamHandle, seq: u64) -> Result<(), VerdictError> {
        match stream.delete_message(seq).await {
            Ok(()) => Ok(()),
            // Gone already: fine.
            Err(StreamError::NoMessage { .. }) => Ok(()),
            Err(e) => Err(VerdictError::retry(Duration::from_secs(1), e.to_string())),
        }
    }
}

/// One entry of the dead-letter stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterEntry {
    /// Its sequence in the dead-letter stream (what `show` and `replay` take).
    pub seq: u64,
    /// When it was dead-lettered (RFC 3339).
    pub time: String,
    /// Why.
    pub reason: String,
    /// Detail.
    pub detail: String,
    /// The subject it was first published to.
    pub subject: String,
    /// The stream and sequence it came from.
    pub origin: String,
    /// Deliveries before it was dead-lettered.
    pub deliveries: u64,
    /// The payload (lossy UTF-8).
    pub payload: String,
}

/// A dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// No such entry.
    #[error("no dead letter with sequence {0}")]
    NotFound(u64),
    /// The entry has no original subject to replay to.
    #[error("dead letter {0} does not say where it came from")]
    NoOrigin(u64),
    /// NATS failed: retry.
    #[error("nats: {0}")]
    Nats(String),
}

fn entry(seq: u64, m: &async_nats::jetstream::message::StreamMessage) -> DeadLetterEntry {
    let h = |name: &str| {
        m.headers
            .get(name)
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    DeadLetterEntry {
        seq,
        time: m.time.to_string(),
        reason: h(headers::REASON),
        detail: h(headers::DETAIL),
        subject: h(headers::ORIGIN_SUBJECT),
        origin: format!(
            "{}#{}",
            h(headers::ORIGIN_STREAM),
            h(headers::ORIGIN_SEQUENCE)
        ),
        deliveries: h(headers::DELIVERIES).parse().unwrap_or(0),
        payload: String::from_utf8_lossy(&m.payload).into_owned(),
    }
}

async fn dlq_stream(bus: &Bus) -> Result<StreamHandle, DlqError> {
    bus.dead_letters()
        .await
        .map_err(|e| DlqError::Nats(e.to_string()))
}

/// The newest `limit` dead letters, oldest first.
pub async fn list(bus: &Bus, limit: usize) -> Result<Vec<DeadLetterEntry>, DlqError> {
    let stream = dlq_stream(bus).await?;
    let (first, last) = {
        let state = stream
            .state()
            .await
            .map_err(|e| DlqError::Nats(e.to_string()))?;
        (state.first_sequence, state.last_sequence)
    };
    let mut out = Vec::new();
    let mut seq = last;
    while seq >= first && seq > 0 && out.len() < limit {
        if let Ok(m) = stream.message(seq).await {
            out.push(entry(seq, &m));
        }
        seq -= 1;
    }
    out.reverse();
    Ok(out)
}

/// One dead letter.
pub async fn show(bus: &Bus, seq: u64) -> Result<DeadLetterEntry, DlqError> {
    let stream = dlq_stream(bus).await?;
    let m = stream
        .message(seq)
        .await
        .map_err(|_| DlqError::NotFound(seq))?;
    Ok(entry(seq, &m))
}

/// Publishes a dead letter back to the subject it came from (as a new message) and
/// removes it from the dead-letter stream.
pub async fn replay(bus: &Bus, seq: u64) -> Result<String, DlqError> {
    let stream = dlq_stream(bus).await?;
    let m = stream
        .message(seq)
        .await
        .map_err(|_| DlqError::NotFound(seq))?;
    let subject = m
        .headers
        .get(headers::ORIGIN_SUBJECT)
        .map(|v| v.to_string())
        .ok_or(DlqError::NoOrigin(seq))?;
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        headers::MSG_ID,
        format!("replay.{}.{seq}", bus.names().stream_dlq()).as_str(),
    );
    for name in [headers::TRACEPARENT, headers::SESSION, headers::ATTEMPT] {
        if let Some(v) = m.headers.get(name) {
            h.insert(name, v.as_str());
        }
    }
    bus.publish_once(&subject, h, m.payload.clone())
        .await
        .map_err(|e| DlqError::Nats(e.to_string()))?;
    stream
        .delete_message(seq)
        .await
        .map_err(|e| DlqError::Nats(e.to_string()))?;
    Ok(subject)
}

//! Publishing with de-duplication and retry.
//!
//! Every JetStream publish carries a `Nats-Msg-Id`. A publish whose acknowledgement
//! times out may still have been stored, so it is retried with the same id and the
//! server drops the copy. A full inbox is not an error to retry blindly: it comes back
//! as [`PublishError::Full`] so the caller can apply backpressure.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;
use flotilla_protocol::{
    Event, EventBody, MessageId, SessionId, TraceParent, V1, epoch_ms, headers,
};

use crate::Bus;

/// JetStream error code: the subject holds `max_msgs_per_subject` messages and the
/// stream discards new ones per subject.
const SUBJECT_FULL: u64 = 10077;
/// JetStream error code: the stream holds `max_msgs` and discards new ones.
const STREAM_FULL: u64 = 10047;

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Subject.
    pub subject: String,
    /// De-duplication id.
    pub msg_id: MessageId,
    /// The session it belongs to, if any (sets `Flotilla-Session`).
    pub session: Option<SessionId>,
    /// Task attempt, if any (sets `Flotilla-Attempt`).
    pub attempt: Option<u32>,
    /// Trace context of the session; the message carries the sending span's context
    /// (see [`crate::trace::outgoing`]).
    pub trace: Option<TraceParent>,
    /// Body.
    pub payload: Bytes,
}

impl Outgoing {
    /// The NATS headers for this message.
    pub fn headers(&self) -> HeaderMap {
        message_headers(
            &self.msg_id,
            self.session.as_ref(),
            self.attempt,
            self.trace,
        )
    }
}

/// The headers of a Flotilla message: `Nats-Msg-Id`, `traceparent` (the sending span's
/// context), and `Flotilla-Session` and `Flotilla-Attempt` when given.
pub fn message_headers(
    msg_id: &MessageId,
    session: Option<&SessionId>,
    attempt: Option<u32>,
    trace: Option<TraceParent>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id.as_str());
    let tp = crate::trace::outgoing(trace);
    h.insert(headers::TRACEPARENT, tp.to_string().as_str());
    if let Some(s) = session {
        h.insert(headers::SESSION, s.as_str());
    }
    if let Some(a) = attempt {
        h.insert(headers::ATTEMPT, a.to_string().as_str());
    }
    h
}

/// A stored publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Stream sequence.
    pub sequence: u64,
    /// The server already had a message with this id (nothing new was stored).
    pub duplicate: bool,
}

/// A publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The subject (an inbox) or the stream (the submit queue) is full: back off and
    /// retry later.
    #[error("{subject} is full")]
    Full {
        /// The subject.
        subject: String,
    },
    /// No stream takes this subject: run the topology bootstrap.
    #[error("no stream takes subject {subject}")]
    NoStream {
        /// The subject.
        subject: String,
    },
    /// The server refused the message for good (too large, invalid subject).
    #[error("publish to {subject} refused: {source}")]
    Refused {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// No acknowledgement after every attempt; the message may or may not be stored.
    /// Retrying with the same message id is safe.
    #[error("publish to {subject} unacknowledged after {attempts} attempts: {source}")]
    Unavailable {
        /// The subject.
        subject: String,
        /// Attempts made.
        attempts: u32,
        /// The last cause.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

impl Bus {
    /// Publishes `out` to JetStream, retrying with the same message id until
    /// acknowledged or out of attempts.
    pub async fn publish(&self, out: &Outgoing) -> Result<Published, PublishError> {
        self.publish_headers(out, out.headers()).await
    }

    /// [`Bus::publish`] with the headers of `signed`, a batch that names `out` (see
    /// [`crate::signing`]).
    pub async fn publish_signed(
        &self,
        out: &Outgoing,
        signed: &crate::SignedBatch,
    ) -> Result<Published, PublishError> {
        let mut headers = out.headers();
        signed.add_headers(&mut headers);
        self.publish_headers(out, headers).await
    }

    async fn publish_headers(
        &self,
        out: &Outgoing,
        headers: async_nats::HeaderMap,
    ) -> Result<Published, PublishError> {
        let attempts = self.config.publish_attempts.max(1);
        let backoff = flotilla_protocol::Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_secs(1),
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = match self
                .js
                .publish_with_headers(out.subject.clone(), headers.clone(), out.payload.clone())
                .await
            {
                Ok(fut) => fut.await,
                Err(e) => Err(e),
            };
            let err = match res {
                Ok(ack) => {
                    if ack.duplicate {
                        self.counters.duplicates.increment();
                    }
                    return Ok(Published {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Err(e) => e,
            };
            let err = match final_error(&out.subject, err) {
                Ok(e) => {
                    if matches!(e, PublishError::Full { .. }) {
                        self.counters.backpressure.increment();
                    }
                    return Err(e);
                }
                Err(err) => err,
            };
            if attempt >= attempts {
                return Err(PublishError::Unavailable {
                    subject: out.subject.clone(),
                    attempts: attempt,
                    source: err,
                });
            }
            self.counters.publish_retries.increment();
            tracing::debug!(subject = %out.subject, msg_id = %out.msg_id, error = %err, "publish retry");
            // Same message id every time: the server's de-duplication makes the
            // retries idempotent.
            tokio::time::sleep(backoff.delay(attempt - 1)).await;
        }
    }
}

/// What a failed publish means: `Ok` with the error to report when asking again will
/// not help (no stream, refused, full), `Err` giving the cause back when it may.
fn final_error(
    subject: &str,
    err: async_nats::jetstream::context::PublishError,
) -> Result<PublishError, async_nats::jetstream::context::PublishError> {
    let subject = subject.to_owned();
    match err.kind() {
        PublishErrorKind::StreamNotFound => Ok(PublishError::NoStream { subject }),
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => Ok(PublishError::Refused {
            subject,
            source: err,
        }),
        PublishErrorKind::Other => match crate::kv::jetstream_code(&err) {
            Some(SUBJECT_FULL) | Some(STREAM_FULL) => Ok(PublishError::Full { subject }),
            Some(_) => Ok(PublishError::Refused {
                subject,
                source: err,
            }),
            None => Err(err),
        },
        _ => Err(err),
    }
}

impl Bus {
    /// Publishes `payload` with `headers` to JetStream once, without retrying: for a
    /// caller that decides itself what a failure means (a dead letter replayed by
    /// hand). `headers` should carry a `Nats-Msg-Id`.
    pub async fn publish_once(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Published, PublishError> {
        let ack = self.publish_acked(subject, headers, payload).await?;
        Ok(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Adds `delta` to the JetStream counter on `subject` (a `Nats-Incr` publish to a
    /// stream that allows counters, server 2.12+), once, without retrying; `headers`
    /// should carry a `Nats-Msg-Id` so a retried increment is counted once. Returns the
    /// counter's new total, or `None` when the server recognized a repeat (its first
    /// copy was counted; read the counter for its total).
    pub async fn counter_add(
        &self,
        subject: &str,
        delta: i128,
        mut headers: HeaderMap,
    ) -> Result<Option<i128>, PublishError> {
        headers.insert("Nats-Incr", delta.to_string().as_str());
        let ack = self.publish_acked(subject, headers, Bytes::new()).await?;
        Ok(ack.value.as_deref().and_then(|v| v.parse().ok()))
    }

    /// One JetStream publish and its acknowledgement.
    async fn publish_acked(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<async_nats::jetstream::publish::PublishAck, PublishError> {
        let res = match self
            .js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
        {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        };
        res.map_err(|err| {
            final_error(subject, err).unwrap_or_else(|source| PublishError::Unavailable {
                subject: subject.to_owned(),
                attempts: 1,
                source,
            })
        })
    }
}

impl Bus {
    /// Publishes one event of `session` with message id `<sid>.ev.<id>` (`id` unique
    /// within the session, so a repeat is de-duplicated).
    pub async fn emit(
        &self,
        session: &SessionId,
        id: &str,
        body: EventBody,
        trace: Option<TraceParent>,
    ) -> Result<(), PublishError> {
        self.emit_with(session, id, body, Vec::new(), trace).await
    }

    /// [`Bus::emit`] for an event that also records the task attempts `dispatched` in
    /// the same step (one message for both).
    pub async fn emit_with(
        &self,
        session: &SessionId,
        id: &str,
        body: EventBody,
        dispatched: Vec<flotilla_protocol::DispatchedTask>,
        trace: Option<TraceParent>,
    ) -> Result<(), PublishError> {
        let kind = body.kind();
        let event = Event {
            v: V1,
            session_id: session.clone(),
            at_ms: epoch_ms(std::time::SystemTime::now()),
            body,
            dispatched,
        };
        self.publish(&Outgoing {
            subject: self.names().event(session, kind),
            msg_id: MessageId::event(session, id),
            session: Some(session.clone()),
            attempt: None,
            trace,
            payload: Bytes::from(serde_json::to_vec(&event).unwrap_or_default()),
        })
        .await
        .map(|_| ())
    }
}

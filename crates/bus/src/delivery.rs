//! One delivery of a JetStream message to a consumer, with what a handler may do with
//! it: ack, nak with a delay, report progress, or dead-letter it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use flotilla_protocol::{ErrorCode, TraceParent, headers};

use crate::Bus;

/// Acknowledging failed; the server will redeliver after the ack wait.
#[derive(Debug, thiserror::Error)]
#[error("could not acknowledge: {0}")]
pub struct AckError(String);

/// A delivered message.
///
/// Held by its handler for as long as the work takes (an LLM call: seconds to
/// minutes), so it keeps only what a handler reads and what acknowledging needs, each
/// in one allocation: the subject, the ack subject, the payload, and the headers as one
/// block of `name: value` lines. (The message as async-nats hands it over also keeps a
/// header map of a dozen small allocations, the JetStream context with its prefix, the
/// status and the description: about 1 KB more for each task in flight.)
///
/// One pointer wide: it is passed by value through the consumer's layers into the
/// handler, and each layer's future keeps a slot of its own for it through the model
/// call.
#[derive(Debug)]
pub struct Delivery(Box<Received>);

#[derive(Debug)]
struct Received {
    /// The ack subject, and the connection acks go out on.
    ack: Option<AckHandle>,
    content: Content,
    delivered: u64,
    stream_sequence: u64,
}

/// What a delivery keeps of its message.
#[derive(Debug)]
enum Content {
    /// All a handler reads.
    Held {
        subject: Box<str>,
        payload: Bytes,
        /// `name: value` lines, in the order received.
        headers: Box<str>,
    },
    /// Released ([`Delivery::release_payload`]): only the trace context, as
    /// [`Delivery::trace`] gives it (in the room the message took: no allocation).
    Released(Option<TraceParent>),
}

impl Delivery {
    /// Wraps a message pulled from a consumer.
    ///
    /// The payload is copied out: as received it is a slice of the connection's read
    /// buffer, and a handler holds its delivery for as long as its work takes (an LLM
    /// call: seconds to minutes). Each held slice pins the whole buffer chunk it came
    /// from, 64 KiB or more, which at 2,000 sessions in flight was 150 MB of `serve`'s
    /// peak (heaptrack, BENCHMARKS.md). A copy of a message of a few hundred bytes is
    /// cheaper than that by far.
    ///
    /// `bus` is the connection the message came on: acks go out on it.
    pub fn new(msg: jetstream::Message, bus: &Bus) -> Self {
        let (delivered, stream_sequence) = msg
            .info()
            .map(|i| (i.delivered.max(1) as u64, i.stream_sequence))
            .unwrap_or((1, 0));
        let headers = msg.headers.as_ref().map(header_block).unwrap_or_default();
        let message = msg.message;
        Self(Box::new(Received {
            ack: message
                .reply
                .as_ref()
                .map(|r| AckHandle::new(bus.clone(), r.as_str())),
            content: Content::Held {
                subject: Box::from(message.subject.as_str()),
                payload: Bytes::copy_from_slice(&message.payload),
                headers: headers.into_boxed_str(),
            },
            delivered,
            stream_sequence,
        }))
    }

    /// The subject it was published to.
    ///
    /// Empty once released ([`Self::release_payload`]): a handler reads it before
    /// (logs after that name the stream sequence; a dead-letter copy reads the subject
    /// back with the payload).
    pub fn subject(&self) -> &str {
        match &self.0.content {
            Content::Held { subject, .. } => subject,
            Content::Released(_) => "",
        }
    }

    /// The body.
    ///
    /// Empty once released ([`Self::release_payload`]).
    pub fn payload(&self) -> &Bytes {
        static RELEASED: Bytes = Bytes::new();
        match &self.0.content {
            Content::Held { payload, .. } => payload,
            Content::Released(_) => &RELEASED,
        }
    }

    /// Lets go of the payload, for a handler that has decoded (and checked) it and
    /// holds the delivery through a long wait: the payload is the largest part of a
    /// delivery, and the stream keeps the message until it is acknowledged. A
    /// dead-letter copy reads it back from the stream, and a handling run again in
    /// place after an outage gets it back first ([`Self::reload_payload`]).
    ///
    /// The subject and the headers go too, but for the trace context, which a
    /// handler's span and its logs read later, kept parsed. (A task's headers carry
    /// its signature, its signer and its batch's digests, about 500 bytes, checked by
    /// then; a dead-letter copy reads the subject and the session header back with
    /// the payload.)
    pub fn release_payload(&mut self) {
        // (A malformed one is kept as the root that replaces it, made while the
        // delivery still has all that names it: every read gives the same context.)
        if let Content::Held { .. } = self.0.content {
            self.0.content = Content::Released(self.trace());
        }
    }

    /// Reads a released payload, its subject and its headers back from the stream
    /// (nothing to do otherwise).
    pub(crate) async fn reload_payload(&mut self, bus: &Bus) -> Result<(), AckError> {
        if let Content::Released(_) = self.0.content {
            let msg = self.stored(bus).await?;
            self.0.content = Content::Held {
                subject: Box::from(msg.subject.as_str()),
                payload: msg.payload,
                headers: header_block(&msg.headers).into_boxed_str(),
            };
        }
        Ok(())
    }

    /// The stream it was delivered from: named in its ack subject, so not kept beside
    /// it (`None` for a message that did not come from a stream).
    pub fn stream(&self) -> Option<&str> {
        self.0.ack.as_ref().and_then(|a| stream_of_ack(a.subject()))
    }

    /// The message as the stream stores it (it does until it is acknowledged or
    /// terminated): one request, the stream not looked up first.
    async fn stored(&self, bus: &Bus) -> Result<jetstream::message::StreamMessage, AckError> {
        let Some(stream) = self.stream() else {
            return Err(AckError(
                "payload not read back: not a stream's delivery".into(),
            ));
        };
        let stream = bus
            .stream_unchecked(stream)
            .await
            .map_err(|e| AckError(format!("payload not read back: {e}")))?;
        stream
            .message(self.0.stream_sequence)
            .await
            .map_err(|e| AckError(format!("payload not read back: {e}")))
    }

    /// How many times it has been delivered (1 on first delivery), counting a handling
    /// run again in place after an outage (see [`crate::PoolConsumer::serve`]) as a
    /// redelivery: either way an earlier handling may have written state and died, or
    /// failed, before performing all of its effects, and a handler that sees
    /// `delivered() > 1` performs them again.
    pub fn delivered(&self) -> u64 {
        self.0.delivered
    }

    /// Marks that this delivery is handled again in place.
    pub(crate) fn handled_again(&mut self) {
        self.0.delivered = self.0.delivered.saturating_add(1);
    }

    /// Its sequence in the stream.
    pub fn stream_sequence(&self) -> u64 {
        self.0.stream_sequence
    }

    /// The ack subject (anyone may publish `-NAK` there to release the message).
    pub fn ack_subject(&self) -> Option<&str> {
        self.0.ack.as_ref().map(AckHandle::subject)
    }

    /// A header value (none once released: [`Self::trace`] still gives the trace
    /// context).
    pub fn header(&self, name: &str) -> Option<&str> {
        let Content::Held { headers, .. } = &self.0.content else {
            return None;
        };
        headers.lines().find_map(|line| {
            let (n, v) = line.split_once(": ")?;
            (n == name).then_some(v)
        })
    }

    /// Publishes `body` to the ack subject.
    async fn reply_with(&self, body: Bytes) -> Result<(), AckError> {
        match &self.0.ack {
            Some(ack) => ack.send(body).await,
            None => Err(AckError("no ack subject: not a JetStream delivery".into())),
        }
    }

    /// The sender's trace context: `None` if it sent none, and a new root in place of
    /// a malformed one (logged; a malformed header is never passed on). The new root
    /// is made from the delivery's own identity (its ack subject, or its subject and
    /// sequence), so every read of one delivery gives the same context: a handler
    /// reads it again after a long wait rather than holding a copy.
    pub fn trace(&self) -> Option<TraceParent> {
        if let Content::Released(kept) = self.0.content {
            return kept;
        }
        let raw = self.header(headers::TRACEPARENT)?;
        match TraceParent::parse(raw) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(subject = %self.subject(), error = %e, "malformed traceparent replaced by a new trace");
                Some(self.replacement_root())
            }
        }
    }

    /// A root trace context of this delivery's own.
    fn replacement_root(&self) -> TraceParent {
        use std::hash::{Hash, Hasher};
        let bits = |salt: u8| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            salt.hash(&mut h);
            match &self.0.ack {
                Some(ack) => ack.subject().hash(&mut h),
                None => (self.subject(), self.0.stream_sequence).hash(&mut h),
            }
            h.finish()
        };
        TraceParent::root((u128::from(bits(0)) << 64) | u128::from(bits(1)), bits(2))
    }

    /// Done: remove it from the work queue.
    pub async fn ack(&self, bus: &Bus) -> Result<(), AckError> {
        self.reply_with(AckKind::Ack.into()).await?;
        bus.counters.acked.increment();
        Ok(())
    }

    /// Not now: redeliver after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<(), AckError> {
        self.reply_with(AckKind::Nak(Some(delay)).into()).await
    }

    /// Still working: restart the ack wait.
    pub async fn progress(&self) -> Result<(), AckError> {
        self.reply_with(AckKind::Progress.into()).await
    }

    /// A handle on this delivery that outlives it: progress and release by its ack
    /// subject (for the agent's progress reports and the watchdog).
    pub fn handle(&self) -> Option<AckHandle> {
        self.0.ack.clone()
    }

    /// Poison: copy it to the dead-letter queue with its reason, then terminate it so
    /// it leaves the work queue. If the copy cannot be stored the message is left for
    /// redelivery instead, so nothing is lost.
    pub async fn dead_letter(
        &self,
        bus: &Bus,
        code: ErrorCode,
        detail: &str,
    ) -> Result<(), AckError> {
        // A released payload is read back, with the headers it left.
        let (payload, stored) = match &self.0.content {
            Content::Held { payload, .. } => (payload.clone(), None),
            Content::Released(_) => match self.stored(bus).await {
                Ok(m) => (m.payload, Some((m.subject, m.headers))),
                Err(e) => {
                    let _ = self.nak(Duration::from_secs(1)).await;
                    return Err(AckError(format!(
                        "dead-letter copy failed, left for redelivery: {e}"
                    )));
                }
            },
        };
        // (The headers as sent: a released delivery's trace context may be the root
        // that replaced a malformed one.)
        let header = |name: &str| match &stored {
            Some((_, h)) => h.get(name).map(|v| v.as_str().to_owned()),
            None => self.header(name).map(str::to_owned),
        };
        let (session, traceparent) = (header(headers::SESSION), header(headers::TRACEPARENT));
        let subject = match &stored {
            Some((subject, _)) => subject.to_string(),
            None => self.subject().to_owned(),
        };
        let letter = DeadLetter {
            stream: self.stream().unwrap_or("unknown").to_owned(),
            sequence: self.0.stream_sequence,
            deliveries: self.0.delivered,
            subject,
            reason: code.as_str().to_owned(),
            detail: detail.to_owned(),
            // Kept only if well-formed: a malformed trace context is never passed on.
            traceparent: traceparent.filter(|v| TraceParent::parse(v).is_ok()),
            session,
            payload,
        };
        if let Err(e) = bus.store_dead_letter(&letter).await {
            let _ = self.nak(Duration::from_secs(1)).await;
            return Err(AckError(format!(
                "dead-letter copy failed, left for redelivery: {e}"
            )));
        }
        let detail_line = letter.detail_line();
        // `+TERM <reason>` ends redelivery and records the reason in the server's advisory.
        if self.0.ack.is_some() {
            let body = format!("+TERM {}: {}", code.as_str(), detail_line);
            self.reply_with(body.into()).await?;
        }
        Ok(())
    }
}

/// A message's headers as one block of `name: value` lines, in the order received.
fn header_block(h: &async_nats::HeaderMap) -> String {
    let mut headers = String::new();
    for (name, values) in h.iter() {
        for value in values {
            headers.push_str(name.as_ref());
            headers.push_str(": ");
            headers.push_str(value.as_str());
            headers.push('\n');
        }
    }
    headers
}

/// The stream an ack subject names (ADR-15): `$JS.ACK.<stream>.<consumer>.` and five
/// numbers, or `$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.` and five numbers
/// with optional tokens after them. `None` for anything else.
fn stream_of_ack(ack: &str) -> Option<&str> {
    let rest = ack.strip_prefix("$JS.ACK.")?;
    match rest.split('.').count() {
        7 => rest.split('.').next(),
        n if n >= 9 => rest.split('.').nth(2),
        _ => None,
    }
}

/// A delivery named by its ack subject, from any process: the holder reports progress
/// through it, and the watchdog releases a dead holder's delivery through it. These are
/// the only places (with [`Delivery`]) that speak the JetStream ack protocol.
///
/// One allocation shared by its clones (the delivery's, its keepalive's, the agent's
/// progress reports): a handler holds these through its model call, and each clone
/// of a client and an ack subject by value was 176 bytes and a copy of the subject.
/// It reaches the connection through the [`Bus`] (a pointer), not a client of its own
/// (152 bytes in each delivery's allocation).
#[derive(Debug, Clone)]
pub struct AckHandle(Arc<AckTarget>);

#[derive(Debug)]
struct AckTarget {
    bus: Bus,
    /// Copied out of the message (as received, it is a slice of the connection's read
    /// buffer, which it would pin: see [`Delivery::new`]). Shared text, not a
    /// `Subject`: a clone of that (for a tracker's key, or at each send) turns its
    /// buffer into a shared one, one more allocation for every delivery in flight.
    subject: Arc<str>,
}

impl AckHandle {
    /// The delivery whose ack subject is `subject`, acknowledged on `bus`'s connection.
    pub fn new(bus: Bus, subject: &str) -> Self {
        Self(Arc::new(AckTarget {
            bus,
            subject: Arc::from(subject),
        }))
    }

    /// The ack subject.
    pub fn subject(&self) -> &str {
        &self.0.subject
    }

    /// The ack subject, sharing this handle's text (a clone counts a reference).
    pub fn shared_subject(&self) -> Arc<str> {
        self.0.subject.clone()
    }

    /// `+WPI`: the server restarts the delivery's ack wait.
    pub async fn progress(&self) -> Result<(), AckError> {
        self.send(AckKind::Progress.into()).await
    }

    /// `-NAK` on the holder's behalf: the server redelivers it now.
    pub async fn release(&self) -> Result<(), AckError> {
        self.send(AckKind::Nak(None).into()).await
    }

    /// Publishes `body` (an ack, nak, progress or term) to the ack subject.
    async fn send(&self, body: Bytes) -> Result<(), AckError> {
        self.0
            .bus
            .client
            .publish(async_nats::Subject::from(&*self.0.subject), body)
            .await
            .map_err(|e| AckError(e.to_string()))
    }
}

/// A message on its way to the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The stream it came from.
    pub stream: String,
    /// Its sequence there.
    pub sequence: u64,
    /// How often it had been delivered.
    pub deliveries: u64,
    /// The subject it was published to.
    pub subject: String,
    /// Why (an error code name, or `max_deliveries`).
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// Its trace context, if any.
    pub traceparent: Option<String>,
    /// Its session header, if any.
    pub session: Option<String>,
    /// The payload, unchanged.
    pub payload: Bytes,
}

impl DeadLetter {
    /// The detail as one header-safe line of at most 512 characters.
    pub fn detail_line(&self) -> String {
        self.detail
            .chars()
            .filter(|c| *c != '\r' && *c != '\n')
            .take(512)
            .collect()
    }
}

impl Bus {
    /// The delivery whose ack subject is `ack_subject`, on this connection.
    pub fn ack_handle(&self, ack_subject: &str) -> AckHandle {
        AckHandle::new(self.clone(), ack_subject)
    }

    /// Stores `letter` in the dead-letter stream under `<p>.dlq.<stream>.<reason>`, with
    /// message id `dlq.<stream>.<sequence>` so a repeat is de-duplicated.
    pub async fn store_dead_letter(&self, letter: &DeadLetter) -> Result<(), String> {
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            headers::MSG_ID,
            format!("dlq.{}.{}", letter.stream, letter.sequence).as_str(),
        );
        h.insert(headers::REASON, letter.reason.as_str());
        h.insert(headers::DETAIL, letter.detail_line().as_str());
        h.insert(headers::ORIGIN_STREAM, letter.stream.as_str());
        h.insert(
            headers::ORIGIN_SEQUENCE,
            letter.sequence.to_string().as_str(),
        );
        h.insert(headers::DELIVERIES, letter.deliveries.to_string().as_str());
        h.insert(headers::ORIGIN_SUBJECT, letter.subject.as_str());
        if let Some(tp) = &letter.traceparent {
            h.insert(headers::TRACEPARENT, tp.as_str());
        }
        if let Some(s) = &letter.session {
            h.insert(headers::SESSION, s.as_str());
        }
        let subject = self.names().dlq(&letter.stream, &letter.reason);
        let ack = match self
            .js
            .publish_with_headers(subject, h, letter.payload.clone())
            .await
        {
            Ok(fut) => fut.await.map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        };
        if !ack.duplicate {
            self.counters
                .dead_lettered
                .increment_labeled(&[("reason", letter.reason.clone())]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::stream_of_ack;

    #[test]
    fn a_delivery_is_one_allocation_of_mimallocs_96_byte_class() {
        // Every delivery in flight is one; a released one keeps its trace context in
        // the room its message took. (A layout change that grows it past 96 bytes
        // costs every task in flight the next size class.)
        assert!(
            size_of::<super::Received>() <= 96,
            "{}",
            size_of::<super::Received>()
        );
    }

    #[test]
    fn the_stream_is_read_from_either_form_of_ack_subject() {
        let ts = "1700000000000000000";
        assert_eq!(
            stream_of_ack(&format!(
                "$JS.ACK.flotilla_inbox.pool-research.3.100.7.{ts}.42"
            )),
            Some("flotilla_inbox")
        );
        assert_eq!(
            stream_of_ack(&format!("$JS.ACK._.szMpdrwD.events.durable.1.1.1.{ts}.1")),
            Some("events")
        );
        assert_eq!(
            stream_of_ack(&format!(
                "$JS.ACK.hub.szMpdrwD.events.durable.2.50.9.{ts}.0.rand"
            )),
            Some("events")
        );
        assert_eq!(stream_of_ack("$JS.ACK.events.durable.3"), None);
        assert_eq!(stream_of_ack("_INBOX.abc.def"), None);
    }
}

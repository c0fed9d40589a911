//! A client of the control plane: open sessions and wait for their answers. This is
//! what `flotilla submit`, `demo` and `bench` use; a client in another language does
//! the same over plain NATS (see `docs/protocol.md`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::RequestErrorKind;
use bytes::Bytes;
use flotilla_protocol::{
    DEFAULT_MAX_PAYLOAD, ErrorCode, Event, EventBody, Namespace, OpenReply, OpenSession,
    ParsedSubject, SessionId, decode,
};
use futures::StreamExt;
use tokio::sync::oneshot;

/// A client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody serves `<p>.session.open`: start `flotilla serve`.
    #[error("no flotilla serve is answering on {0}; start one with `flotilla serve`")]
    NoService(String),
    /// No answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The admission service answered with something that is not an `OpenReply`.
    #[error("unreadable reply: {0}")]
    BadReply(String),
    /// NATS failed.
    #[error("nats: {0}")]
    Nats(String),
}

/// The end of a session, as seen by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The session.
    pub session_id: SessionId,
    /// Its `done` event.
    pub event: Event,
}

type Waiters = Arc<Mutex<HashMap<SessionId, oneshot::Sender<Event>>>>;

/// A control-plane client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    names: Namespace,
    waiters: Waiters,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client over an existing connection. Subscribes once to every session's `done`
    /// event, so [`Client::wait`] never misses one that arrives before it is called.
    pub async fn new(nats: async_nats::Client, names: Namespace) -> Result<Self, ClientError> {
        let mut sub = nats
            .subscribe(names.done_all())
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let waiters: Waiters = Arc::default();
        let (w, ns) = (waiters.clone(), names.clone());
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(ParsedSubject::Event { session, .. }) = ns.parse(msg.subject.as_str())
                else {
                    continue;
                };
                let Ok(event) = decode::<Event>(&msg.payload, DEFAULT_MAX_PAYLOAD) else {
                    continue;
                };
                // Tiny critical section, no await: hand the event to its waiter if any.
                let tx = w.lock().unwrap_or_else(|p| p.into_inner()).remove(&session);
                if let Some(tx) = tx {
                    let _ = tx.send(event);
                }
            }
        });
        // Make sure the subscription is registered before any session is opened.
        nats.flush()
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        Ok(Self {
            nats,
            names,
            waiters,
        })
    }

    /// Sends an open request and returns the reply.
    pub async fn open(
        &self,
        req: &OpenSession,
        timeout: Duration,
    ) -> Result<OpenReply, ClientError> {
        let payload =
            Bytes::from(serde_json::to_vec(req).map_err(|e| ClientError::BadReply(e.to_string()))?);
        self.open_raw(payload, timeout).await
    }

    /// Sends raw bytes to the open endpoint (for tools and tests of malformed input).
    pub async fn open_raw(
        &self,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<OpenReply, ClientError> {
        let msg = self
            .request(self.names.session_open(), payload, timeout)
            .await?;
        decode(&msg.payload, DEFAULT_MAX_PAYLOAD).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// Cancels `session` (`reason` goes into the record and the `done` event). The
    /// reply says whether this request ended it, or it had ended already; both are
    /// success for a caller that wants it stopped.
    pub async fn cancel(
        &self,
        session: &SessionId,
        reason: Option<String>,
        timeout: Duration,
    ) -> Result<flotilla_protocol::CancelReply, ClientError> {
        let req = flotilla_protocol::CancelSession {
            v: flotilla_protocol::V1,
            session_id: session.clone(),
            reason,
        };
        let payload = Bytes::from(
            serde_json::to_vec(&req).map_err(|e| ClientError::BadReply(e.to_string()))?,
        );
        let msg = self
            .request(self.names.session_cancel(), payload, timeout)
            .await?;
        decode(&msg.payload, DEFAULT_MAX_PAYLOAD).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// Answers the question a task of `session` waits on (`task`: which one, needed
    /// only while several wait).
    pub async fn answer(
        &self,
        session: &SessionId,
        task: Option<flotilla_protocol::TaskId>,
        answer: &str,
        timeout: Duration,
    ) -> Result<flotilla_protocol::AnswerReply, ClientError> {
        let req = flotilla_protocol::AnswerInput {
            v: flotilla_protocol::V1,
            session_id: session.clone(),
            task_id: task,
            answer: answer.to_owned(),
        };
        let payload = Bytes::from(
            serde_json::to_vec(&req).map_err(|e| ClientError::BadReply(e.to_string()))?,
        );
        let msg = self
            .request(self.names.session_answer(), payload, timeout)
            .await?;
        decode(&msg.payload, DEFAULT_MAX_PAYLOAD).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<async_nats::Message, ClientError> {
        let req = self.nats.request(subject.clone(), payload);
        let msg = match tokio::time::timeout(timeout, req).await {
            Err(_) => return Err(ClientError::Timeout(timeout)),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
                return Err(ClientError::NoService(subject));
            }
            Ok(Err(e)) if e.kind() == RequestErrorKind::TimedOut => {
                return Err(ClientError::Timeout(timeout));
            }
            Ok(Err(e)) => return Err(ClientError::Nats(e.to_string())),
            Ok(Ok(m)) => m,
        };
        Ok(msg)
    }

    /// Registers interest in `session`'s `done` event; await the receiver.
    pub fn watch(&self, session: &SessionId) -> oneshot::Receiver<Event> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.clone(), tx);
        rx
    }

    /// Opens a session for `task` and waits for its end, retrying after
    /// `retry_after_ms` while the pool is full, and with the same session id when a
    /// request goes unanswered. Returns the `done` event and how many "pool full"
    /// rejections came first.
    pub async fn run(&self, task: &str, timeout: Duration) -> Result<(Finished, u32), RunError> {
        let session = SessionId::generate();
        let mut req = OpenSession::new(task);
        req.session_id = Some(session.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let done = self.watch(&session);
        let mut rejections = 0;
        let unanswered_backoff = flotilla_protocol::Backoff::exponential(
            Duration::from_millis(250),
            Duration::from_secs(2),
        )
        .with_jitter(flotilla_protocol::Jitter::Half);
        let mut unanswered = 0u32;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = match self.open(&req, left.min(Duration::from_secs(30))).await {
                Ok(r) => r,
                // A serve instance died with our request, or none is up yet: the session
                // id is ours, so asking again is idempotent.
                Err(ClientError::Timeout(_) | ClientError::NoService(_))
                    if tokio::time::Instant::now() + unanswered_backoff.ceiling(unanswered)
                        < deadline =>
                {
                    tokio::time::sleep(unanswered_backoff.delay(unanswered)).await;
                    unanswered = unanswered.saturating_add(1);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match reply {
                OpenReply::Accepted { .. } => break,
                OpenReply::Rejected {
                    code: ErrorCode::PoolFull | ErrorCode::Unavailable,
                    retry_after_ms,
                    ..
                } => {
                    rejections += 1;
                    let wait = Duration::from_millis(retry_after_ms.unwrap_or(500));
                    if tokio::time::Instant::now() + wait > deadline {
                        return Err(RunError::Client(ClientError::Timeout(timeout)));
                    }
                    tokio::time::sleep(wait).await;
                }
                OpenReply::Rejected { code, message, .. } => {
                    return Err(RunError::Rejected { code, message });
                }
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, self.wait_done(&session, done)).await {
            Ok(Some(event)) => Ok((
                Finished {
                    session_id: session,
                    event,
                },
                rejections,
            )),
            _ => {
                self.waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&session);
                Err(RunError::Lost(session))
            }
        }
    }
}

impl Client {
    /// Waits for `session`'s `done` event. The subscription misses an event published
    /// while this connection was down (a server restarting, a node lost), so after every
    /// reconnection the events stream is asked once for the session's `done`: nothing
    /// is asked while the connection holds.
    async fn wait_done(
        &self,
        session: &SessionId,
        done: oneshot::Receiver<Event>,
    ) -> Option<Event> {
        let stats = self.nats.statistics();
        let connects = || stats.connects.load(std::sync::atomic::Ordering::Relaxed);
        let mut seen = connects();
        tokio::pin!(done);
        loop {
            tokio::select! {
                event = &mut done => return event.ok(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = connects();
            if now == seen {
                continue;
            }
            match self.stored_done(session).await {
                Ok(Some(event)) => {
                    self.waiters
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(session);
                    return Some(event);
                }
                Ok(None) => seen = now,
                // Not answered yet (the server still starting): ask again next second.
                Err(()) => {}
            }
        }
    }

    /// The `done` event of `session` in the events stream, if it is there; `Err` when
    /// the stream did not answer.
    async fn stored_done(&self, session: &SessionId) -> Result<Option<Event>, ()> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let js = async_nats::jetstream::new(self.nats.clone());
        let stream = js
            .get_stream(self.names.stream_events())
            .await
            .map_err(|_| ())?;
        let subject = self
            .names
            .event(session, flotilla_protocol::EventKindName::Done);
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(msg) => Ok(decode::<Event>(&msg.payload, DEFAULT_MAX_PAYLOAD).ok()),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(_) => Err(()),
        }
    }
}

/// Running a session end to end failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Talking to the control plane failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Admission refused the task for good.
    #[error("rejected ({code}): {message}")]
    Rejected {
        /// Code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The session was opened but no `done` event came in time.
    #[error("session {0} did not finish in time")]
    Lost(SessionId),
}

impl Finished {
    /// True when the session completed with an answer.
    pub fn completed(&self) -> bool {
        matches!(
            &self.event.body,
            EventBody::Done {
                outcome: flotilla_protocol::SessionOutcome::Completed,
                ..
            }
        )
    }
}

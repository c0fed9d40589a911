//! Admission: turning an [`OpenSession`] into an open session, or into an explicit
//! rejection.
//!
//! Two doors lead here: the `<p>.session.open` NATS micro endpoint (request/reply,
//! immediate answer) and the durable `<p>.submit` queue (a full pool leaves the
//! submission queued and retries it after `retry_after_ms`). Both call
//! [`Admission::admit`]:
//!
//! 1. validate the request (typed [`ErrorCode`] on failure);
//! 2. take a slot ([`SlotTable`]) or answer `pool_full` with `retry_after_ms`;
//! 3. create the session record (status `planning`, with the `opened` event in its outbox);
//! 4. publish the `start` message to the session's orchestrator inbox.
//!
//! Opening the same session id twice with the same task is idempotent.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_bus::{Bus, Delivery, KvError, Outgoing, PoolConsumer, VerdictError};
use flotilla_protocol::subject::keys;
use flotilla_protocol::{
    AnswerInput, AnswerReply, CancelReply, CancelSession, ErrorCode, EventBody, InboxMessage,
    MessageId, OpenReply, OpenSession, Role, SessionId, SessionRecord, SessionStatus, StartMessage,
    TraceParent, V1, decode, epoch_ms, headers,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::SessionConfig;
use crate::slots::{SlotError, SlotTable};

/// A rejection: what goes back to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Wire code.
    pub code: ErrorCode,
    /// Detail.
    pub message: String,
    /// For `pool_full`: when to retry.
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The reply to send.
    pub fn reply(&self) -> OpenReply {
        OpenReply::Rejected {
            v: V1,
            code: self.code,
            message: self.message.clone(),
            retry_after_ms: self.retry_after_ms,
        }
    }
}

impl From<KvError> for Rejection {
    fn from(e: KvError) -> Self {
        Rejection::new(ErrorCode::Unavailable, e.to_string())
    }
}

/// The admission logic shared by the service endpoint and the submit queue.
#[derive(Debug, Clone)]
pub struct Admission {
    bus: Bus,
    config: Arc<SessionConfig>,
    slots: SlotTable,
    ender: Option<crate::ender::Ender>,
    cache: Option<crate::orchestrator::RecordCache>,
}

impl Admission {
    /// Admission over `slots`.
    pub fn new(bus: Bus, config: SessionConfig, slots: SlotTable) -> Self {
        Self {
            bus,
            config: Arc::new(config),
            slots,
            ender: None,
            cache: None,
        }
    }

    /// Ends sessions with `ender`: cancel requests, and the deadlines of the sessions
    /// this process admits.
    pub fn with_ender(mut self, ender: crate::ender::Ender) -> Self {
        self.ender = Some(ender);
        self
    }

    /// Hands each record it creates to this process's orchestrator, whose `start`
    /// handler then needs no read.
    pub(crate) fn with_cache(mut self, cache: crate::orchestrator::RecordCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The slot table.
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }

    fn roles_for(&self, req: &OpenSession) -> Result<Vec<Role>, Rejection> {
        req.validate()
            .map_err(|e| Rejection::new(e.code(), e.to_string()))?;
        let roles = if req.roles.is_empty() {
            self.config.roles.clone()
        } else {
            req.roles.clone()
        };
        if let Some(unknown) = roles.iter().find(|r| !self.config.roles.contains(r)) {
            return Err(Rejection::new(
                ErrorCode::UnknownRole,
                format!(
                    "role {unknown} is not configured (configured: {})",
                    self.config
                        .roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if roles.len() < self.config.min_roles || roles.len() > self.config.max_roles {
            return Err(Rejection::new(
                ErrorCode::Invalid,
                format!(
                    "a session needs {}-{} worker roles, got {}",
                    self.config.min_roles,
                    self.config.max_roles,
                    roles.len()
                ),
            ));
        }
        Ok(roles)
    }

    /// Opens a session for `req`, or says why not. `parent`: the client's trace
    /// context, which the session's trace continues (a new trace without one).
    pub async fn admit(
        &self,
        req: &OpenSession,
        parent: Option<TraceParent>,
    ) -> Result<SessionId, Rejection> {
        let roles = self.roles_for(req)?;
        let session = req.session_id.clone().unwrap_or_else(SessionId::generate);
        // The session's trace: this span, a child of the client's when it sent one.
        let span =
            tracing::info_span!("admit", session = %session, trace_id = tracing::field::Empty);
        flotilla_bus::trace::set_parent(&span, parent);
        let trace = span.in_scope(|| flotilla_bus::trace::outgoing(parent));
        span.record("trace_id", trace.trace_id_hex());
        self.admit_as(req, session, roles, trace)
            .instrument(span)
            .await
    }

    async fn admit_as(
        &self,
        req: &OpenSession,
        session: SessionId,
        roles: Vec<Role>,
        trace: TraceParent,
    ) -> Result<SessionId, Rejection> {
        let key = keys::session(&session);
        // No read first: the record's create says whether the session exists (a
        // retried open then gives its slot back); only a full pool looks, so that a
        // retry of an admitted session is answered as admitted.
        let (slot, slot_revision) = match self.slots.acquire(&session).await {
            Ok(taken) => taken,
            Err(SlotError::Full {
                size,
                retry_after_ms,
            }) => {
                if let Some((existing, _)) = self.bus.sessions().get::<SessionRecord>(&key).await? {
                    return self.same_session(existing, req).await;
                }
                return Err(Rejection {
                    code: ErrorCode::PoolFull,
                    message: format!("all {size} session slots are taken"),
                    retry_after_ms: Some(retry_after_ms),
                });
            }
            Err(SlotError::Kv(e)) => return Err(e.into()),
        };
        let now = epoch_ms(SystemTime::now());
        let mut record = SessionRecord::planning(
            session.clone(),
            req.task.clone(),
            roles,
            slot,
            slot_revision,
            trace.to_string(),
            now,
        );
        record.deadline_ms = req.deadline_ms.map(|d| now.saturating_add(d));
        record.human_input = req.human_input;
        match self.bus.sessions().create(&key, &record).await {
            Ok(revision) => {
                if let Some(cache) = &self.cache {
                    cache.seed(&session, &record, revision);
                }
            }
            Err(KvError::Exists { .. }) => {
                // Opened before (a retried request), or raced with an identical one.
                let _ = crate::slots::release_taken(&self.bus, slot, slot_revision).await;
                return match self.bus.sessions().get::<SessionRecord>(&key).await? {
                    Some((existing, _)) => self.same_session(existing, req).await,
                    None => Err(Rejection::new(
                        ErrorCode::Unavailable,
                        "session record vanished; retry",
                    )),
                };
            }
            Err(e) => {
                let _ = crate::slots::release_taken(&self.bus, slot, slot_revision).await;
                return Err(e.into());
            }
        }
        if let Err(e) = self.publish_start(&session, trace).await {
            // Not undone: a publish that got no answer (its server died, the stream's
            // leader moved) may still have been stored, and deleting the record under
            // that start would dead-letter it as "no session" while the retry's start
            // is de-duplicated away, leaving the session planning forever. The session
            // stays admitted; the client's retry of the same id re-sends the start
            // (de-duplicated if the first one landed), and a session still planning
            // with no start in its inbox is restarted by the planning check.
            return Err(Rejection::new(ErrorCode::Unavailable, e.to_string()));
        }
        tracing::info!(slot, "session opened");
        if let (Some(ender), Some(deadline)) = (&self.ender, record.deadline_ms) {
            ender.at_deadline(&session, deadline);
        }
        // Informational; a failure here loses nothing the session needs.
        let opened = EventBody::Opened {
            task: req.task.clone(),
            roles: record.roles.clone(),
        };
        if let Err(e) = self.bus.emit(&session, "opened", opened, Some(trace)).await {
            tracing::warn!(error = %e, "could not publish the opened event");
        }
        Ok(session)
    }

    async fn same_session(
        &self,
        existing: SessionRecord,
        req: &OpenSession,
    ) -> Result<SessionId, Rejection> {
        if existing.task == req.task {
            // A retry after a lost reply or a crash: make sure the session is started
            // (the start message is de-duplicated by its id).
            if existing.status == SessionStatus::Planning {
                self.restart(&existing).await?;
            }
            Ok(existing.session_id)
        } else {
            Err(Rejection::new(
                ErrorCode::Invalid,
                format!(
                    "session id {} is already in use for another task",
                    existing.session_id
                ),
            ))
        }
    }

    /// Re-sends `start` for a session still planning (de-duplicated by message id).
    pub async fn restart(&self, record: &SessionRecord) -> Result<(), Rejection> {
        let trace = flotilla_protocol::TraceParent::parse(&record.traceparent)
            .unwrap_or_else(|_| flotilla_bus::trace::new_root());
        self.publish_start(&record.session_id, trace)
            .await
            .map_err(|e| Rejection::new(ErrorCode::Unavailable, e.to_string()))
    }

    /// Restarts a session by id if it is still planning and its `start` is known to be
    /// lost: nothing is left in its orchestrator inbox (a `start` waiting in a queue, or
    /// being planned right now, is still there until it is acknowledged). Under
    /// overload a session waits longer; nothing is re-sent while the original lives.
    pub async fn restart_if_planning(&self, session: &SessionId) -> Result<(), Rejection> {
        let planning = || async {
            Ok::<_, Rejection>(
                self.bus
                    .sessions()
                    .get::<SessionRecord>(&keys::session(session))
                    .await?
                    .filter(|(rec, _)| rec.status == SessionStatus::Planning),
            )
        };
        if planning().await?.is_none() {
            return Ok(());
        }
        let held = self
            .bus
            .inbox_holds(session, &Role::orchestrator())
            .await
            .map_err(|e| Rejection::new(ErrorCode::Unavailable, e.to_string()))?;
        if held {
            return Ok(());
        }
        // Read again: the start may have been acknowledged between the two reads.
        if let Some((rec, _)) = planning().await? {
            tracing::warn!(session = %session, "session still planning and its start is gone; re-sending start");
            self.restart(&rec).await?;
        }
        Ok(())
    }

    async fn publish_start(
        &self,
        session: &SessionId,
        trace: flotilla_protocol::TraceParent,
    ) -> Result<(), flotilla_bus::PublishError> {
        let msg = InboxMessage::Start(StartMessage {
            v: V1,
            session_id: session.clone(),
        });
        let payload = serde_json::to_vec(&msg).unwrap_or_default();
        self.bus
            .publish(&Outgoing {
                subject: self.bus.names().inbox(session, &Role::orchestrator()),
                msg_id: MessageId::start(session),
                session: Some(session.clone()),
                attempt: None,
                trace: Some(trace),
                payload: Bytes::from(payload),
            })
            .await
            .map(|_| ())
    }

    /// Decodes a raw request with its headers and admits it.
    pub async fn admit_bytes(
        &self,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
    ) -> OpenReply {
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let req: OpenSession = match decode(payload, self.bus.config().max_payload) {
            Ok(r) => r,
            Err(e) => return Rejection::new(e.code(), e.to_string()).reply(),
        };
        let parent =
            match checked_headers(&req, header(headers::SESSION), header(headers::TRACEPARENT)) {
                Ok(parent) => parent,
                Err(r) => return r.reply(),
            };
        match self.admit(&req, parent).await {
            Ok(session_id) => OpenReply::Accepted { v: V1, session_id },
            Err(r) => r.reply(),
        }
    }

    /// Serves `<p>.session.open` as a NATS micro service until `shutdown`.
    pub async fn serve_endpoint(
        self,
        shutdown: CancellationToken,
    ) -> Result<(), async_nats::Error> {
        let names = self.bus.names().clone();
        let service = self
            .bus
            .start_service(
                &names.service_name(),
                "Flotilla admission: open a session, or be told the pool is full",
                env!("CARGO_PKG_VERSION"),
            )
            .await?;
        let mut endpoint = service
            .endpoint_builder()
            .name("open")
            .add(names.session_open())
            .await?;
        let mut cancel = service
            .endpoint_builder()
            .name("cancel")
            .add(names.session_cancel())
            .await?;
        let mut answer = service
            .endpoint_builder()
            .name("answer")
            .add(names.session_answer())
            .await?;
        let limit = Arc::new(tokio::sync::Semaphore::new(1024));
        loop {
            let req = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = endpoint.next() => match r { Some(r) => r, None => break },
                r = cancel.next() => match r {
                    Some(r) => {
                        let this = self.clone();
                        tokio::spawn(async move { this.answer_cancel(r).await });
                        continue;
                    }
                    None => break,
                },
                r = answer.next() => match r {
                    Some(r) => {
                        let this = self.clone();
                        tokio::spawn(async move {
                            let reply = this.input_bytes(&r.message.payload).await;
                            let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
                            let mut headers = async_nats::HeaderMap::new();
                            if let AnswerReply::Rejected { code, message, .. } = &reply {
                                headers.insert("Nats-Service-Error", message.as_str());
                                headers.insert("Nats-Service-Error-Code", code.status().to_string().as_str());
                            }
                            if let Err(e) = r.respond_with_headers(Ok(body), headers).await {
                                tracing::debug!(error = %e, "could not reply to an answer");
                            }
                        });
                        continue;
                    }
                    None => break,
                },
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let reply = this
                    .admit_bytes(&req.message.payload, req.message.headers.as_ref())
                    .await;
                let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
                let mut headers = async_nats::HeaderMap::new();
                if let OpenReply::Rejected { code, message, .. } = &reply {
                    // NATS micro convention, so generic tools see the error too.
                    headers.insert("Nats-Service-Error", message.as_str());
                    headers.insert(
                        "Nats-Service-Error-Code",
                        code.status().to_string().as_str(),
                    );
                }
                if let Err(e) = req.respond_with_headers(Ok(body), headers).await {
                    tracing::debug!(error = %e, "could not reply to open request");
                }
                drop(permit);
            });
        }
        let _ = service.stop().await;
        Ok(())
    }

    /// The reply to a person's answer (`<p>.session.answer`): stored durably in the
    /// session's orchestrator inbox before it says `accepted`.
    pub async fn input_bytes(&self, payload: &[u8]) -> AnswerReply {
        let rejected = |code: ErrorCode, message: String| AnswerReply::Rejected {
            v: V1,
            code,
            message,
        };
        let req: AnswerInput = match decode(payload, self.bus.config().max_payload) {
            Ok(r) => r,
            Err(e) => return rejected(e.code(), e.to_string()),
        };
        if req.answer.trim().is_empty()
            || req.answer.len() > flotilla_protocol::open::MAX_TASK_BYTES
        {
            return rejected(
                ErrorCode::Invalid,
                "an answer is 1 byte to 16 KiB, not blank".into(),
            );
        }
        let rec = match self
            .bus
            .sessions()
            .get::<SessionRecord>(&keys::session(&req.session_id))
            .await
        {
            Ok(Some((rec, _))) => rec,
            Ok(None) => {
                return rejected(
                    ErrorCode::UnknownSession,
                    format!("no session {}", req.session_id),
                );
            }
            Err(e) => return rejected(ErrorCode::Unavailable, e.to_string()),
        };
        if rec.status.is_terminal() {
            return rejected(ErrorCode::NotAwaitingInput, "the session has ended".into());
        }
        let waiting: Vec<_> = rec
            .tasks
            .iter()
            .filter(|t| t.state == flotilla_protocol::TaskState::AwaitingInput)
            .collect();
        let task = match (&req.task_id, waiting.as_slice()) {
            (Some(id), _) => match waiting.iter().find(|t| &t.task_id == id) {
                Some(t) => *t,
                None => {
                    return rejected(
                        ErrorCode::NotAwaitingInput,
                        format!("task {id} has no question waiting"),
                    );
                }
            },
            (None, [one]) => *one,
            (None, []) => {
                return rejected(ErrorCode::NotAwaitingInput, "no question is waiting".into());
            }
            (None, many) => {
                let ids: Vec<_> = many.iter().map(|t| t.task_id.as_str()).collect();
                return rejected(
                    ErrorCode::NotAwaitingInput,
                    format!(
                        "{} questions wait; name the task_id ({})",
                        many.len(),
                        ids.join(", ")
                    ),
                );
            }
        };
        let msg = flotilla_protocol::InputMessage {
            v: V1,
            session_id: req.session_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            answer: Some(req.answer),
        };
        match crate::ender::publish_input(&self.bus, &msg).await {
            Ok(p) if p.duplicate => rejected(
                ErrorCode::NotAwaitingInput,
                format!(
                    "task {} was answered already (or its wait timed out)",
                    task.task_id
                ),
            ),
            Ok(_) => AnswerReply::Accepted {
                v: V1,
                session_id: req.session_id,
                task_id: task.task_id.clone(),
            },
            Err(e) => rejected(ErrorCode::Unavailable, e.to_string()),
        }
    }

    /// Answers one cancel request.
    async fn answer_cancel(&self, req: async_nats::service::Request) {
        let reply = self.cancel_bytes(&req.message.payload).await;
        let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
        let mut headers = async_nats::HeaderMap::new();
        if let CancelReply::Rejected { code, message, .. } = &reply {
            headers.insert("Nats-Service-Error", message.as_str());
            headers.insert(
                "Nats-Service-Error-Code",
                code.status().to_string().as_str(),
            );
        }
        if let Err(e) = req.respond_with_headers(Ok(body), headers).await {
            tracing::debug!(error = %e, "could not reply to a cancel request");
        }
    }

    /// The reply to a cancel request's payload.
    pub async fn cancel_bytes(&self, payload: &[u8]) -> CancelReply {
        let rejected = |code: ErrorCode, message: String| CancelReply::Rejected {
            v: V1,
            code,
            message,
        };
        let req: CancelSession = match decode(payload, self.bus.config().max_payload) {
            Ok(r) => r,
            Err(e) => return rejected(e.code(), e.to_string()),
        };
        let Some(ender) = &self.ender else {
            return rejected(
                ErrorCode::Unavailable,
                "this admission instance does not end sessions".into(),
            );
        };
        let reason = req
            .reason
            .clone()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| "cancelled on request".into());
        let reason: String = reason.chars().take(1024).collect();
        match ender
            .end(&req.session_id, SessionStatus::Cancelled, &reason)
            .await
        {
            Ok(crate::ender::Ended::Now {
                confirmed,
                expected,
            }) => CancelReply::Cancelled {
                v: V1,
                session_id: req.session_id,
                confirmed,
                expected,
            },
            Ok(crate::ender::Ended::Already(outcome)) => CancelReply::AlreadyEnded {
                v: V1,
                session_id: req.session_id,
                outcome,
            },
            Err(crate::ender::EndError::Unknown(s)) => {
                rejected(ErrorCode::UnknownSession, format!("no session {s}"))
            }
            Err(e) => rejected(ErrorCode::Unavailable, e.to_string()),
        }
    }

    /// Consumes the durable submit queue until `shutdown`. A submission must carry its
    /// `session_id`; a full pool leaves it queued and retries after `retry_after_ms`.
    pub async fn serve_queue(
        self,
        settings: flotilla_bus::PoolSettings,
        shutdown: CancellationToken,
    ) -> Result<(), flotilla_bus::ConsumerError> {
        let consumer = PoolConsumer::for_submit(&self.bus, settings).await?;
        let bus = self.bus.clone();
        consumer
            .serve(bus, shutdown, move |d: Delivery| {
                let this = self.clone();
                async move {
                    let verdict = this.handle_submission(&d).await;
                    (d, verdict)
                }
            })
            .await;
        Ok(())
    }

    async fn handle_submission(&self, d: &Delivery) -> Result<(), VerdictError> {
        let req: OpenSession = decode(d.payload(), self.bus.config().max_payload)
            .map_err(|e| VerdictError::poison(e.code(), e.to_string()))?;
        if req.session_id.is_none() {
            return Err(VerdictError::poison(
                ErrorCode::Invalid,
                "a submission must carry its session_id",
            ));
        }
        let parent = checked_headers(
            &req,
            d.header(headers::SESSION),
            d.header(headers::TRACEPARENT),
        )
        .map_err(|r| VerdictError::poison(r.code, r.message))?;
        match self.admit(&req, parent).await {
            Ok(_) => Ok(()),
            Err(r) => match r.code {
                ErrorCode::PoolFull | ErrorCode::Unavailable => Err(VerdictError::retry(
                    Duration::from_millis(r.retry_after_ms.unwrap_or(1000)),
                    r.message,
                )),
                code => Err(VerdictError::poison(code, r.message)),
            },
        }
    }
}

/// Checks an open request's headers: a `Flotilla-Session` header must name the
/// request's `session_id`; a `traceparent` is the parent of the session's trace if it
/// is well-formed, and replaced (logged, never passed on) if it is not.
fn checked_headers(
    req: &OpenSession,
    session: Option<&str>,
    traceparent: Option<&str>,
) -> Result<Option<TraceParent>, Rejection> {
    headers::check_session(session, req.session_id.as_ref())
        .map_err(|e| Rejection::new(ErrorCode::WrongSession, e.to_string()))?;
    Ok(traceparent.and_then(|raw| match TraceParent::parse(raw) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "malformed traceparent on an open request; the session starts a new trace");
            None
        }
    }))
}

//! Ending a session from outside its own course: a cancel request
//! (`<p>.session.cancel`, answered by `serve`'s admission service) or its deadline
//! (a timer in the `serve` that started it, and the slot reconciler after a crash).
//!
//! In order: the session record goes to its terminal status by compare-and-set (from
//! then on nothing is dispatched, a late result finds the session ended, and a worker
//! claiming a queued task drops it); the stop notice goes to every process and is
//! answered once each will start no more calls for the session
//! ([`flotilla_agent::stops`]); the `done` event is published and the slot released;
//! only then is the requester answered. Every step is idempotent, and a repeated
//! request for an ended session performs the last three again (a crash half-way heals
//! on the client's retry).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_agent::Stops;
use flotilla_bus::{Bus, KvError};
use flotilla_protocol::subject::keys;
use flotilla_protocol::{
    Answer, AnswerSection, InputMessage, SessionId, SessionOutcome, SessionRecord, SessionStatus,
    StopAck, StopSession, TaskId, TaskRecord, TaskState, TraceParent, V1, epoch_ms,
};
use futures::StreamExt;

use crate::machine;

/// Compare-and-set rounds before giving up (the orchestrator writes the same record).
const ROUNDS: usize = 16;

/// How an end request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Ended by this request; `confirmed` of `expected` processes answered the stop.
    Now {
        /// Processes that confirmed.
        confirmed: u32,
        /// Processes listed in presence.
        expected: u32,
    },
    /// It had ended already, this way.
    Already(SessionOutcome),
}

/// The session could not be ended.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    /// No such session: check the id.
    #[error("no session {0}")]
    Unknown(SessionId),
    /// The record stayed contended, or NATS failed: retry.
    #[error("could not end the session: {0}")]
    Unavailable(String),
}

impl From<KvError> for EndError {
    fn from(e: KvError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Ends sessions, and keeps their deadline timers. Cheap to clone.
#[derive(Clone)]
pub struct Ender {
    bus: Bus,
    stops: Stops,
    stop_wait: Duration,
    /// Timers running: `<sid>` (session deadlines), `<sid>.<task>.<attempt>` (waits
    /// for input).
    timers: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for Ender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ender").finish_non_exhaustive()
    }
}

impl Ender {
    /// An ender over `bus`; `stops` is this process's own (it stops its own work at
    /// once); `stop_wait` bounds the wait for the other processes' answers.
    pub fn new(bus: Bus, stops: Stops, stop_wait: Duration) -> Self {
        Self {
            bus,
            stops,
            stop_wait,
            timers: Arc::default(),
        }
    }

    /// Ends `session` with `status` (`Cancelled` or `DeadlineExceeded`).
    pub async fn end(
        &self,
        session: &SessionId,
        status: SessionStatus,
        reason: &str,
    ) -> Result<Ended, EndError> {
        let key = keys::session(session);
        let records = self.bus.sessions();
        for _ in 0..ROUNDS {
            let Some((mut rec, rev)) = records.get_current::<SessionRecord>(&key, |_| true).await?
            else {
                return Err(EndError::Unknown(session.clone()));
            };
            if rec.status.is_terminal() {
                if matches!(
                    rec.status,
                    SessionStatus::Cancelled | SessionStatus::DeadlineExceeded
                ) {
                    // Perhaps ended by a request that died half-way: finish its work.
                    self.stop_everywhere(&rec).await;
                    self.announce(&rec).await?;
                }
                return Ok(Ended::Already(machine::outcome_of(rec.status)));
            }
            let partial = if status == SessionStatus::DeadlineExceeded {
                self.finished_sections(&rec).await?
            } else {
                None
            };
            let now = epoch_ms(SystemTime::now());
            if !machine::end(&mut rec, status, reason.to_owned(), partial, now) {
                return Ok(Ended::Already(machine::outcome_of(rec.status)));
            }
            rec.outbox.clear();
            match records.update(&key, &rec, rev).await {
                Ok(_) => {
                    let (confirmed, expected) = self.stop_everywhere(&rec).await;
                    self.announce(&rec).await?;
                    tracing::info!(session = %session, status = ?status, confirmed, expected, "session ended from outside");
                    metrics::counter!("flotilla_sessions_total", "outcome" => outcome_name(status))
                        .increment(1);
                    return Ok(Ended::Now {
                        confirmed,
                        expected,
                    });
                }
                Err(KvError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EndError::Unavailable(format!(
            "session {session} stayed contended for {ROUNDS} rounds"
        )))
    }

    /// Ends `session` at `deadline_ms` (ms since the epoch) unless it has ended by
    /// then. One timer per session in this process.
    pub fn at_deadline(&self, session: &SessionId, deadline_ms: u64) {
        {
            let mut timers = self.timers.lock().unwrap_or_else(PoisonError::into_inner);
            if !timers.insert(session.to_string()) {
                return;
            }
        }
        let this = self.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let now = epoch_ms(SystemTime::now());
            tokio::time::sleep(Duration::from_millis(deadline_ms.saturating_sub(now))).await;
            let result = this.end_past_deadline(&session, deadline_ms).await;
            this.timers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(session.as_str());
            if let Err(e) = result {
                // The slot reconciler looks again later.
                tracing::warn!(session = %session, error = %e, "could not end a session past its deadline");
            }
        });
    }

    /// Tells the orchestrator, at `deadline_ms`, that nobody answered the question of
    /// `task`'s `attempt` (unless a person did first: same message id). One timer per
    /// question in this process.
    pub fn at_input_deadline(
        &self,
        session: &SessionId,
        task: &TaskId,
        attempt: u32,
        deadline_ms: u64,
    ) {
        let key = format!("{session}.{task}.{attempt}");
        {
            let mut timers = self.timers.lock().unwrap_or_else(PoisonError::into_inner);
            if !timers.insert(key.clone()) {
                return;
            }
        }
        let (this, session, task) = (self.clone(), session.clone(), task.clone());
        tokio::spawn(async move {
            let now = epoch_ms(SystemTime::now());
            tokio::time::sleep(Duration::from_millis(deadline_ms.saturating_sub(now))).await;
            let msg = InputMessage {
                v: V1,
                session_id: session.clone(),
                task_id: task,
                attempt,
                answer: None,
            };
            if let Err(e) = publish_input(&this.bus, &msg).await {
                tracing::warn!(session = %session, error = %e, "could not end a wait for input; the reconciler looks again");
            }
            this.timers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
        });
    }

    /// Ends `session` as past its deadline (`deadline_ms`).
    pub async fn end_past_deadline(
        &self,
        session: &SessionId,
        deadline_ms: u64,
    ) -> Result<Ended, EndError> {
        let late = epoch_ms(SystemTime::now()).saturating_sub(deadline_ms);
        self.end(
            session,
            SessionStatus::DeadlineExceeded,
            &format!("deadline passed {late} ms ago"),
        )
        .await
    }

    /// The sections of the tasks that finished: one batched read of the task records.
    async fn finished_sections(&self, rec: &SessionRecord) -> Result<Option<Answer>, EndError> {
        if !rec.tasks.iter().any(|t| t.state == TaskState::Done) {
            return Ok(None);
        }
        let records = self
            .bus
            .sessions()
            .get_each::<TaskRecord>(
                &keys::task_pattern(&rec.session_id),
                &crate::orchestrator::task_keys(rec),
            )
            .await?;
        let sections: Vec<AnswerSection> = rec
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Done)
            .filter_map(|t| {
                let (_, tr, _) = records.iter().find(|(_, r, _)| r.task_id == t.task_id)?;
                let output = flotilla_protocol::task_machine::output_of(tr, t.attempt)?;
                Some(AnswerSection {
                    task_id: t.task_id.clone(),
                    role: t.role.clone(),
                    output: output.clone(),
                })
            })
            .collect();
        let done = sections.len();
        Ok(Some(Answer {
            summary: format!(
                "Deadline passed with {done} of {} tasks finished; their results follow.",
                rec.tasks.len()
            ),
            sections,
        }))
    }

    /// Stops the session's work in this process, then asks every process listed in
    /// presence to, and waits (at most `stop_wait`) for their answers.
    async fn stop_everywhere(&self, rec: &SessionRecord) -> (u32, u32) {
        self.stops.stop(&rec.session_id);
        let expected = match self.live_processes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count live processes; waiting the full stop_wait");
                u32::MAX
            }
        };
        let notice = StopSession {
            v: V1,
            session_id: rec.session_id.clone(),
            outcome: machine::outcome_of(rec.status),
        };
        let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
        let Ok(mut answers) = self
            .bus
            .request_many(self.bus.names().ctl_stop(), body)
            .await
        else {
            return (0, expected);
        };
        let mut confirmed = 0u32;
        let deadline = tokio::time::Instant::now() + self.stop_wait;
        while confirmed < expected {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(m)) if serde_json::from_slice::<StopAck>(&m.payload).is_ok() => {
                    confirmed += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let _ = answers.unsubscribe().await;
        let expected = if expected == u32::MAX {
            confirmed
        } else {
            expected
        };
        (confirmed, expected)
    }

    /// Processes with a presence record (`serve` and agents).
    async fn live_processes(&self) -> Result<u32, String> {
        let mut keys = self
            .bus
            .agents()
            .store()
            .keys()
            .await
            .map_err(|e| e.to_string())?;
        let mut n = 0u32;
        while let Some(k) = keys.next().await {
            if k.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The `done` event and the slot's release (both idempotent).
    async fn announce(&self, rec: &SessionRecord) -> Result<(), EndError> {
        let trace = TraceParent::parse(&rec.traceparent).ok();
        for effect in machine::derived_effects(rec) {
            match effect {
                flotilla_protocol::Effect::Emit { id, body } if id == "done" => self
                    .bus
                    .emit(&rec.session_id, &id, body, trace)
                    .await
                    .map_err(|e| EndError::Unavailable(e.to_string()))?,
                flotilla_protocol::Effect::ReleaseSlot if rec.slot_revision > 0 => {
                    crate::slots::release_taken(&self.bus, rec.slot, rec.slot_revision).await?
                }
                flotilla_protocol::Effect::ReleaseSlot => {
                    crate::slots::release(&self.bus, rec.slot, &rec.session_id).await?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Publishes `msg` to its session's orchestrator inbox (de-duplicated: a person's
/// answer and the timeout share the message id, so only the first counts).
pub async fn publish_input(
    bus: &Bus,
    msg: &InputMessage,
) -> Result<flotilla_bus::Published, flotilla_bus::PublishError> {
    let payload = Bytes::from(
        serde_json::to_vec(&flotilla_protocol::InboxMessage::Input(msg.clone()))
            .unwrap_or_default(),
    );
    bus.publish(&flotilla_bus::Outgoing {
        subject: bus
            .names()
            .inbox(&msg.session_id, &flotilla_protocol::Role::orchestrator()),
        msg_id: flotilla_protocol::MessageId::input(&msg.session_id, &msg.task_id, msg.attempt),
        session: Some(msg.session_id.clone()),
        attempt: Some(msg.attempt),
        trace: None,
        payload,
    })
    .await
}

fn outcome_name(status: SessionStatus) -> &'static str {
    match status {
        SessionStatus::Cancelled => "cancelled",
        SessionStatus::DeadlineExceeded => "deadline_exceeded",
        SessionStatus::Completed => "completed",
        _ => "failed",
    }
}

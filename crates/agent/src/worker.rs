//! The role-pool worker runtime: pulls task attempts from the role's shared consumer,
//! claims each by compare-and-set on its task record, runs the [`Agent`], validates and
//! commits the output by compare-and-set, notifies the orchestrator, and only then acks.
//!
//! Every step is idempotent, so a crash anywhere leads to redelivery and the same final
//! state: a redelivered attempt whose record is already committed only re-sends the
//! (de-duplicated) notification; a holder whose claim was taken over is fenced off by
//! the record's revision and attempt.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_bus::{Bus, Delivery, KvError, Outgoing, PoolConsumer, PoolSettings, VerdictError};
use flotilla_protocol::subject::keys;
use flotilla_protocol::{
    AgentId, ErrorCode, EventBody, InFlight, InboxMessage, MessageId, ParsedSubject, ResultMessage,
    Role, TaskMessage, TaskOutcome, TaskRecord, TaskRunState, TraceParent, V1, decode, epoch_ms,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agent::{Agent, AgentError, TaskContext};
use crate::presence::{LivenessConfig, Tracker};

/// Parses and validates an inbox delivery for `role`: the subject must be an inbox of
/// `role`, the body must decode, and body and subject must agree.
pub fn open_inbox_delivery(
    bus: &Bus,
    d: &Delivery,
    role: &Role,
) -> Result<InboxMessage, VerdictError> {
    let (session, subject_role) = match bus.names().parse(d.subject()) {
        Ok(ParsedSubject::Inbox { session, role }) => (session, role),
        Ok(_) | Err(_) => {
            return Err(VerdictError::poison(
                ErrorCode::Malformed,
                format!("not an inbox subject: {}", d.subject()),
            ));
        }
    };
    if &subject_role != role {
        return Err(VerdictError::poison(
            ErrorCode::UnknownRole,
            format!("delivered to the {role} pool from the {subject_role} inbox"),
        ));
    }
    let msg: InboxMessage = decode(d.payload(), bus.config().max_payload)
        .map_err(|e| VerdictError::poison(e.code(), e.to_string()))?;
    msg.check_route(&session, role)
        .map_err(|e| VerdictError::poison(e.code(), e.to_string()))?;
    Ok(msg)
}

/// A role pool process.
pub struct Worker {
    bus: Bus,
    role: Role,
    agent_id: AgentId,
    agent: Arc<dyn Agent>,
    settings: PoolSettings,
    liveness: LivenessConfig,
    tracker: Tracker,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("role", &self.role)
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker of `role` running `agent`.
    pub fn new(bus: Bus, role: Role, agent: Arc<dyn Agent>, settings: PoolSettings) -> Self {
        let agent_id = AgentId::generate(&role);
        Self {
            bus,
            role,
            agent_id,
            agent,
            settings,
            liveness: LivenessConfig::default(),
            tracker: Tracker::default(),
        }
    }

    /// Heartbeat intervals of this process's presence.
    pub fn with_liveness(mut self, liveness: LivenessConfig) -> Self {
        self.liveness = liveness;
        self
    }

    /// Uses `id` as this process's agent id (the holder written into task records).
    pub fn with_agent_id(mut self, id: AgentId) -> Self {
        self.agent_id = id;
        self
    }

    /// This process's agent id.
    pub fn agent_id(&self) -> &AgentId {
        &self.agent_id
    }

    /// Serves the role until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), flotilla_bus::ConsumerError> {
        self.bus
            .ensure_inbox(&self.role)
            .await
            .map_err(|e| flotilla_bus::ConsumerError {
                name: self.bus.names().stream_inbox(&self.role),
                detail: e.to_string(),
            })?;
        let consumer = PoolConsumer::for_role(&self.bus, &self.role, self.settings.clone()).await?;
        let heartbeat = tokio::spawn(crate::presence::heartbeat(
            self.bus.clone(),
            self.agent_id.clone(),
            self.role.clone(),
            self.tracker.clone(),
            self.liveness.clone(),
            shutdown.child_token(),
        ));
        tracing::info!(role = %self.role, agent = %self.agent_id, "worker pool process started");
        let this = Arc::new(self);
        let bus = this.bus.clone();
        consumer
            .serve(bus, shutdown, move |d: Delivery| {
                let this = this.clone();
                async move {
                    let verdict = this.handle(&d).await;
                    (d, verdict)
                }
            })
            .await;
        let _ = heartbeat.await;
        Ok(())
    }

    async fn handle(&self, d: &Delivery) -> Result<(), VerdictError> {
        let msg = open_inbox_delivery(&self.bus, d, &self.role)?;
        let InboxMessage::Task(task) = msg else {
            return Err(VerdictError::poison(
                ErrorCode::UnknownRole,
                "only task messages go to worker inboxes",
            ));
        };
        let trace = d.trace();
        let span = tracing::info_span!(
            "task",
            session = %task.session_id,
            role = %task.role,
            task = %task.task_id,
            attempt = task.attempt,
            agent = %self.agent_id,
            trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
        );
        let ack_subject = d.ack_subject().unwrap_or_default().to_owned();
        let result = self
            .run_task(task, trace, &ack_subject, d.delivered() > 1)
            .instrument(span)
            .await;
        self.tracker.finish(&ack_subject);
        result
    }

    async fn run_task(
        &self,
        task: TaskMessage,
        trace: Option<TraceParent>,
        ack_subject: &str,
        redelivered: bool,
    ) -> Result<(), VerdictError> {
        let records = self.bus.sessions();
        // Whether an earlier delivery may have started this attempt.
        let mut resumed = redelivered;
        let key = keys::task(&task.session_id, &task.task_id);
        // Claim.
        let mut claimed_rev = None;
        for _ in 0..8 {
            let Some((rec, rev)) = records.get::<TaskRecord>(&key).await? else {
                return Err(VerdictError::poison(
                    ErrorCode::UnknownSession,
                    format!("no task record {key}: unknown session or task"),
                ));
            };
            if rec.role != task.role {
                return Err(VerdictError::poison(
                    ErrorCode::WrongSession,
                    "task record is for another role",
                ));
            }
            if rec.attempt > task.attempt {
                tracing::info!(current = rec.attempt, "stale attempt fenced off");
                return Ok(());
            }
            if rec.attempt < task.attempt {
                return Err(VerdictError::retry(
                    Duration::from_millis(200),
                    "task record not yet at this attempt",
                ));
            }
            if matches!(rec.state, TaskRunState::Done | TaskRunState::Failed) {
                // Committed earlier (we crashed before acking): re-send the notice.
                let outcome = match (&rec.outcome, rec.state) {
                    (Some(o), _) => o.clone(),
                    (None, TaskRunState::Done) => TaskOutcome::Completed,
                    (None, _) => TaskOutcome::Failed {
                        reason: rec.error.clone().unwrap_or_default(),
                    },
                };
                self.notify(&task, outcome, None, None, trace).await?;
                return Ok(());
            }
            if rec.state == TaskRunState::Running && rec.holder.as_ref() != Some(&self.agent_id) {
                // Someone claimed it. Take over only once their claim is older than the
                // ack wait (they are presumed dead); until then this is a duplicate
                // delivery, and it comes back when the claim would have expired.
                let age = epoch_ms(SystemTime::now()).saturating_sub(rec.updated_ms);
                let ack_wait = self.settings.effective_ack_wait().as_millis() as u64;
                if age < ack_wait {
                    return Err(VerdictError::retry(
                        Duration::from_millis(ack_wait - age + 50),
                        format!("claimed by {:?} {age} ms ago", rec.holder),
                    ));
                }
                tracing::warn!(holder = ?rec.holder, age_ms = age, "taking over a stale claim");
            }
            // List the task in our presence before the claim lands, so whenever the
            // record names us as holder, a crash of ours is seen with it listed and the
            // watchdog releases it at once.
            let now = epoch_ms(SystemTime::now());
            self.tracker.start(InFlight {
                session_id: task.session_id.clone(),
                task_id: Some(task.task_id.clone()),
                attempt: Some(task.attempt),
                ack_subject: ack_subject.to_owned(),
                since_ms: now,
                progress_ms: now,
            });
            if !self.tracker.published(Duration::from_secs(1)).await {
                tracing::debug!(
                    "presence not confirmed; a crash now would be recovered by the ack wait"
                );
            }
            resumed |= rec.state == TaskRunState::Running;
            let mut next = rec.clone();
            next.state = TaskRunState::Running;
            next.holder = Some(self.agent_id.clone());
            next.updated_ms = epoch_ms(SystemTime::now());
            match records.update(&key, &next, rev).await {
                Ok(r) => {
                    claimed_rev = Some(r);
                    break;
                }
                Err(KvError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let Some(claimed_rev) = claimed_rev else {
            return Err(VerdictError::retry(
                Duration::from_millis(200),
                "claim kept conflicting",
            ));
        };

        // Run.
        let ctx = TaskContext {
            memory: self.bus.memory().session(&task.session_id),
            spend: crate::budget::SpendMeter::default(),
            resumed,
            progress: crate::agent::Progress::new(
                flotilla_bus::AckHandle::new(self.bus.client.clone(), ack_subject.to_owned()),
                self.tracker.clone(),
            ),
        };
        // The pool consumer keeps the delivery alive while the agent runs; the
        // watchdog's stuck timeout sees only the agent's own progress reports.
        let result = ctx.spend.clone().scope(self.agent.run(&ctx, &task)).await;
        let spend = ctx.spend.spend();
        if spend.rate_limit_waits > 0 {
            let body = EventBody::RateLimitWait {
                task_id: task.task_id.clone(),
                calls: spend.rate_limit_waits,
                waited_ms: spend.rate_limit_wait_ms,
            };
            let id = format!(
                "ratelimit.{}.{}.{}",
                task.task_id, task.attempt, self.agent_id
            );
            if let Err(e) = self.bus.emit(&task.session_id, &id, body, trace).await {
                tracing::warn!(error = %e, "could not log the rate-limit wait");
            }
        }
        let (state, output, error, outcome) = match result {
            Ok(output) => (
                TaskRunState::Done,
                Some(output),
                None,
                TaskOutcome::Completed,
            ),
            Err(AgentError::Transient(why)) => {
                return Err(VerdictError::retry(Duration::from_secs(1), why));
            }
            Err(AgentError::Unusable(why)) => (
                TaskRunState::Failed,
                None,
                Some(why.clone()),
                TaskOutcome::Failed { reason: why },
            ),
            Err(AgentError::Stopped(e)) => {
                tracing::warn!(budget = %e.budget, reason = %e.reason, "budget stopped the attempt");
                (
                    TaskRunState::Failed,
                    None,
                    Some(e.to_string()),
                    TaskOutcome::Stopped {
                        budget: e.budget,
                        reason: e.reason,
                    },
                )
            }
            Err(AgentError::Clarify(question)) => (
                TaskRunState::Failed,
                None,
                Some(format!("needs clarification: {question}")),
                TaskOutcome::Clarify { question },
            ),
        };

        // Commit, fenced by the claim's revision.
        let committed = TaskRecord {
            v: V1,
            session_id: task.session_id.clone(),
            task_id: task.task_id.clone(),
            role: task.role.clone(),
            attempt: task.attempt,
            state,
            holder: Some(self.agent_id.clone()),
            output,
            error,
            outcome: Some(outcome.clone()),
            updated_ms: epoch_ms(SystemTime::now()),
        };
        match records.update(&key, &committed, claimed_rev).await {
            Ok(_) => {}
            Err(KvError::Conflict { .. }) => {
                tracing::warn!("claim was taken over while running; result fenced off");
                let body = EventBody::Result {
                    task_id: task.task_id.clone(),
                    role: task.role.clone(),
                    attempt: task.attempt,
                    accepted: false,
                    reason: Some(format!(
                        "fenced: {} lost its claim to another holder",
                        self.agent_id
                    )),
                };
                let id = format!("fenced.{}.{}.{}", task.task_id, task.attempt, self.agent_id);
                if let Err(e) = self.bus.emit(&task.session_id, &id, body, trace).await {
                    tracing::warn!(error = %e, "could not log the fenced result");
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        self.notify(&task, outcome, Some(ctx.memory.stats()), Some(spend), trace)
            .await?;
        Ok(())
    }

    /// Tells the orchestrator the attempt ended (de-duplicated by message id).
    async fn notify(
        &self,
        task: &TaskMessage,
        outcome: TaskOutcome,
        memory: Option<flotilla_protocol::MemoryStats>,
        spend: Option<flotilla_protocol::Spend>,
        trace: Option<TraceParent>,
    ) -> Result<(), VerdictError> {
        let msg = InboxMessage::Result(ResultMessage {
            v: V1,
            session_id: task.session_id.clone(),
            task_id: task.task_id.clone(),
            role: task.role.clone(),
            attempt: task.attempt,
            outcome,
            memory,
            spend,
        });
        let payload = serde_json::to_vec(&msg)
            .map_err(|e| VerdictError::retry(Duration::from_secs(1), e.to_string()))?;
        let out = Outgoing {
            subject: self
                .bus
                .names()
                .inbox(&task.session_id, &Role::orchestrator()),
            msg_id: MessageId::result(&task.session_id, &task.task_id, task.attempt),
            session: Some(task.session_id.clone()),
            attempt: Some(task.attempt),
            trace,
            payload: Bytes::from(payload),
        };
        self.bus.publish(&out).await?;
        Ok(())
    }
}

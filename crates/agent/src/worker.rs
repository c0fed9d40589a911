//! The role-pool worker runtime: pulls task attempts from the role's shared consumer,
//! claims each by compare-and-set on its claim key (`<sid>.c.<role>.<task>`), runs the
//! [`Agent`], commits the outcome to the task's commit key (`<sid>.t.<role>.<task>`)
//! fenced on the claim's revision, and only then acks. The commit is the result: the
//! orchestrator follows commits with a consumer of its own, so nothing else is sent.
//!
//! Every step is idempotent, so a crash anywhere leads to redelivery and the same final
//! state: a redelivered attempt whose commit is there is acked and nothing more; a
//! holder whose claim was taken over or fenced has its commit refused by the server.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_bus::{Applied, Bus, Delivery, PoolConsumer, PoolSettings, Start, Step, VerdictError};
use flotilla_protocol::subject::keys;
use flotilla_protocol::task_machine::{self, Claim};
use flotilla_protocol::{
    AgentId, ErrorCode, EventBody, InboxMessage, MessageId, ParsedSubject, Role, SessionRecord,
    TaskMessage, TaskOutcome, TraceParent, decode, epoch_ms,
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
    flotilla_protocol::headers::check_session(
        d.header(flotilla_protocol::headers::SESSION),
        Some(&session),
    )
    .map_err(|e| VerdictError::poison(ErrorCode::WrongSession, e.to_string()))?;
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
    stops: crate::stops::Stops,
    verifier: flotilla_bus::Verifier,
    /// What each allowance checks its claim with (this process's claims, shared).
    claim_check: crate::agent::ClaimCheck,
}

/// Why a claim was not written.
enum NotClaimed {
    /// What the task machine decided (boxed: a `Take` holds a whole record).
    Decision(Box<Claim>),
    /// The attempt is another process's, older than the claim's time to live: it may
    /// be taken over only if that process is gone.
    HolderMayLive(AgentId),
    /// Another handler of this process runs the attempt, and the claim is still ours.
    RunningHere,
    /// A create found a claim there: look at the commit key before deciding.
    Recheck,
}

/// A claim held through the model call: what its commit takes of the claimed
/// record, and its revision (what the commit is fenced on).
struct Claimed {
    record: task_machine::Held,
    revision: u64,
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
        let verifier = flotilla_bus::Verifier::new(bus.sessions().clone());
        let claim_check = crate::agent::ClaimCheck::new(bus.sessions().clone(), agent_id.clone());
        Self {
            claim_check,
            verifier,
            bus,
            role,
            agent_id,
            agent,
            settings,
            tracker: Tracker::overdue_after(LivenessConfig::default().list_after()),
            liveness: LivenessConfig::default(),
            stops: crate::stops::Stops::default(),
        }
    }

    /// Shares `verifier`'s signer keys and checked batches (the workers of one process
    /// share them, so a batch of tasks for several roles is checked once), reading
    /// registrations through this worker's own connection.
    pub fn with_verifier(mut self, verifier: &flotilla_bus::Verifier) -> Self {
        self.verifier = verifier.sharing(self.bus.sessions().clone());
        self
    }

    /// This worker's signature verifier (to share with the other workers of the
    /// process: [`Self::with_verifier`]).
    pub fn verifier(&self) -> &flotilla_bus::Verifier {
        &self.verifier
    }

    /// Heartbeat intervals of this process's presence.
    pub fn with_liveness(mut self, liveness: LivenessConfig) -> Self {
        self.tracker = Tracker::overdue_after(liveness.list_after());
        self.liveness = liveness;
        self
    }

    /// Uses `id` as this process's agent id (the holder written into task records).
    pub fn with_agent_id(mut self, id: AgentId) -> Self {
        self.claim_check = crate::agent::ClaimCheck::new(self.bus.sessions().clone(), id.clone());
        self.agent_id = id;
        self
    }

    /// This process's agent id.
    pub fn agent_id(&self) -> &AgentId {
        &self.agent_id
    }

    /// Serves the role until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), flotilla_bus::ConsumerError> {
        let Some(consumer) = self.bind(&shutdown).await? else {
            return Ok(());
        };
        let stop_notices = crate::stops::listen(
            self.bus.clone(),
            self.agent_id.to_string(),
            self.stops.clone(),
            shutdown.child_token(),
        )
        .await;
        let (listed, first_written) = tokio::sync::oneshot::channel();
        let heartbeat = tokio::spawn(crate::presence::heartbeat_with(
            self.bus.clone(),
            self.agent_id.clone(),
            self.role.clone(),
            self.tracker.clone(),
            self.liveness.clone(),
            shutdown.child_token(),
            Some(listed),
        ));
        // Listed in presence before the first claim (bounded: a slow bucket delays
        // work by at most the publish timeout).
        let _ = tokio::time::timeout(self.bus.config().publish_timeout, first_written).await;
        tracing::info!(role = %self.role, agent = %self.agent_id, "worker pool process started");
        let this = Arc::new(self);
        let bus = this.bus.clone();
        consumer
            .serve(bus, shutdown, move |mut d: Delivery| {
                let this = this.clone();
                async move {
                    let verdict = this.handle(&mut d).await;
                    (d, verdict)
                }
            })
            .await;
        let _ = heartbeat.await;
        let _ = stop_notices.await;
        Ok(())
    }

    /// Handles one delivery of a task.
    ///
    /// (An `async` block rather than an `async fn`: an `async fn` moves each argument
    /// into a second slot of its own, and this future lives through the model call.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn handle<'a>(
        &'a self,
        d: &'a mut Delivery,
    ) -> impl Future<Output = Result<(), VerdictError>> + Send + 'a {
        async move {
            // (Matched in place: no binding of the whole message stays in this future, which
            // lives through the model call, beside the task taken out of it.)
            let task = match open_inbox_delivery(&self.bus, d, &self.role)? {
                InboxMessage::Task(task) => task,
                _ => {
                    return Err(VerdictError::poison(
                        ErrorCode::UnknownRole,
                        "only task messages go to worker inboxes",
                    ));
                }
            };
            // A session ended from outside (cancel, deadline): no work for it starts here.
            // The guard also counts this handler in on the attempt: the server can deliver
            // an attempt again to the process that runs it (a consumer leader elected on a
            // cluster may not have seen the keepalives sent to the old one). The claim
            // names this process already, so the copy would resume the attempt, call the
            // model a second time beside the first, and fence off the first's commit. The
            // copy waits at the claim instead, its delivery kept alive, while the claim is
            // still this process's (the watchdog may take it from a stuck first handler:
            // then the copy runs the attempt).
            let Some(guard) =
                self.stops
                    .guard_attempt(&task.session_id, &task.task_id, task.attempt)
            else {
                tracing::debug!(session = %task.session_id, task = %task.task_id, "session stopped; task dropped");
                return Ok(());
            };
            // A task signed by a registered orchestrator key needs no check against the
            // session record; anything else gets that check (see `flotilla_bus::signing`).
            let vouched = match Box::pin(self.verifier.verify(
                d.subject(),
                d.payload(),
                flotilla_bus::Signed::from_headers(|h| d.header(h)),
            ))
            .await
            {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(session = %task.session_id, task = %task.task_id, reason = %e, "signature does not vouch for the task; checking the session record");
                    false
                }
            };
            // Decoded and checked: the payload is not held through the model call (the
            // stream keeps the message until it is acked; a dead-letter copy reads it).
            d.release_payload();
            // (The span is made in place and moved into the instrumented future: this
            // future, which lives through the model call, keeps no copy of its own.)
            // (One handle shared with the delivery and its keepalive, not a copy; the
            // run's own, not held in this future beside it.)
            let ack = d
                .handle()
                .unwrap_or_else(|| self.bus.ack_handle(d.ack_subject().unwrap_or_default()));
            let run = self
                .claim_and_run(&task, d, ack, vouched)
                .instrument(self.task_span(&task, d.trace().as_ref()));
            // Both pinned in place (see `unless_stopped`).
            tokio::pin!(run);
            let stopped = guard.stopped();
            tokio::pin!(stopped);
            let finished = crate::stops::unless_stopped(run, stopped).await;
            // Stopped mid-task: the model or tool call in flight is dropped (aborted), and
            // nothing is committed or reported for a session that has ended.
            let result = finished.unwrap_or_else(|span| {
                span.in_scope(|| {
                    tracing::info!("session stopped; task aborted");
                    flotilla_bus::trace::span_event("stopped", Vec::new());
                });
                Ok(())
            });
            // (The delivery's ack subject is the run's handle's: see above.)
            self.tracker.finish(d.ack_subject().unwrap_or_default());
            result
        }
    }

    /// The span of a task attempt's handling.
    fn task_span(&self, task: &TaskMessage, trace: Option<&TraceParent>) -> tracing::Span {
        let span = tracing::info_span!(
            "task",
            session = %task.session_id,
            role = %task.role,
            task = %task.task_id,
            attempt = task.attempt,
            agent = %self.agent_id,
            trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
        );
        flotilla_bus::trace::set_parent(&span, trace.copied());
        span
    }

    /// For a task its signature does not vouch for: the session's task table must list
    /// it, as the orchestrator writes the table before it publishes a task, so a task it
    /// does not list is forged or lost. (A table that does not list this attempt yet
    /// may be a lagging replica's: the leader is asked before anything is refused.)
    /// `Ok(true)` lets it run; `Ok(false)`: the session has ended, nothing to do.
    async fn check_against_table(&self, task: &TaskMessage) -> Result<bool, VerdictError> {
        let Some((session, _)) = self
            .bus
            .sessions()
            .get_current::<SessionRecord>(&keys::session(&task.session_id), |s| {
                s.tasks
                    .iter()
                    .any(|t| t.task_id == task.task_id && t.attempt >= task.attempt)
            })
            .await?
        else {
            return Err(VerdictError::poison(
                ErrorCode::UnknownSession,
                format!("no session {}", task.session_id),
            ));
        };
        let Some(entry) = session.tasks.iter().find(|t| t.task_id == task.task_id) else {
            return Err(VerdictError::poison(
                ErrorCode::UnknownSession,
                format!("session {} has no task {}", task.session_id, task.task_id),
            ));
        };
        if entry.role != task.role {
            return Err(VerdictError::poison(
                ErrorCode::WrongSession,
                format!("task {} belongs to role {}", task.task_id, entry.role),
            ));
        }
        if session.status.is_terminal() {
            tracing::info!(status = ?session.status, "session already ended; nothing to do");
            return Ok(false);
        }
        // While the attempt is the table's current one, the message must say what the
        // table says: the instruction, and the allowance set aside for it (a made-up
        // allowance would spend past the session's budget).
        let granted = (entry.allowance > 0).then_some(entry.allowance);
        if entry.attempt == task.attempt
            && entry.state == flotilla_protocol::TaskState::Dispatched
            && (task.allowance != granted || task.instruction != entry.instruction)
        {
            return Err(VerdictError::poison(
                ErrorCode::Invalid,
                format!(
                    "task {} attempt {} does not match the session's task table (allowance or instruction)",
                    task.task_id, task.attempt
                ),
            ));
        }
        if entry.attempt < task.attempt {
            // Not dispatched yet as far as this read shows (a stale replica): look
            // again later; the delivery bound ends a forgery.
            return Err(VerdictError::retry(
                Duration::from_millis(200),
                "the session has not dispatched this attempt",
            ));
        }
        Ok(true)
    }

    /// Checks a task its signature does not vouch for (`vouched`) against the session's
    /// table, claims it (fenced by the record's revision), runs the agent, and commits.
    ///
    /// (An `async` block rather than an `async fn`, as [`Self::handle`] is: see there.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn claim_and_run<'a>(
        &'a self,
        task: &'a TaskMessage,
        d: &'a Delivery,
        ack: flotilla_bus::AckHandle,
        vouched: bool,
    ) -> impl Future<Output = Result<(), VerdictError>> + Send + 'a {
        async move {
            let redelivered = d.delivered() > 1;
            if !vouched && !Box::pin(self.check_against_table(task)).await? {
                return Ok(());
            }
            let ack_subject = ack.subject();
            // (Its own boxed future: what the claim keeps is gone before the model call.
            // Of the claimed record, only what its commit takes is kept.)
            let (claimed, claimed_rev, resumed) =
                match Box::pin(self.claim(task, ack_subject, redelivered)).await? {
                    Some((record, rev, resumed)) => (task_machine::Held::of(&record), rev, resumed),
                    None => return Ok(()),
                };
            // Tracked for the stuck check (listed in our presence only once overdue). A
            // crash is covered by the claim itself: it names us and this delivery's ack
            // subject, and the watchdog indexes running claims with their holders.
            self.tracker.start(
                &ack,
                crate::InFlightWork {
                    session_id: task.session_id.clone(),
                    task: Some((task.task_id.clone(), task.attempt)),
                },
            );
            if resumed && claimed.attempt() == task.attempt {
                tracing::info!("resuming an attempt another holder started");
            }
            if claimed.holders() > 1 && claimed.attempt() == task.attempt {
                // Another holder had this attempt (taken over, or fenced by the watchdog).
                flotilla_bus::trace::span_event(
                    "reassigned",
                    vec![
                        flotilla_bus::trace::KeyValue::new(
                            "flotilla.attempt",
                            i64::from(task.attempt),
                        ),
                        flotilla_bus::trace::KeyValue::new(
                            "flotilla.holders",
                            i64::from(claimed.holders()),
                        ),
                    ],
                );
            }

            // Run (on an allowance, when the session set one aside).
            let allowance = task.allowance.map(|tokens| {
                crate::agent::Allowance::new(
                    tokens,
                    claimed.holders().max(1) - 1,
                    Some(self.claim_check.clone()),
                )
            });
            let ctx = TaskContext {
                memory: self.bus.memory().session(&task.session_id),
                spend: crate::budget::SpendMeter::default(),
                resumed,
                progress: crate::agent::Progress::new(ack.clone(), self.tracker.clone()),
                allowance,
            };
            // The pool consumer keeps the delivery alive while the agent runs; the
            // watchdog's stuck timeout sees only the agent's own progress reports.
            let result = ctx.spend.clone().scope(self.agent.run(&ctx, task)).await;
            // What follows the model call is its own boxed future: what the commit keeps
            // (the committed record, its headers, the write) is not part of this one,
            // which every task holds through its model call.
            let claim = Claimed {
                record: claimed,
                revision: claimed_rev,
            };
            // (The trace context is read again from the delivery, which keeps it, rather
            // than held through the model call beside it.)
            Box::pin(self.settle(task, d.trace(), claim, ctx, result)).await
        }
    }

    /// After the model call: logs a rate-limit wait, then commits the outcome fenced on
    /// the claim's revision (or reports it fenced off).
    async fn settle(
        &self,
        task: &TaskMessage,
        trace: Option<TraceParent>,
        claim: Claimed,
        ctx: TaskContext,
        result: Result<flotilla_protocol::TaskOutput, AgentError>,
    ) -> Result<(), VerdictError> {
        let Claimed {
            record: claimed,
            revision: claimed_rev,
        } = claim;
        // (Made again from the task's ids rather than held through the model call.)
        let claim_key = keys::claim(&task.session_id, &task.role, &task.task_id);
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
            if let Err(e) = Box::pin(self.bus.emit(&task.session_id, &id, body, trace)).await {
                tracing::warn!(error = %e, "could not log the rate-limit wait");
            }
        }
        let (output, outcome) = match result {
            Ok(output) => (Some(output), TaskOutcome::Completed),
            Err(AgentError::Transient(why)) => {
                return Err(VerdictError::retry(Duration::from_secs(1), why));
            }
            Err(AgentError::Unusable(why)) => (None, TaskOutcome::Failed { reason: why }),
            Err(AgentError::Stopped(e)) => {
                tracing::warn!(budget = %e.budget, reason = %e.reason, "budget stopped the attempt");
                flotilla_bus::trace::span_event(
                    "budget_exhausted",
                    vec![flotilla_bus::trace::KeyValue::new(
                        "flotilla.budget",
                        e.budget.to_string(),
                    )],
                );
                (
                    None,
                    TaskOutcome::Stopped {
                        budget: e.budget,
                        reason: e.reason,
                    },
                )
            }
            Err(AgentError::Clarify(question)) => (None, TaskOutcome::Clarify { question }),
        };

        // Commit, fenced on the claim's revision: one write, which the orchestrator's
        // consumer of commits takes as the result. Refused means the claim was taken
        // over or fenced (the watchdog, a newer attempt, the dead-letter mover).
        let mut committed = claimed.commit(
            task,
            &self.agent_id,
            outcome,
            output,
            epoch_ms(SystemTime::now()),
        );
        committed.spend = Some(spend);
        committed.memory = Some(ctx.memory.stats());
        committed.attempt_tokens = ctx.allowance.as_ref().and_then(|a| a.attempt_tokens());
        let commit_key = keys::task(&task.session_id, &task.role, &task.task_id);
        let headers = flotilla_bus::message_headers(
            &MessageId::commit(&task.session_id, &task.task_id, task.attempt),
            Some(&task.session_id),
            Some(task.attempt),
            trace,
        );
        // An outage is waited out here rather than by running the attempt (and its
        // model calls) again. A retried commit is stored once (its message id); one
        // refused after an unanswered try is ours when the key holds exactly it.
        let mut tries = 0;
        let written = Box::pin(flotilla_bus::outlast(
            || {
                tries += 1;
                self.bus.sessions().put_fenced(
                    &commit_key,
                    &committed,
                    &claim_key,
                    claimed_rev,
                    headers.clone(),
                )
            },
            |e| matches!(e, flotilla_bus::KvError::Unavailable { .. }),
        ))
        .await;
        let fenced = match written {
            Ok(w) => {
                if w.duplicate {
                    tracing::debug!("commit was stored already");
                }
                false
            }
            Err(flotilla_bus::KvError::Conflict { .. }) => {
                tries <= 1
                    || Box::pin(
                        self.bus
                            .sessions()
                            .get_latest::<flotilla_protocol::TaskRecord>(&commit_key),
                    )
                    .await?
                    .is_none_or(|(now, _)| now != committed)
            }
            Err(e) => return Err(e.into()),
        };
        if fenced {
            tracing::warn!("claim was taken over while running; result fenced off");
            flotilla_bus::trace::span_event("fenced", Vec::new());
            let body = EventBody::Result {
                task_id: task.task_id.clone(),
                role: task.role.clone(),
                attempt: task.attempt,
                accepted: false,
                reason: Some(format!(
                    "fenced: {} lost its claim to another holder",
                    self.agent_id
                )),
                tokens: None,
            };
            let id = format!("fenced.{}.{}.{}", task.task_id, task.attempt, self.agent_id);
            if let Err(e) = Box::pin(self.bus.emit(&task.session_id, &id, body, trace)).await {
                tracing::warn!(error = %e, "could not log the fenced result");
            }
        }
        Ok(())
    }

    /// Claims `task`'s attempt for this process: the claimed record, its revision and
    /// whether the attempt was resumed; `None` when there is nothing to run (a stale
    /// attempt, or one committed already).
    async fn claim(
        &self,
        task: &TaskMessage,
        ack_subject: &str,
        redelivered: bool,
    ) -> Result<Option<(flotilla_protocol::TaskRecord, u64, bool)>, VerdictError> {
        let key = keys::claim(&task.session_id, &task.role, &task.task_id);
        let commit_key = keys::task(&task.session_id, &task.role, &task.task_id);
        // Claim. The first delivery of a first attempt creates the claim (one round
        // trip); anything else looks at the commit key first (a committed attempt is
        // never run again), then reads the claim.
        let mut absent = task.attempt == 1 && !redelivered;
        let claim_ttl = self.settings.effective_ack_wait().as_millis() as u64;
        // A process found gone whose claim of this attempt may be taken over.
        let mut gone: Option<AgentId> = None;
        loop {
            if !absent && Box::pin(self.settled(task, &commit_key)).await? {
                return Ok(None);
            }
            let first = std::mem::replace(&mut absent, false);
            let start = if first { Start::Absent } else { Start::Read };
            // Round trips are boxed: a future's size is its largest state's, and this
            // one is allocated for as long as the model call lasts, so only what the
            // call needs should be inline.
            let applied = Box::pin(self.bus.sessions().transition(&key, start, 8, |current| {
                if first && current.is_some() {
                    return Step::Keep(Err(NotClaimed::Recheck));
                }
                let now = epoch_ms(SystemTime::now());
                match task_machine::claim(current, task, &self.agent_id, claim_ttl, now) {
                    Claim::Take { .. }
                        if current.is_some_and(|c| {
                            c.state == flotilla_protocol::TaskRunState::Running
                                && c.attempt == task.attempt
                                && c.holder.as_ref() == Some(&self.agent_id)
                        }) && self.stops.attempt_shared(
                            &task.session_id,
                            &task.task_id,
                            task.attempt,
                        ) =>
                    {
                        Step::Keep(Err(NotClaimed::RunningHere))
                    }
                    Claim::Take {
                        mut record,
                        resumed,
                    } => {
                        // Another process's claim of this attempt, past its time to
                        // live: its holder may still be in a long model call.
                        if let Some(holder) = current
                            .filter(|c| {
                                c.state == flotilla_protocol::TaskRunState::Running
                                    && c.attempt == task.attempt
                            })
                            .and_then(|c| c.holder.as_ref())
                            .filter(|h| **h != self.agent_id && gone.as_ref() != Some(*h))
                        {
                            return Step::Keep(Err(NotClaimed::HolderMayLive(holder.clone())));
                        }
                        record.ack_subject = Some(ack_subject.to_owned());
                        let again = current.is_some_and(|c| c.attempt == task.attempt);
                        Step::Write(record.clone(), Ok((record, resumed, again)))
                    }
                    other => Step::Keep(Err(NotClaimed::Decision(Box::new(other)))),
                }
            }))
            .await?;
            let wait = match applied {
                Applied::Written {
                    value: Ok((record, resumed, again)),
                    revision,
                } => {
                    // The attempt was claimed before: its holder may have committed
                    // between our look at the commit key and this claim (a handler of
                    // this process that has just ended, or a holder found gone). A
                    // commit stored before our claim shows on the leader now; any later
                    // one is refused, as our claim moved.
                    if again && Box::pin(self.settled(task, &commit_key)).await? {
                        return Ok(None);
                    }
                    return Ok(Some((record, revision, resumed || redelivered)));
                }
                // (The closure writes exactly the `Take` decisions: a written refusal or
                // a kept claim cannot happen, and would be retried like a conflict.)
                Applied::Written { value: Err(_), .. }
                | Applied::Kept(Ok(_))
                | Applied::Contended => {
                    return Err(VerdictError::retry(
                        Duration::from_millis(200),
                        "claim kept conflicting",
                    ));
                }
                // A claim is taken from a process only once it is gone (its presence
                // expired): one that lives keeps its delivery alive through a long
                // call, and a live but stuck one is fenced by the watchdog.
                Applied::Kept(Err(NotClaimed::HolderMayLive(holder))) => {
                    if !Box::pin(self.lives(&holder)).await {
                        gone = Some(holder);
                        continue;
                    }
                    tracing::debug!(%holder, "claimed by a live process; waiting for it");
                    Duration::from_millis(claim_ttl)
                }
                Applied::Kept(Err(NotClaimed::Recheck)) => continue,
                Applied::Kept(Err(NotClaimed::RunningHere)) => {
                    tracing::debug!("another handler of this process runs the attempt; waiting");
                    Duration::from_millis(claim_ttl)
                }
                Applied::Kept(Err(NotClaimed::Decision(decision))) => match *decision {
                    Claim::Stale { current } => {
                        tracing::info!(current, "stale attempt fenced off");
                        return Ok(None);
                    }
                    // (A claim written by a worker of the earlier protocol, which
                    // committed at its claim.)
                    Claim::Committed(_) => return Ok(None),
                    Claim::Held {
                        holder,
                        age_ms,
                        retry_ms,
                    } => {
                        tracing::debug!(?holder, age_ms, "claimed by another process; waiting");
                        Duration::from_millis(retry_ms)
                    }
                    Claim::WrongRole => {
                        return Err(VerdictError::poison(
                            ErrorCode::WrongSession,
                            "task record is for another role",
                        ));
                    }
                    Claim::Take { .. } => {
                        return Err(VerdictError::retry(
                            Duration::from_millis(200),
                            "claim not written",
                        ));
                    }
                },
            };
            // Another process runs the attempt: look again once its claim could have
            // moved on, here, with the delivery kept alive (a nak would spend one of
            // its bounded deliveries at every look).
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether the commit key settles `task`'s attempt (committed, or a newer attempt
    /// committed): then there is nothing to run. Read from the stream leader: a commit
    /// does not move the claim, so a replica that has not seen it yet would have the
    /// attempt run a second time.
    async fn settled(&self, task: &TaskMessage, commit_key: &str) -> Result<bool, VerdictError> {
        let committed = self
            .bus
            .sessions()
            .get_latest::<flotilla_protocol::TaskRecord>(commit_key)
            .await?;
        match task_machine::settled(committed.as_ref().map(|(r, _)| r), task) {
            None => Ok(false),
            Some(Claim::Stale { current }) => {
                tracing::info!(current, "stale attempt fenced off");
                Ok(true)
            }
            Some(Claim::WrongRole) => Err(VerdictError::poison(
                ErrorCode::WrongSession,
                "task record is for another role",
            )),
            // Committed earlier (we crashed before acking, or this is a copy of a
            // delivery another process ran): the commit reached the orchestrator by
            // itself.
            Some(_) => {
                tracing::debug!("attempt committed already");
                Ok(true)
            }
        }
    }

    /// Whether `holder`'s presence is there (it expires unless renewed). A presence that
    /// cannot be read counts as gone: the claim's age then decides, as it did before.
    async fn lives(&self, holder: &AgentId) -> bool {
        match self
            .bus
            .agents()
            .get::<flotilla_protocol::Presence>(holder.as_ref())
            .await
        {
            Ok(found) => found.is_some(),
            Err(e) => {
                tracing::debug!(%holder, error = %e, "presence not readable; taking the claim over by its age");
                false
            }
        }
    }

    /// The role's inbox and pool consumer, once they exist. An agent may start before
    /// `serve`, and under least-privilege credentials it may not create them itself
    /// (`serve` does): it waits, with backoff, and says what it waits for. `None` on
    /// shutdown; an error only when waiting cannot help.
    async fn bind(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<PoolConsumer>, flotilla_bus::ConsumerError> {
        let backoff = flotilla_protocol::Backoff::exponential(
            Duration::from_millis(200),
            Duration::from_secs(10),
        )
        .with_jitter(flotilla_protocol::Jitter::Half);
        for retry in 0.. {
            let attempt = match self.bus.ensure_inbox(&self.role).await {
                Ok(()) => {
                    PoolConsumer::for_role(&self.bus, &self.role, self.settings.clone()).await
                }
                Err(e) => Err(flotilla_bus::ConsumerError {
                    name: self.bus.names().stream_inbox(&self.role),
                    permanent: matches!(e, flotilla_bus::TopologyError::Conflict { .. }),
                    detail: e.to_string(),
                }),
            };
            let e = match attempt {
                Ok(c) => return Ok(Some(c)),
                Err(e) if e.permanent => return Err(e),
                Err(e) => e,
            };
            tracing::warn!(role = %self.role, error = %e, "waiting for the role's inbox and consumer (`flotilla serve` creates them; this user may not)");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff.delay(retry)) => {}
            }
        }
        Ok(None)
    }
}

//! The orchestrator agent: the `orchestrator` role pool, served by `flotilla serve`.
//!
//! It consumes `<p>.s.*.in.orchestrator` on one durable consumer shared by every
//! `serve` instance, so a session's orchestration continues on another instance when
//! one dies. Each message drives the session's state machine ([`crate::machine`]) by
//! compare-and-set on the session record; the effects of a transition (dispatches,
//! events, slot release) are committed in the record's outbox in the same write and
//! performed afterwards with deterministic message ids, so a crash between the write
//! and the effects is repaired by whoever handles the session next.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_agent::open_inbox_delivery;
use flotilla_bus::{
    Bus, Counters, Delivery, KvError, Outgoing, PoolConsumer, PublishError, VerdictError,
};
use flotilla_llm::LlmClient;
use flotilla_protocol::subject::keys;
use flotilla_protocol::{
    Answer, AnswerSection, DEFAULT_MAX_PAYLOAD, Effect, ErrorCode, EventBody, InboxMessage,
    MessageId, Plan, ResultMessage, Role, SessionId, SessionRecord, SessionStatus, TaskId,
    TaskMessage, TaskRecord, TaskRunState, TaskState, TraceParent, V1, decode, epoch_ms,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ControlConfig;
use crate::machine::{self, ResultVerdict};
use crate::prompts;
use crate::slots;

/// How many times a plan is asked for before the session fails.
const PLAN_ATTEMPTS: usize = 3;
/// Compare-and-set rounds before handing the message back for redelivery.
const CAS_ROUNDS: usize = 32;

enum Input {
    Start,
    Result(Box<ResultMessage>),
}

/// The orchestrator pool process.
#[derive(Clone)]
pub struct Orchestrator {
    bus: Bus,
    llm: Arc<dyn LlmClient>,
    config: Arc<ControlConfig>,
    tracker: flotilla_agent::Tracker,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Synthesis {
    summary: String,
}

/// Why an orchestrator call ends the session instead of being retried.
#[derive(Debug, Clone)]
enum Halt {
    /// A budget is spent.
    Budget(flotilla_agent::Exhausted),
    /// The model refused the request or kept answering unusably: retrying would not
    /// help.
    Failed(String),
}

/// Ends the session for `h`.
fn halt(rec: &mut SessionRecord, h: Halt, now: u64) {
    match h {
        Halt::Budget(e) => machine::stop(rec, e.budget, None, e.reason, now),
        Halt::Failed(why) => machine::fail(rec, why, now),
    }
}

/// A spent fleet-wide budget, a refusal or an unusable answer end the session
/// (`Ok(Err(_))`); other failures (rate limits, an unreachable provider) are the
/// caller's to retry.
fn halting(e: flotilla_llm::LlmError) -> Result<Result<String, Halt>, flotilla_llm::LlmError> {
    use flotilla_llm::LlmError;
    match e {
        LlmError::OverBudget(reason) => Ok(Err(Halt::Budget(flotilla_agent::Exhausted {
            budget: flotilla_protocol::BudgetKind::GlobalTokens,
            reason,
        }))),
        LlmError::Refused(_) | LlmError::BadResponse(_) => Ok(Err(Halt::Failed(format!(
            "the orchestrator's model call failed: {e}"
        )))),
        other => Err(other),
    }
}

fn now() -> u64 {
    epoch_ms(SystemTime::now())
}

impl Orchestrator {
    /// An orchestrator planning and synthesizing with `llm`.
    pub fn new(bus: Bus, llm: Arc<dyn LlmClient>, config: Arc<ControlConfig>) -> Self {
        Self {
            bus,
            llm,
            config,
            tracker: flotilla_agent::Tracker::default(),
        }
    }

    /// Reports in-flight deliveries to `tracker` (published by the process's presence).
    pub fn with_tracker(mut self, tracker: flotilla_agent::Tracker) -> Self {
        self.tracker = tracker;
        self
    }

    /// Serves the orchestrator role until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), flotilla_bus::ConsumerError> {
        let consumer = PoolConsumer::for_role(
            &self.bus,
            &Role::orchestrator(),
            self.config.orchestrator.clone(),
        )
        .await?;
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
        let msg = open_inbox_delivery(&self.bus, d, &Role::orchestrator())?;
        let session = msg.session_id().clone();
        let input = match msg {
            InboxMessage::Start(_) => Input::Start,
            InboxMessage::Result(r) => Input::Result(Box::new(r)),
            InboxMessage::Task(_) => {
                return Err(VerdictError::poison(
                    ErrorCode::UnknownRole,
                    "task messages do not go to the orchestrator",
                ));
            }
        };
        let span = tracing::info_span!(
            "orchestrate",
            session = %session,
            role = "orchestrator",
            task = match &input { Input::Result(r) => r.task_id.as_str().to_owned(), Input::Start => String::new() },
            trace_id = d.trace().map(|t| t.trace_id_hex()).unwrap_or_default(),
        );
        let ack_subject = d.ack_subject().unwrap_or_default().to_owned();
        let now = now();
        self.tracker.start(flotilla_protocol::InFlight {
            session_id: session.clone(),
            task_id: None,
            attempt: None,
            ack_subject: ack_subject.clone(),
            since_ms: now,
            progress_ms: now,
        });
        // As workers do: be listed in our presence before acting, so the watchdog can
        // release this message at once if this process dies from here on.
        if !self.tracker.published(Duration::from_secs(1)).await {
            tracing::debug!(
                "presence not confirmed; a crash now would be recovered by the ack wait"
            );
        }
        let result = self.drive(&session, input).instrument(span).await;
        self.tracker.finish(&ack_subject);
        result
    }

    /// How long effects may sit in an outbox before another handler assumes their
    /// writer died and performs them: half the ack wait, at most 5 s. The writer's own
    /// message is redelivered only after the full ack wait, so by then they are stale.
    fn outbox_stale_ms(&self) -> u64 {
        (self.config.orchestrator.effective_ack_wait().as_millis() as u64 / 2).clamp(1, 5_000)
    }

    async fn drive(&self, session: &SessionId, input: Input) -> Result<(), VerdictError> {
        let records = self.bus.sessions();
        let key = keys::session(session);
        let cfg = &self.config.session;
        let mut input = Some(input);
        // A clarification's answer, kept across compare-and-set rounds (one LLM call).
        let mut clarified: Option<Result<String, Halt>> = None;
        for _ in 0..CAS_ROUNDS {
            let Some((mut rec, rev)) = records.get::<SessionRecord>(&key).await? else {
                return Err(VerdictError::poison(
                    ErrorCode::UnknownSession,
                    format!("no session {session}"),
                ));
            };
            // Effects left by another handler: if they are stale their writer died, so
            // perform them; if fresh, their writer is performing them right now.
            let pending = rec.outbox.len();
            let age = now().saturating_sub(rec.updated_ms);
            if pending > 0 && age >= self.outbox_stale_ms() {
                let effects = rec.outbox.clone();
                tracing::info!(
                    effects = pending,
                    age_ms = age,
                    "performing effects left by another handler"
                );
                self.perform(&rec, &effects).await?;
                self.remove_effects(&key, &effects, None).await?;
                continue;
            }
            let mut changed = match (&input, rec.status) {
                (Some(Input::Start), SessionStatus::Planning) => {
                    match self.plan(&rec).await? {
                        Ok(Ok(plan)) => {
                            machine::on_planned(&mut rec, &plan, cfg.max_in_flight, now())
                        }
                        Ok(Err(why)) => machine::fail(&mut rec, why, now()),
                        Err(h) => halt(&mut rec, h, now()),
                    }
                    true
                }
                (Some(Input::Result(r)), _)
                    if matches!(r.outcome, flotilla_protocol::TaskOutcome::Clarify { .. }) =>
                {
                    let verdict = match machine::check(&mut rec, r) {
                        Err(v) => v,
                        Ok(idx) => {
                            // Checked on every round: a concurrent clarification may
                            // have spent the budget since the answer was asked for.
                            let budget = self.config.budgets.clarifications;
                            let (answer, closed) = if rec.counters.clarifications >= budget {
                                let commit = format!(
                                    "No more questions: the session's {budget} clarifications \
                                     are spent. Commit to your best interpretation of the \
                                     instruction as written."
                                );
                                (Ok(commit), true)
                            } else {
                                match &clarified {
                                    Some(a) => (a.clone(), false),
                                    None => {
                                        let a = self.clarify(&rec, idx, r).await?;
                                        clarified = Some(a.clone());
                                        (a, false)
                                    }
                                }
                            };
                            match answer {
                                Ok(answer) => machine::on_clarify(
                                    &mut rec,
                                    r,
                                    answer,
                                    closed,
                                    cfg.max_in_flight,
                                    now(),
                                ),
                                Err(h) => {
                                    halt(&mut rec, h, now());
                                    ResultVerdict::Failed
                                }
                            }
                        }
                    };
                    match verdict {
                        ResultVerdict::Duplicate => false,
                        ResultVerdict::Foreign(why) => {
                            return Err(VerdictError::poison(ErrorCode::WrongSession, why));
                        }
                        v => {
                            tracing::info!(verdict = ?v, task = %r.task_id, attempt = r.attempt, "clarification");
                            true
                        }
                    }
                }
                (Some(Input::Result(r)), _) => {
                    match machine::on_result(
                        &mut rec,
                        r,
                        cfg.max_in_flight,
                        cfg.max_task_attempts,
                        now(),
                    ) {
                        ResultVerdict::Duplicate => false,
                        ResultVerdict::Foreign(why) => {
                            return Err(VerdictError::poison(ErrorCode::WrongSession, why));
                        }
                        v => {
                            tracing::info!(verdict = ?v, task = %r.task_id, attempt = r.attempt, "result");
                            true
                        }
                    }
                }
                _ => false,
            };
            if !changed && rec.status == SessionStatus::Synthesizing {
                match self.synthesize(&rec).await? {
                    Ok(answer) => machine::on_synthesized(&mut rec, answer, now()),
                    Err(h) => halt(&mut rec, h, now()),
                }
                changed = true;
            }
            if !changed {
                if pending > 0 {
                    // Nothing for us to do, but someone's effects are in flight: come
                    // back when they are stale, in case their writer died.
                    let wait = self.outbox_stale_ms().saturating_sub(age) + 1;
                    return Err(VerdictError::retry(
                        Duration::from_millis(wait),
                        "waiting for another handler's effects",
                    ));
                }
                return Ok(());
            }
            match records.update(&key, &rec, rev).await {
                Ok(new_rev) => {
                    let mine = rec.outbox[pending..].to_vec();
                    self.perform(&rec, &mine).await?;
                    self.remove_effects(&key, &mine, Some((rec.clone(), new_rev)))
                        .await?;
                    if rec.status.is_terminal() {
                        tracing::info!(status = ?rec.status, "session ended");
                    }
                    if rec.status == SessionStatus::Synthesizing {
                        input = None;
                        continue;
                    }
                    return Ok(());
                }
                Err(KvError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VerdictError::retry(
            Duration::from_millis(100),
            "session record kept changing",
        ))
    }

    /// Removes performed effects from the outbox, starting from `known` (the record as
    /// this handler last wrote it) and re-reading on conflict.
    async fn remove_effects(
        &self,
        key: &str,
        done: &[Effect],
        mut known: Option<(SessionRecord, u64)>,
    ) -> Result<(), VerdictError> {
        if done.is_empty() {
            return Ok(());
        }
        let records = self.bus.sessions();
        for _ in 0..CAS_ROUNDS {
            let current = match known.take() {
                Some(k) => Some(k),
                None => records.get::<SessionRecord>(key).await?,
            };
            let Some((mut rec, rev)) = current else {
                return Ok(());
            };
            let before = rec.outbox.len();
            rec.outbox.retain(|e| !done.contains(e));
            if rec.outbox.len() == before {
                return Ok(());
            }
            match records.update(key, &rec, rev).await {
                Ok(_) => return Ok(()),
                Err(KvError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // Harmless: whoever finds them stale performs them again (idempotently).
        Ok(())
    }

    /// Answers the clarification question of task `idx` with the LLM (the caller has
    /// checked the session has clarifications left).
    async fn clarify(
        &self,
        rec: &SessionRecord,
        idx: usize,
        r: &ResultMessage,
    ) -> Result<Result<String, Halt>, VerdictError> {
        let flotilla_protocol::TaskOutcome::Clarify { question } = &r.outcome else {
            return Ok(Ok(String::new()));
        };
        let task = &rec.tasks[idx];
        let req = prompts::clarification(
            &self.config.session.orchestrator_model,
            rec,
            &task.instruction,
            question,
        );
        let content = match self.complete(rec, &req).await? {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        #[derive(serde::Deserialize)]
        struct Clarified {
            answer: String,
        }
        let answer = serde_json::from_str::<Clarified>(&content)
            .map(|c| c.answer)
            .unwrap_or(content);
        Ok(Ok(answer))
    }

    /// One orchestrator call, charged to the session's token ledger: `Ok(Err(_))` when
    /// the session's budget is spent.
    async fn complete(
        &self,
        rec: &SessionRecord,
        req: &flotilla_llm::CompletionRequest,
    ) -> Result<Result<String, Halt>, VerdictError> {
        let transient = |e: String| VerdictError::retry(Duration::from_secs(1), e);
        if self.config.budgets.session_tokens == 0 {
            // No session budget: nothing to reserve.
            return match self.llm.complete(req).await {
                Ok(c) => Ok(Ok(c.content)),
                Err(e) => halting(e).map_err(|e| transient(e.to_string())),
            };
        }
        let ledger = flotilla_agent::SessionLedger::new(self.bus.clone());
        let estimate = u64::from(flotilla_llm::estimate_request_tokens(req));
        let reservation = match ledger
            .reserve(
                &rec.session_id,
                estimate,
                self.config.budgets.session_tokens,
            )
            .await
            .map_err(|e| transient(e.to_string()))?
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(Halt::Budget(e))),
        };
        let result = self.llm.complete(req).await;
        let used = result.as_ref().map_or(0, |c| u64::from(c.usage.total()));
        ledger
            .settle(reservation, used)
            .await
            .map_err(|e| transient(e.to_string()))?;
        match result {
            Ok(c) => Ok(Ok(c.content)),
            Err(e) => halting(e).map_err(|e| transient(e.to_string())),
        }
    }

    /// Asks for a plan, up to [`PLAN_ATTEMPTS`] times; `Ok(Err(why))` when every plan
    /// was invalid (the session fails), `Err` for a transient failure (redeliver).
    #[allow(clippy::type_complexity)]
    async fn plan(
        &self,
        rec: &SessionRecord,
    ) -> Result<Result<Result<Plan, String>, Halt>, VerdictError> {
        let model = &self.config.session.orchestrator_model;
        let mut feedback: Option<String> = None;
        for _ in 0..PLAN_ATTEMPTS {
            let req = prompts::plan(model, rec, feedback.as_deref());
            let content = match self.complete(rec, &req).await? {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let why = match decode::<Plan>(content.as_bytes(), DEFAULT_MAX_PAYLOAD) {
                Ok(plan) => match plan.validate(&rec.roles, self.config.session.max_tasks) {
                    Ok(()) => return Ok(Ok(Ok(plan))),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            tracing::warn!(reason = %why, "plan rejected");
            feedback = Some(why);
        }
        Ok(Ok(Err(format!(
            "no valid plan after {PLAN_ATTEMPTS} attempts: {}",
            feedback.unwrap_or_default()
        ))))
    }

    async fn synthesize(&self, rec: &SessionRecord) -> Result<Result<Answer, Halt>, VerdictError> {
        let mut sections = Vec::with_capacity(rec.tasks.len());
        for t in rec.tasks.iter().filter(|t| t.state == TaskState::Done) {
            let Some((tr, _)) = self
                .bus
                .sessions()
                .get::<TaskRecord>(&keys::task(&rec.session_id, &t.task_id))
                .await?
            else {
                return Err(VerdictError::retry(
                    Duration::from_millis(500),
                    "task record missing",
                ));
            };
            match (tr.attempt == t.attempt, tr.state, tr.output) {
                (true, TaskRunState::Done, Some(output)) => sections.push(AnswerSection {
                    task_id: t.task_id.clone(),
                    role: t.role.clone(),
                    output,
                }),
                _ => {
                    return Err(VerdictError::retry(
                        Duration::from_millis(500),
                        format!(
                            "task {} has no committed output for attempt {}",
                            t.task_id, t.attempt
                        ),
                    ));
                }
            }
        }
        let results: Vec<(String, _)> = sections
            .iter()
            .map(|s| (s.role.to_string(), s.output.clone()))
            .collect();
        let req = prompts::synthesis(&self.config.session.orchestrator_model, rec, &results);
        let content = match self.complete(rec, &req).await? {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let s: Synthesis = match decode(content.as_bytes(), DEFAULT_MAX_PAYLOAD) {
            Ok(s) => s,
            Err(e) => return Ok(Err(Halt::Failed(format!("synthesis unusable: {e}")))),
        };
        Ok(Ok(Answer {
            summary: s.summary,
            sections,
        }))
    }

    /// Performs `effects` of `rec`'s outbox. Every effect is idempotent.
    async fn perform(&self, rec: &SessionRecord, effects: &[Effect]) -> Result<(), VerdictError> {
        let trace = TraceParent::parse(&rec.traceparent).ok();
        for effect in effects {
            match effect {
                Effect::Dispatch { task_id, attempt } => {
                    self.dispatch(rec, task_id, *attempt, trace).await?
                }
                Effect::Emit { id, body } => {
                    self.bus
                        .emit(&rec.session_id, id, body.clone(), trace)
                        .await?
                }
                Effect::ReleaseSlot => slots::release(&self.bus, rec.slot, &rec.session_id).await?,
            }
        }
        Ok(())
    }

    async fn dispatch(
        &self,
        rec: &SessionRecord,
        task_id: &TaskId,
        attempt: u32,
        trace: Option<TraceParent>,
    ) -> Result<(), VerdictError> {
        let Some(entry) = rec.tasks.iter().find(|t| &t.task_id == task_id) else {
            return Ok(());
        };
        // The task record must be at this attempt before the message can be claimed.
        let key = keys::task(&rec.session_id, task_id);
        let fresh = TaskRecord {
            v: V1,
            session_id: rec.session_id.clone(),
            task_id: task_id.clone(),
            role: entry.role.clone(),
            attempt,
            state: TaskRunState::Queued,
            holder: None,
            output: None,
            error: None,
            outcome: None,
            updated_ms: now(),
        };
        let records = self.bus.sessions();
        let mut ready = false;
        for _ in 0..8 {
            match records.get::<TaskRecord>(&key).await? {
                None => match records.create(&key, &fresh).await {
                    Ok(_) => {
                        ready = true;
                        break;
                    }
                    Err(KvError::Exists { .. }) => continue,
                    Err(e) => return Err(e.into()),
                },
                Some((cur, _)) if cur.attempt >= attempt => {
                    ready = true;
                    break;
                }
                Some((_, rev)) => match records.update(&key, &fresh, rev).await {
                    Ok(_) => {
                        ready = true;
                        break;
                    }
                    Err(KvError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                },
            }
        }
        if !ready {
            return Err(VerdictError::retry(
                Duration::from_millis(200),
                "task record kept changing",
            ));
        }
        let msg = InboxMessage::Task(TaskMessage {
            v: V1,
            session_id: rec.session_id.clone(),
            task_id: task_id.clone(),
            role: entry.role.clone(),
            attempt,
            instruction: entry.instruction.clone(),
            context: rec.task.clone(),
            feedback: entry.last_error.clone(),
            clarification: entry.clarification.clone(),
            questions_closed: entry.questions_closed,
        });
        let out = Outgoing {
            subject: self.bus.names().inbox(&rec.session_id, &entry.role),
            msg_id: MessageId::task(&rec.session_id, task_id, attempt),
            session: Some(rec.session_id.clone()),
            attempt: Some(attempt),
            trace,
            payload: Bytes::from(serde_json::to_vec(&msg).unwrap_or_default()),
        };
        // A full inbox is backpressure: log it once, then retry with backoff for up to
        // half the ack wait; past that, hand the message back (the effect stays in
        // the outbox and is performed on a later pass).
        let deadline =
            tokio::time::Instant::now() + self.config.orchestrator.effective_ack_wait() / 2;
        let mut backoff = Duration::from_millis(50);
        let mut logged = false;
        loop {
            match self.bus.publish(&out).await {
                Ok(p) => {
                    if !p.duplicate {
                        Counters::inc(&self.bus.counters.dispatched);
                    }
                    break;
                }
                Err(PublishError::Full { .. }) => {
                    if !logged {
                        logged = true;
                        let body = EventBody::Backpressure {
                            task_id: task_id.clone(),
                            role: entry.role.clone(),
                            attempt,
                        };
                        let id = format!("backpressure.{task_id}.{attempt}.{}", now());
                        self.bus.emit(&rec.session_id, &id, body, trace).await?;
                        tracing::info!(task = %task_id, role = %entry.role, "inbox full, backing off");
                    }
                    if tokio::time::Instant::now() + backoff > deadline {
                        return Err(VerdictError::retry(
                            Duration::from_millis(500),
                            format!("inbox of {} is full", entry.role),
                        ));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let body = EventBody::Dispatched {
            task_id: task_id.clone(),
            role: entry.role.clone(),
            attempt,
        };
        self.bus
            .emit(
                &rec.session_id,
                &format!("dispatched.{task_id}.{attempt}"),
                body,
                trace,
            )
            .await?;
        Ok(())
    }
}

//! The [`Agent`] trait: what a worker role does with one task attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_bus::{MemoryError, SessionMemory};
use flotilla_llm::LlmError;
use flotilla_protocol::subject::keys;
use flotilla_protocol::{AgentId, OutputError, TaskMessage, TaskOutput};

/// A task attempt could not produce an output.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A transient failure (provider down, rate limited): leave the task for
    /// redelivery.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The attempt produced something unusable; the orchestrator may retry the task
    /// with the reason.
    #[error("unusable output: {0}")]
    Unusable(String),
    /// A budget stopped the attempt: the orchestrator ends the session.
    #[error(transparent)]
    Stopped(#[from] crate::budget::Exhausted),
    /// The agent needs the orchestrator to clarify the task before it can go on.
    #[error("needs clarification: {0}")]
    Clarify(String),
}

impl From<LlmError> for AgentError {
    fn from(e: LlmError) -> Self {
        match e {
            LlmError::RateLimited { .. } | LlmError::Unavailable(_) => {
                AgentError::Transient(e.to_string())
            }
            LlmError::BadResponse(_) | LlmError::Refused(_) => AgentError::Unusable(e.to_string()),
            LlmError::OverBudget(reason) => AgentError::Stopped(crate::budget::Exhausted {
                budget: flotilla_protocol::BudgetKind::GlobalTokens,
                reason,
            }),
        }
    }
}

impl From<MemoryError> for AgentError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::Unavailable(_)
            | MemoryError::Contended { .. }
            | MemoryError::LockHeld(_) => AgentError::Transient(e.to_string()),
            other => AgentError::Unusable(other.to_string()),
        }
    }
}

impl From<OutputError> for AgentError {
    fn from(e: OutputError) -> Self {
        AgentError::Unusable(e.to_string())
    }
}

/// The future an [`Agent`] returns.
pub type AgentFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TaskOutput, AgentError>> + Send + 'a>>;

/// What the runtime gives an agent for one task attempt: handles scoped to the task's
/// session, so an agent cannot address another session.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The session's shared memory.
    pub memory: SessionMemory,
    /// The attempt's LLM spend: count every call in it (the built-in agent does).
    pub spend: crate::budget::SpendMeter,
    /// True when an earlier delivery of this attempt may have started it (a redelivery,
    /// or a claim taken over from a dead holder): an agent that keeps state (like the
    /// built-in agent's conversation) should look for it; otherwise there is none.
    pub resumed: bool,
    /// Report real progress (a finished turn): the presence's `progress_ms` and the
    /// delivery's ack wait both restart.
    pub progress: Progress,
    /// Set when the attempt runs on an allowance of the session's token budget
    /// instead of the session's ledger.
    pub allowance: Option<Allowance>,
}

/// An attempt run on an allowance (see [`flotilla_protocol::TaskMessage::allowance`]):
/// no ledger round trips, but the agent keeps the attempt within [`Allowance::tokens`]
/// (less one call ceiling for each of [`Allowance::earlier_holders`], whose last call
/// may have gone unrecorded) and stops once its claim has been taken over, so every
/// holder's spend stays inside what the session set aside.
#[derive(Debug, Clone)]
pub struct Allowance {
    /// What the session set aside for the attempt.
    pub tokens: u64,
    /// Holders of the attempt before this one.
    pub earlier_holders: u32,
    /// At most what the attempt has used, as the agent last recorded it (`u64::MAX`:
    /// never).
    spent: Arc<AtomicU64>,
    claim: Option<ClaimCheck>,
}

/// How [`Allowance::still_held`] sees whether this process still holds an attempt:
/// the task records to read, and the holder to find there. One per worker, shared by
/// pointer with each of its allowances (the claim key is made from the task's ids when
/// it is read, not held through the model calls in between).
#[derive(Debug, Clone)]
pub struct ClaimCheck(Arc<(flotilla_bus::Records, AgentId)>);

impl ClaimCheck {
    /// Checks `holder`'s claims in `records`.
    pub fn new(records: flotilla_bus::Records, holder: AgentId) -> Self {
        Self(Arc::new((records, holder)))
    }
}

impl Allowance {
    /// An allowance of `tokens` for the holder after `earlier_holders` others;
    /// `claim` (the task records and the holder) is what [`Allowance::still_held`]
    /// checks.
    pub fn new(tokens: u64, earlier_holders: u32, claim: Option<ClaimCheck>) -> Self {
        Self {
            tokens,
            earlier_holders,
            spent: Arc::new(AtomicU64::new(u64::MAX)),
            claim,
        }
    }

    /// One call ceiling of `call_tokens` for each earlier holder's unrecorded last call.
    pub fn held_back(&self, call_tokens: u64) -> u64 {
        u64::from(self.earlier_holders).saturating_mul(call_tokens)
    }

    /// Records at most what the attempt has used over all its holders: the
    /// conversation's `tokens` so far plus [`Allowance::held_back`].
    pub fn record_spent(&self, tokens: u64, call_tokens: u64) {
        self.spent
            .store(self.held_back(call_tokens) + tokens, Ordering::Relaxed);
    }

    /// What the agent last recorded, for the result; `None` if it never did (the
    /// session then keeps the whole allowance).
    pub fn attempt_tokens(&self) -> Option<u64> {
        match self.spent.load(Ordering::Relaxed) {
            u64::MAX => None,
            t => Some(t),
        }
    }

    /// False once another holder has claimed `task`'s attempt (a watchdog released it
    /// while this process was stuck): the agent must make no more calls. One KV read.
    pub async fn still_held(&self, task: &TaskMessage) -> Result<bool, AgentError> {
        let Some(ClaimCheck(c)) = &self.claim else {
            return Ok(true);
        };
        let (records, holder) = &**c;
        let key = keys::claim(&task.session_id, &task.role, &task.task_id);
        let rec = records
            .get::<flotilla_protocol::TaskRecord>(&key)
            .await
            .map_err(|e| AgentError::Transient(e.to_string()))?;
        Ok(rec.is_some_and(|(r, _)| {
            r.attempt == task.attempt
                && r.state == flotilla_protocol::TaskRunState::Running
                && r.holder.as_ref() == Some(holder)
        }))
    }
}

/// Reports an attempt's progress (see [`TaskContext::progress`]). The default reports
/// nowhere (for agents run outside a worker, as in unit tests).
#[derive(Debug, Clone, Default)]
pub struct Progress(Option<(flotilla_bus::AckHandle, crate::presence::Tracker)>);

impl Progress {
    /// Progress on the delivery `ack`.
    pub fn new(ack: flotilla_bus::AckHandle, tracker: crate::presence::Tracker) -> Self {
        Self(Some((ack, tracker)))
    }

    /// Records progress now: the presence's `progress_ms` moves, and the delivery's
    /// ack wait restarts.
    pub async fn report(&self) {
        if let Some((ack, tracker)) = &self.0 {
            tracker.progress(ack.subject());
            if let Err(e) = ack.progress().await {
                tracing::debug!(error = %e, "progress not reported");
            }
        }
    }
}

/// What a worker role does with one task attempt. The runtime handles claiming,
/// validation, commit, acks and notification; an agent only turns a task into an
/// output. Implementations must be safe to run more than once for the same task
/// (at-least-once delivery).
pub trait Agent: Send + Sync {
    /// Runs one attempt of `task`.
    fn run<'a>(&'a self, ctx: &'a TaskContext, task: &'a TaskMessage) -> AgentFuture<'a>;
}

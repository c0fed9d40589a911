//! Records in the sessions KV bucket (`<p>-sessions`): the session record at key
//! `<sid>` and one task record per task at `<sid>.t.<role>.<task>`. Every change is a
//! compare-and-set on the key's revision.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::EventBody;
use crate::ids::{AgentId, Role, SessionId, TaskId};
use crate::output::{Answer, TaskOutput};
use crate::version::V1;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Admitted; the orchestrator has not planned it yet.
    Planning,
    /// Tasks are being dispatched and run.
    Running,
    /// A task's question waits for a person's answer (`input_requested`); its slot is
    /// held meanwhile.
    AwaitingInput,
    /// Every task ended; the orchestrator is writing the answer.
    Synthesizing,
    /// Ended with an answer.
    Completed,
    /// Ended without one.
    Failed,
    /// Ended by a cancel request (`<p>.session.cancel`).
    Cancelled,
    /// Ended because its deadline (`deadline_ms` at opening) passed; the tasks that
    /// finished are kept in `answer`.
    DeadlineExceeded,
}

impl SessionStatus {
    /// True once the session has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SessionStatus::Completed
                | SessionStatus::Failed
                | SessionStatus::Cancelled
                | SessionStatus::DeadlineExceeded
        )
    }
}

/// A task as the orchestrator tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Planned, waiting for an in-flight slot (or for a full inbox to drain).
    Pending,
    /// Published to the worker inbox.
    Dispatched,
    /// Its last attempt asked a question that waits for a person.
    AwaitingInput,
    /// Its result was accepted.
    Done,
    /// It failed for good.
    Failed,
}

/// One row of the session's task table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskEntry {
    /// Task id.
    pub task_id: TaskId,
    /// Worker role.
    pub role: Role,
    /// What to do.
    pub instruction: String,
    /// Where it is.
    pub state: TaskState,
    /// Current attempt (0 before the first dispatch).
    pub attempt: u32,
    /// The orchestrator's answer to the task's last question, sent with the next
    /// attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clarification: Option<Box<str>>,
    /// The clarification budget is spent: the next attempt may not ask.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub questions_closed: bool,
    /// Why the last attempt was not accepted (sent with the next attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Box<str>>,
    /// The tokens set aside for the current attempt, while it runs on an allowance
    /// (0: none, or given back when its result came).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub allowance: u64,
    /// Tokens the task's attempts reported spending so far (their results' `spend`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens: u64,
    /// The question waiting for a person, while `state` is `awaiting_input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<Box<str>>,
    /// Until when it waits (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_deadline_ms: Option<u64>,
}

/// How a session's token budget is kept. Attempts and the orchestrator's calls run
/// on the budget without ledger round trips while the worst case of everything granted
/// fits in it; once it would not, the session switches to its ledger counter for good
/// (seeded with what was granted) and every call reserves and settles there. See
/// docs/architecture.md, "Token budgets".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TokenAccount {
    /// The session's token budget (0: none, nothing is accounted).
    pub budget: u64,
    /// What each attempt is granted: a task budget plus one call ceiling.
    pub allowance: u64,
    /// The worst case of everything granted off the ledger: the orchestrator's calls
    /// as they used, ended attempts as their holders reported, attempts in flight at
    /// their allowance.
    pub granted: u64,
    /// Calls are metered on the session's ledger counter from now on.
    pub metered: bool,
}

impl TokenAccount {
    /// True when nothing was accounted (no budget).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A side effect the orchestrator has committed to but may not have performed yet.
/// Effects are written into the record in the same compare-and-set as the state
/// change that causes them, performed afterwards with deterministic message ids, and
/// then cleared; whoever handles the session next performs any left over by a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "effect", rename_all = "snake_case", deny_unknown_fields)]
pub enum Effect {
    /// Create the task record for `attempt` and publish the task message.
    Dispatch {
        /// Task.
        task_id: TaskId,
        /// Attempt.
        attempt: u32,
    },
    /// Publish an event with message id `<sid>.ev.<id>`.
    Emit {
        /// De-duplication discriminator, unique within the session.
        id: String,
        /// The event.
        body: EventBody,
    },
    /// Give the session's admission slot back.
    ReleaseSlot,
    /// Move the session's token account to its ledger: `tokens` (everything granted
    /// off the ledger) become used on the session's counter, in one increment with
    /// message id `<sid>.spend.seed`.
    Seed {
        /// Tokens.
        tokens: u64,
    },
}

/// Shared-memory traffic counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryStats {
    /// Compare-and-set (or create) attempts.
    pub cas_attempts: u64,
    /// Attempts that lost to a concurrent writer.
    pub conflicts: u64,
    /// Merge retries after a conflict.
    pub retries: u64,
    /// Lock requests that had to wait for a holder.
    pub lock_waits: u64,
    /// Guarded writes refused because their lock had expired.
    pub lock_expiries: u64,
}

impl MemoryStats {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &MemoryStats) {
        self.cas_attempts += other.cas_attempts;
        self.conflicts += other.conflicts;
        self.retries += other.retries;
        self.lock_waits += other.lock_waits;
        self.lock_expiries += other.lock_expiries;
    }
}

/// Per-session counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionCounters {
    /// Task messages published.
    pub dispatched: u32,
    /// Dispatches refused by a full inbox.
    pub backpressure: u32,
    /// Results accepted.
    pub accepted: u32,
    /// Results refused (stale attempt, failed validation).
    pub rejected: u32,
    /// The session's shared-memory traffic, as its agents reported it.
    #[serde(default)]
    pub memory: MemoryStats,
    /// Clarification exchanges answered.
    #[serde(default)]
    pub clarifications: u32,
    /// The agents' LLM spend, as their results reported it.
    #[serde(default)]
    pub spend: crate::Spend,
}

/// The session record, key `<sid>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRecord {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// The user's task.
    pub task: String,
    /// Worker roles.
    pub roles: Vec<Role>,
    /// Where it is.
    pub status: SessionStatus,
    /// The admission slot it holds until it ends.
    pub slot: u32,
    /// The revision of the slot's key when admission took it (0: unknown), so the
    /// release is one delete that only succeeds while this session holds it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slot_revision: u64,
    /// The session's W3C `traceparent` root.
    pub traceparent: String,
    /// Admission time, ms since the Unix epoch.
    pub opened_ms: u64,
    /// Last change, ms since the Unix epoch.
    pub updated_ms: u64,
    /// The task table, in plan order.
    pub tasks: Vec<TaskEntry>,
    /// The answer, once completed.
    // (Boxed: a record cached for a session in flight has none, and 40 bytes less
    // puts it in a smaller size class; the wire format is the same.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Box<Answer>>,
    /// Why it failed, once failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The budget that ended it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<crate::BudgetKind>,
    /// Committed effects not yet performed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Effect>,
    /// Counters.
    #[serde(default)]
    pub counters: SessionCounters,
    /// The session's token budget as the orchestrator keeps it.
    #[serde(default, skip_serializing_if = "TokenAccount::is_empty")]
    pub tokens: TokenAccount,
    /// When the session must have ended, ms since the Unix epoch (from the open
    /// request's `deadline_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Its tasks' questions go to a person (the open request's `human_input`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub human_input: bool,
}

impl SessionRecord {
    /// A session admitted at `now` (ms since the Unix epoch), still to be planned,
    /// holding slot `slot` (taken at `slot_revision`, 0 if unknown).
    pub fn planning(
        session_id: SessionId,
        task: String,
        roles: Vec<Role>,
        slot: u32,
        slot_revision: u64,
        traceparent: String,
        now: u64,
    ) -> Self {
        Self {
            v: V1,
            session_id,
            task,
            roles,
            status: SessionStatus::Planning,
            slot,
            slot_revision,
            traceparent,
            opened_ms: now,
            updated_ms: now,
            tasks: Vec::new(),
            answer: None,
            failure: None,
            stopped_by: None,
            outbox: Vec::new(),
            counters: SessionCounters::default(),
            tokens: TokenAccount::default(),
            deadline_ms: None,
            human_input: false,
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// One exchange of an agent's conversation: the model's turn and what the agent
/// answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryTurn {
    /// The model's answer.
    pub assistant: String,
    /// The agent's reply (a tool result, "continue", …).
    pub user: String,
}

/// An agent's conversation on a task, key `<sid>.h.<role>.<task>` in the sessions bucket: the
/// last turns plus a running summary of older ones, written after every turn so a
/// backup process continues where a failed one stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentHistory {
    /// Protocol version (1).
    pub v: V1,
    /// The attempt this conversation belongs to.
    pub attempt: u32,
    /// Turns taken so far (also those folded into the summary).
    pub turns_taken: u32,
    /// Tokens the attempt has used so far.
    pub tokens: u64,
    /// Older turns, summarized.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// The most recent turns, oldest first.
    pub recent: Vec<HistoryTurn>,
}

/// Where a task attempt is, as workers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskRunState {
    /// Dispatched, not yet claimed.
    Queued,
    /// Claimed by `holder`.
    Running,
    /// Output committed.
    Done,
    /// The attempt failed.
    Failed,
}

/// A task record. Two keys hold one each: the claim at `<sid>.c.<role>.<task>`
/// (`running` or `queued`: the attempt and its holder, changed by compare-and-set), and
/// the commit at `<sid>.t.<role>.<task>` (`done` or `failed`: the attempt's end, its
/// output and what it spent), written by the holder only while its claim is unchanged
/// (`Nats-Expected-Last-Subject-Sequence` on the claim's subject). The commit is the
/// task's result: the orchestrator follows `*.t.>` with a durable consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRecord {
    /// Protocol version (1).
    pub v: V1,
    /// Session.
    pub session_id: SessionId,
    /// Task.
    pub task_id: TaskId,
    /// Worker role.
    pub role: Role,
    /// The current attempt; results of older attempts are fenced off.
    pub attempt: u32,
    /// Where it is.
    pub state: TaskRunState,
    /// The process that claimed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<AgentId>,
    /// How many claims this attempt has had (1: only its first holder's).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub holders: u32,
    /// While `running`: the ack subject of the holder's delivery. The watchdog indexes
    /// running claims by holder from these records, so when the holder dies it can
    /// fence the attempt and publish `-NAK` here on its behalf (redelivery now, not
    /// at the end of the ack wait). Cleared by commit and fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_subject: Option<String>,
    /// The committed output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<TaskOutput>,
    /// Why the attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How the attempt ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<crate::TaskOutcome>,
    /// Committed: the attempt's LLM spend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<crate::Spend>,
    /// Committed: the attempt's shared-memory traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
    /// Committed, for an attempt run on an allowance: at most how many tokens it used
    /// (as [`crate::ResultMessage::attempt_tokens`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_tokens: Option<u64>,
    /// Last change, ms since the Unix epoch.
    pub updated_ms: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_session_record_fits_mimallocs_384_byte_class() {
        // `serve` keeps one for every session in flight (boxed, in its record cache)
        // through its model calls: a field that grows it past 384 bytes costs each of
        // them the next size class (448).
        let size = size_of::<super::SessionRecord>();
        assert!(size <= 384, "{size}");
    }

    #[test]
    fn four_task_entries_fit_mimallocs_640_byte_class() {
        // A record's task table, one entry a task (four in the bench's shape): its
        // rarely set texts are boxed `str`s, 16 bytes each where a `String` is 24.
        let size = size_of::<super::TaskEntry>();
        assert!(size <= 160, "{size}");
    }
}

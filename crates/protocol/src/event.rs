//! Session events: the session's log on `<p>.s.<sid>.ev.<kind>`, kept in the events
//! stream. The `done` event carries the final answer.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{Role, SessionId, TaskId};
use crate::output::Answer;
use crate::version::V1;

/// The `<kind>` token of an event subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKindName {
    /// `opened`
    Opened,
    /// `planned`
    Planned,
    /// `dispatched`
    Dispatched,
    /// `backpressure`
    Backpressure,
    /// `result`
    Result,
    /// `done`
    Done,
    /// `reassigned`
    Reassigned,
    /// `heartbeat_missed`
    HeartbeatMissed,
    /// `clarification`
    Clarification,
    /// `rate_limit_wait`
    RateLimitWait,
    /// `budget_exhausted`
    BudgetExhausted,
    /// `circuit_open`
    CircuitOpen,
    /// `input_requested`
    InputRequested,
}

impl EventKindName {
    /// Every kind.
    pub const ALL: [EventKindName; 13] = [
        EventKindName::Opened,
        EventKindName::Planned,
        EventKindName::Dispatched,
        EventKindName::Backpressure,
        EventKindName::Result,
        EventKindName::Done,
        EventKindName::Reassigned,
        EventKindName::HeartbeatMissed,
        EventKindName::Clarification,
        EventKindName::RateLimitWait,
        EventKindName::BudgetExhausted,
        EventKindName::CircuitOpen,
        EventKindName::InputRequested,
    ];

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKindName::Opened => "opened",
            EventKindName::Planned => "planned",
            EventKindName::Dispatched => "dispatched",
            EventKindName::Backpressure => "backpressure",
            EventKindName::Result => "result",
            EventKindName::Done => "done",
            EventKindName::Reassigned => "reassigned",
            EventKindName::HeartbeatMissed => "heartbeat_missed",
            EventKindName::Clarification => "clarification",
            EventKindName::RateLimitWait => "rate_limit_wait",
            EventKindName::BudgetExhausted => "budget_exhausted",
            EventKindName::CircuitOpen => "circuit_open",
            EventKindName::InputRequested => "input_requested",
        }
    }

    /// Parses a subject token.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionOutcome {
    /// Every task produced an accepted result and the answer was synthesized.
    Completed,
    /// The session could not finish; `failure` says why.
    Failed,
    /// Cancelled on request; `failure` carries the reason given.
    Cancelled,
    /// Its deadline passed; `answer` holds the sections of the tasks that finished.
    DeadlineExceeded,
}

/// A task as planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlannedTask {
    /// Task id.
    pub task_id: TaskId,
    /// Worker role.
    pub role: Role,
    /// What to do.
    pub instruction: String,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventBody {
    /// The session was admitted.
    Opened {
        /// The user's task.
        task: String,
        /// Its worker roles.
        roles: Vec<Role>,
    },
    /// The orchestrator planned the session.
    Planned {
        /// The tasks, in dispatch order.
        tasks: Vec<PlannedTask>,
    },
    /// A task attempt was published to its worker inbox.
    Dispatched {
        /// Task.
        task_id: TaskId,
        /// Role.
        role: Role,
        /// Attempt.
        attempt: u32,
    },
    /// A worker inbox was full; the task waits and is retried.
    Backpressure {
        /// Task.
        task_id: TaskId,
        /// Role.
        role: Role,
        /// Attempt.
        attempt: u32,
    },
    /// A task attempt's result reached the orchestrator.
    Result {
        /// Task.
        task_id: TaskId,
        /// Role.
        role: Role,
        /// Attempt.
        attempt: u32,
        /// Whether it was accepted as the task's result.
        accepted: bool,
        /// Why not, when not accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Tokens the task's attempts have spent so far, as their results reported
        /// (absent on a fenced holder's own event).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokens: Option<u64>,
    },
    /// The watchdog took a task away from a dead or stuck holder and released it for
    /// redelivery now.
    Reassigned {
        /// Task.
        task_id: TaskId,
        /// Role.
        role: Role,
        /// Attempt.
        attempt: u32,
        /// The holder it was taken from.
        from: String,
        /// Why: `disconnected`, `presence expired` or `no progress for <n> ms`.
        reason: String,
        /// From the holder's last sign of life to the release, ms.
        after_ms: u64,
    },
    /// A process's presence expired or its connection dropped while it held this
    /// session's work (the watchdog then reassigns the work).
    HeartbeatMissed {
        /// The process.
        agent_id: String,
        /// How it was found: `disconnected` or `presence expired`.
        reason: String,
        /// From its last heartbeat to detection, ms.
        silent_ms: u64,
    },
    /// The orchestrator answered a worker's clarification question.
    Clarification {
        /// Task.
        task_id: TaskId,
        /// Role.
        role: Role,
        /// Exchanges so far in this session, this one included.
        n: u32,
        /// The question.
        question: String,
        /// The answer.
        answer: String,
        /// The budget is spent: the answer commits to an interpretation and the agent
        /// may not ask again.
        closed: bool,
        /// Who answered when not the orchestrator's model: `human`, or `deadline` (no
        /// answer came in time; the answer tells the agent to commit to its reading).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// A task's question waits for a person: answer it on `<p>.session.answer`.
    InputRequested {
        /// Task.
        task_id: TaskId,
        /// Role.
        role: Role,
        /// The attempt that asked.
        attempt: u32,
        /// The question.
        question: String,
        /// When the session stops waiting (ms since the epoch) and the task goes on
        /// with its best interpretation.
        deadline_ms: u64,
    },
    /// An agent call waited for a rate-limit permit.
    RateLimitWait {
        /// Task.
        task_id: TaskId,
        /// Calls that waited in this attempt.
        calls: u64,
        /// Total wait, ms.
        waited_ms: u64,
    },
    /// A budget ended the session.
    BudgetExhausted {
        /// Which budget.
        budget: crate::BudgetKind,
        /// The task that hit it, if a task did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task_id: Option<TaskId>,
        /// Detail (limit and spend).
        reason: String,
    },
    /// The circuit breaker ended the session: an agent repeated the same call.
    CircuitOpen {
        /// Task.
        task_id: TaskId,
        /// Role.
        role: Role,
        /// Detail (fingerprint and repeats).
        reason: String,
    },
    /// The session ended.
    Done {
        /// How.
        outcome: SessionOutcome,
        /// The answer, when completed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<Answer>,
        /// Why it failed, when failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<String>,
        /// From admission to this event.
        duration_ms: u64,
        /// The budget that ended it, if one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        budget: Option<crate::BudgetKind>,
    },
}

impl EventBody {
    /// The subject token for this event.
    pub fn kind(&self) -> EventKindName {
        match self {
            EventBody::Opened { .. } => EventKindName::Opened,
            EventBody::Planned { .. } => EventKindName::Planned,
            EventBody::Dispatched { .. } => EventKindName::Dispatched,
            EventBody::Backpressure { .. } => EventKindName::Backpressure,
            EventBody::Result { .. } => EventKindName::Result,
            EventBody::Done { .. } => EventKindName::Done,
            EventBody::Reassigned { .. } => EventKindName::Reassigned,
            EventBody::HeartbeatMissed { .. } => EventKindName::HeartbeatMissed,
            EventBody::Clarification { .. } => EventKindName::Clarification,
            EventBody::RateLimitWait { .. } => EventKindName::RateLimitWait,
            EventBody::BudgetExhausted { .. } => EventKindName::BudgetExhausted,
            EventBody::CircuitOpen { .. } => EventKindName::CircuitOpen,
            EventBody::InputRequested { .. } => EventKindName::InputRequested,
        }
    }
}

/// One entry of a session's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub body: EventBody,
    /// The task attempts published to worker inboxes in the same step as this event,
    /// before it (the plan's first wave on `planned`, a dependent or a retry on
    /// `result`, a re-dispatch on `clarification`). A dispatch with no such event, or
    /// re-performed after a crash, has a `dispatched` event of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dispatched: Vec<DispatchedTask>,
}

/// A task attempt published to its worker inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchedTask {
    /// Task.
    pub task_id: TaskId,
    /// Role.
    pub role: Role,
    /// Attempt.
    pub attempt: u32,
}

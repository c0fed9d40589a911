//! Session control: a cancel request to `<p>.session.cancel` and its reply, the
//! fleet-wide stop notice on `<p>.ctl.stop` that every `serve` and agent process
//! answers once it will start no more model or tool calls for the session, and a
//! person's answer to a task's question on `<p>.session.answer`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::event::SessionOutcome;
use crate::ids::{SessionId, TaskId};
use crate::version::V1;

/// A request to cancel a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelSession {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// Why, for the record and the `done` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The reply to a [`CancelSession`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum CancelReply {
    /// Cancelled by this request: the session's `done` event (outcome `cancelled`) is
    /// published, its slot released, and the fleet's processes that answered the stop
    /// notice will start no more calls for it.
    Cancelled {
        /// Protocol version (1).
        v: V1,
        /// The session.
        session_id: SessionId,
        /// Processes that confirmed the stop.
        confirmed: u32,
        /// Processes the presence bucket listed as alive (the rest did not answer in
        /// time: dead, or frozen; their work is fenced either way).
        expected: u32,
    },
    /// It had ended already (a second cancel, or it finished first): nothing changed.
    AlreadyEnded {
        /// Protocol version (1).
        v: V1,
        /// The session.
        session_id: SessionId,
        /// How it ended.
        outcome: SessionOutcome,
    },
    /// Not cancelled: `unknown_session`, `invalid` or `unavailable` (retry).
    Rejected {
        /// Protocol version (1).
        v: V1,
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Sent by the process that ended a session (cancel or deadline) to every process on
/// `<p>.ctl.stop`, as a request: each answers with a [`StopAck`] after marking the
/// session stopped and aborting its calls in flight for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopSession {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// How it ended.
    pub outcome: SessionOutcome,
}

/// A process's answer to a [`StopSession`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopAck {
    /// Protocol version (1).
    pub v: V1,
    /// The answering process (its presence key).
    pub agent_id: String,
    /// Calls or tasks of the session it aborted.
    pub aborted: u32,
}

/// A person's answer to a question that waits for one (`input_requested`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerInput {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// The task whose question this answers; may be left out while only one waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// The answer (1 byte to 16 KiB).
    pub answer: String,
}

/// The reply to an [`AnswerInput`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum AnswerReply {
    /// Stored: the task goes on with the answer, on whichever process holds its role.
    Accepted {
        /// Protocol version (1).
        v: V1,
        /// The session.
        session_id: SessionId,
        /// The task answered.
        task_id: TaskId,
    },
    /// Not taken: `not_awaiting_input` (nothing waits: answered already, timed out, or
    /// several wait and `task_id` is missing: see `message`), `unknown_session`,
    /// `invalid`, `unavailable` (retry).
    Rejected {
        /// Protocol version (1).
        v: V1,
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

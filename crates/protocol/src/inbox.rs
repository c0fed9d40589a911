//! Messages on agent inboxes (`<p>.s.<sid>.in.<role>`).
//!
//! The orchestrator's inbox takes [`InboxMessage::Start`] and [`InboxMessage::Result`];
//! a worker's inbox takes [`InboxMessage::Task`]. Every message names its session in the
//! body, and [`InboxMessage::check_route`] refuses a message whose body disagrees with
//! the subject it arrived on (a forged or misrouted message).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::ids::{Role, SessionId, TaskId};
use crate::version::V1;

/// Tells the orchestrator to plan and run a newly admitted session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartMessage {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
}

/// One attempt of a task, dispatched to a worker role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskMessage {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// The task within the session.
    pub task_id: TaskId,
    /// The role that must do it (equals the inbox's role).
    pub role: Role,
    /// Attempt number, 1-based. A result for an older attempt is fenced off.
    pub attempt: u32,
    /// What to do.
    pub instruction: String,
    /// The user's task, for context.
    pub context: String,
    /// Why the previous attempt was not accepted, so this one can do better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<String>,
    /// The orchestrator's answer to this task's last clarification question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clarification: Option<String>,
    /// The session's clarification budget is spent: the agent must not ask again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub questions_closed: bool,
    /// Tokens this attempt may spend without the session's ledger: the session set
    /// them aside from its budget when it dispatched the attempt (its worst case, a
    /// task budget plus one call). The worker then makes no ledger round trips, admits
    /// a call only while the attempt's spend plus the call's ceiling stays within it
    /// (less one call ceiling per earlier holder of the attempt), and reports the
    /// attempt's spend in its result. Absent: every call reserves and settles on the
    /// ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowance: Option<u64>,
}

/// How a task attempt ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskOutcome {
    /// The output passed validation and is committed in the task record.
    Completed,
    /// The attempt failed; `reason` says why.
    Failed {
        /// Why.
        reason: String,
    },
    /// A budget stopped the attempt; the orchestrator ends the session.
    Stopped {
        /// Which budget.
        budget: crate::BudgetKind,
        /// Detail (limit and spend).
        reason: String,
    },
    /// The agent needs a clarification before it can go on; the orchestrator answers
    /// and dispatches the task again with the answer.
    Clarify {
        /// The question.
        question: String,
    },
}

impl TaskOutcome {
    /// The wire tag (`completed`, `failed`, `stopped`, `clarify`).
    pub fn kind(&self) -> &'static str {
        match self {
            TaskOutcome::Completed => "completed",
            TaskOutcome::Failed { .. } => "failed",
            TaskOutcome::Stopped { .. } => "stopped",
            TaskOutcome::Clarify { .. } => "clarify",
        }
    }
}

/// A worker's notice to the orchestrator that a task attempt ended. The output itself
/// is in the task record (`<sid>.t.<role>.<task>` in the sessions bucket), committed before
/// this notice is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResultMessage {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// The task.
    pub task_id: TaskId,
    /// The worker role that ran it.
    pub role: Role,
    /// The attempt this result belongs to.
    pub attempt: u32,
    /// How it ended.
    pub outcome: TaskOutcome,
    /// The attempt's LLM spend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<crate::Spend>,
    /// The attempt's shared-memory traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::record::MemoryStats>,
    /// For an attempt run on an allowance: at most how many tokens it used, over all
    /// its holders (the conversation's tokens, plus one call ceiling for each earlier
    /// holder's unrecorded last call). The session gives the rest of the allowance
    /// back to its budget. Absent: the attempt keeps its whole allowance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_tokens: Option<u64>,
}

/// Anything that may arrive on an inbox subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InboxMessage {
    /// To the orchestrator: a new session.
    Start(StartMessage),
    /// To a worker: a task attempt.
    Task(TaskMessage),
    /// To the orchestrator: a task attempt ended.
    Result(ResultMessage),
    /// To the orchestrator: the answer to a task's question that waited for a person
    /// (from `<p>.session.answer`), or the notice that nobody answered in time.
    Input(InputMessage),
}

/// The answer to a question that waited for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputMessage {
    /// Protocol version (1).
    pub v: V1,
    /// The session.
    pub session_id: SessionId,
    /// The task that asked.
    pub task_id: TaskId,
    /// The attempt that asked.
    pub attempt: u32,
    /// The answer; `None` when the wait timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

/// A message arrived on an inbox it does not belong to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The body names another session than the subject.
    #[error("message for session {body} arrived on the inbox of session {subject}")]
    WrongSession {
        /// Session in the subject.
        subject: SessionId,
        /// Session in the body.
        body: SessionId,
    },
    /// The kind is not one this inbox takes (e.g. a task sent to the orchestrator).
    #[error("a {kind} message cannot go to the {role} inbox")]
    WrongInbox {
        /// The message kind.
        kind: &'static str,
        /// The inbox's role.
        role: Role,
    },
    /// A task for one worker role arrived on another role's inbox.
    #[error("a task for role {task_role} arrived on the {inbox} inbox")]
    WrongRole {
        /// The role the task names.
        task_role: Role,
        /// The inbox's role.
        inbox: Role,
    },
}

impl RouteError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RouteError::WrongSession { .. } => ErrorCode::WrongSession,
            RouteError::WrongInbox { .. } | RouteError::WrongRole { .. } => ErrorCode::UnknownRole,
        }
    }
}

impl InboxMessage {
    /// The session named in the body.
    pub fn session_id(&self) -> &SessionId {
        match self {
            InboxMessage::Start(m) => &m.session_id,
            InboxMessage::Task(m) => &m.session_id,
            InboxMessage::Result(m) => &m.session_id,
            InboxMessage::Input(m) => &m.session_id,
        }
    }

    /// The kind tag.
    pub fn kind(&self) -> &'static str {
        match self {
            InboxMessage::Start(_) => "start",
            InboxMessage::Task(_) => "task",
            InboxMessage::Result(_) => "result",
            InboxMessage::Input(_) => "input",
        }
    }

    /// Refuses a message whose body disagrees with the inbox (`session`, `role`) it
    /// arrived on.
    pub fn check_route(&self, session: &SessionId, role: &Role) -> Result<(), RouteError> {
        if self.session_id() != session {
            return Err(RouteError::WrongSession {
                subject: session.clone(),
                body: self.session_id().clone(),
            });
        }
        let ok = match self {
            InboxMessage::Start(_) | InboxMessage::Result(_) | InboxMessage::Input(_) => {
                role.is_orchestrator()
            }
            InboxMessage::Task(t) if !role.is_orchestrator() && &t.role != role => {
                return Err(RouteError::WrongRole {
                    task_role: t.role.clone(),
                    inbox: role.clone(),
                });
            }
            InboxMessage::Task(_) => !role.is_orchestrator(),
        };
        if ok {
            Ok(())
        } else {
            Err(RouteError::WrongInbox {
                kind: self.kind(),
                role: role.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{DEFAULT_MAX_PAYLOAD, DecodeError, decode};

    #[test]
    fn tagged_round_trip_and_strictness() {
        let m = InboxMessage::Start(StartMessage {
            v: V1,
            session_id: SessionId::parse("s1").unwrap(),
        });
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"kind":"start","v":1,"session_id":"s1"}"#);
        assert_eq!(
            decode::<InboxMessage>(s.as_bytes(), DEFAULT_MAX_PAYLOAD).unwrap(),
            m
        );

        let unknown = br#"{"kind":"start","v":1,"session_id":"s1","x":1}"#;
        assert!(matches!(
            decode::<InboxMessage>(unknown, DEFAULT_MAX_PAYLOAD),
            Err(DecodeError::UnknownField(_))
        ));
        let v2 = br#"{"kind":"start","v":2,"session_id":"s1"}"#;
        assert!(matches!(
            decode::<InboxMessage>(v2, DEFAULT_MAX_PAYLOAD),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
        assert!(matches!(
            decode::<InboxMessage>(b"{not json", DEFAULT_MAX_PAYLOAD),
            Err(DecodeError::UnsupportedVersion { .. }) | Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<InboxMessage>(&[b' '; 100], 10),
            Err(DecodeError::Oversized { .. })
        ));
    }

    #[test]
    fn route_checks() {
        let s1 = SessionId::parse("s1").unwrap();
        let s2 = SessionId::parse("s2").unwrap();
        let m = InboxMessage::Start(StartMessage {
            v: V1,
            session_id: s1.clone(),
        });
        assert!(m.check_route(&s1, &Role::orchestrator()).is_ok());
        assert!(matches!(
            m.check_route(&s2, &Role::orchestrator()),
            Err(RouteError::WrongSession { .. })
        ));
        assert!(matches!(
            m.check_route(&s1, &Role::parse("research").unwrap()),
            Err(RouteError::WrongInbox { .. })
        ));
    }
}

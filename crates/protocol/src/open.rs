//! Opening a session: the request to `<p>.session.open` (also the payload of a durable
//! submission on `<p>.submit`) and its reply.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::ids::{Role, SessionId};
use crate::version::V1;

/// Longest task text accepted, in bytes.
pub const MAX_TASK_BYTES: usize = 16 * 1024;

/// A request to open a session for a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenSession {
    /// Protocol version (1).
    pub v: V1,
    /// The user's task, in natural language.
    pub task: String,
    /// Optional client-chosen session id, so the client can subscribe to the session's
    /// events before opening it. Required on `<p>.submit`. Opening the same id twice with
    /// the same task is idempotent; with another task it is rejected as `invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// Worker roles for this session (3-5 distinct configured roles). Empty means the
    /// configured default set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    /// How long the session may run, in ms from its admission. Past it the session
    /// ends with outcome `deadline_exceeded`, keeping the results of the tasks that
    /// finished; in-flight work is stopped as by a cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Route the tasks' clarification questions to a person (`input_requested`
    /// events, answered on `<p>.session.answer`) instead of the orchestrator's model.
    /// Roles can also be routed to people for every session (`session.human_roles`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub human_input: bool,
}

/// Why an [`OpenSession`] is not acceptable, before any configuration is consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The task text is empty or whitespace.
    #[error("task is empty")]
    EmptyTask,
    /// The task text is longer than [`MAX_TASK_BYTES`].
    #[error("task is {0} bytes, the limit is {MAX_TASK_BYTES}")]
    TaskTooLong(usize),
    /// A role is listed twice.
    #[error("role {0} is listed twice")]
    DuplicateRole(Role),
    /// The orchestrator is not a worker role.
    #[error("the orchestrator cannot be a worker role")]
    OrchestratorAsWorker,
    /// `deadline_ms` is 0.
    #[error("deadline_ms must be at least 1")]
    ZeroDeadline,
}

impl OpenError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            OpenError::TaskTooLong(_) => ErrorCode::Oversized,
            _ => ErrorCode::Invalid,
        }
    }
}

impl OpenSession {
    /// A request for `task` with default roles and a server-chosen id.
    pub fn new(task: impl Into<String>) -> Self {
        Self {
            v: V1,
            task: task.into(),
            session_id: None,
            roles: Vec::new(),
            deadline_ms: None,
            human_input: false,
        }
    }

    /// Checks the rules that need no configuration.
    pub fn validate(&self) -> Result<(), OpenError> {
        if self.task.trim().is_empty() {
            return Err(OpenError::EmptyTask);
        }
        if self.task.len() > MAX_TASK_BYTES {
            return Err(OpenError::TaskTooLong(self.task.len()));
        }
        if self.deadline_ms == Some(0) {
            return Err(OpenError::ZeroDeadline);
        }
        for (i, r) in self.roles.iter().enumerate() {
            if r.is_orchestrator() {
                return Err(OpenError::OrchestratorAsWorker);
            }
            if self.roles[..i].contains(r) {
                return Err(OpenError::DuplicateRole(r.clone()));
            }
        }
        Ok(())
    }
}

/// The reply to an [`OpenSession`] request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum OpenReply {
    /// The session is open; follow it on `<p>.s.<session_id>.ev.>`.
    Accepted {
        /// Protocol version (1).
        v: V1,
        /// The session's id.
        session_id: SessionId,
    },
    /// Not opened. Nothing was created.
    Rejected {
        /// Protocol version (1).
        v: V1,
        /// What went wrong; `pool_full` and `unavailable` are worth retrying.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
        /// When `code` is `pool_full`: how long to wait before trying again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(OpenSession::new(" ").validate(), Err(OpenError::EmptyTask));
        let mut o = OpenSession::new("x");
        o.roles = vec![Role::parse("a").unwrap(), Role::parse("a").unwrap()];
        assert!(matches!(o.validate(), Err(OpenError::DuplicateRole(_))));
        o.roles = vec![Role::orchestrator()];
        assert_eq!(o.validate(), Err(OpenError::OrchestratorAsWorker));
        assert!(
            OpenSession::new("y".repeat(MAX_TASK_BYTES + 1))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn reply_shape() {
        let r = OpenReply::Rejected {
            v: V1,
            code: ErrorCode::PoolFull,
            message: "full".into(),
            retry_after_ms: Some(250),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"status":"rejected","v":1,"code":"pool_full","message":"full","retry_after_ms":250}"#
        );
        assert_eq!(serde_json::from_str::<OpenReply>(&s).unwrap(), r);
    }
}

//! Tools: NATS micro services any language can implement. Tool `<name>` is the service
//! `<p>-tool-<name>` with one endpoint on `<p>.tool.<name>`; a caller sends a
//! [`ToolCall`] as a request and gets a [`ToolReply`].
//!
//! A call to a tool with side effects carries an idempotency key (in the body and in the
//! [`crate::headers::IDEMPOTENCY_KEY`] header): the same key means the same logical
//! call (same session, task, tool and arguments), so a tool that keeps a record of keys
//! can skip repeating the effect when a redelivered task calls it again.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{SessionId, TaskId};
use crate::version::V1;

pub use crate::ids::ToolName;

/// A request on `<p>.tool.<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// Protocol version (1).
    pub v: V1,
    /// The tool's name (the last token of the subject).
    pub tool: String,
    /// The arguments, any JSON value (an object by convention).
    pub arguments: serde_json::Value,
    /// The session the calling agent works for.
    pub session_id: SessionId,
    /// The task the calling agent works on.
    pub task_id: TaskId,
    /// Set for tools with side effects: the same key is the same logical call (a
    /// retry, or a redelivered task), so a tool may return its recorded result instead
    /// of repeating the effect. Also in the `Flotilla-Idempotency-Key` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The reply to a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolReply {
    /// The tool ran.
    Ok {
        /// Protocol version (1).
        v: V1,
        /// What it returned, any JSON value.
        result: serde_json::Value,
    },
    /// The tool did not run to completion.
    Error {
        /// Protocol version (1).
        v: V1,
        /// Human-readable reason (shown to the calling agent).
        message: String,
        /// `true` when the same call may succeed if retried (a transient failure);
        /// `false` when it never will (bad arguments, refused).
        #[serde(default)]
        retryable: bool,
    },
}

impl ToolReply {
    /// A successful reply.
    pub fn ok(result: serde_json::Value) -> Self {
        Self::Ok { v: V1, result }
    }

    /// An error reply.
    pub fn error(message: impl Into<String>, retryable: bool) -> Self {
        Self::Error {
            v: V1,
            message: message.into(),
            retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tool_names() {
        for ok in ["a", "web-search", "py_upper2", &"x".repeat(64)] {
            assert_eq!(ToolName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "Web",
            "1tool",
            "a.b",
            "a b",
            "a*",
            "a>",
            &"x".repeat(65),
        ] {
            assert!(ToolName::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(serde_json::from_str::<ToolName>("\"a.b\"").is_err());
    }

    #[test]
    fn call_round_trips_and_rejects_unknown_fields() {
        let call = ToolCall {
            v: V1,
            tool: "search".into(),
            arguments: serde_json::json!({"q": "nats"}),
            session_id: SessionId::parse("s1").unwrap(),
            task_id: TaskId::parse("t1").unwrap(),
            idempotency_key: None,
        };
        let json = serde_json::to_value(&call).unwrap();
        assert!(json.get("idempotency_key").is_none());
        assert_eq!(serde_json::from_value::<ToolCall>(json).unwrap(), call);
        let extra = serde_json::json!({"v": 1, "tool": "x", "arguments": {}, "session_id": "s",
            "task_id": "t", "extra": 1});
        assert!(serde_json::from_value::<ToolCall>(extra).is_err());
        let v2 = serde_json::json!({"v": 2, "tool": "x", "arguments": {}, "session_id": "s",
            "task_id": "t"});
        assert!(serde_json::from_value::<ToolCall>(v2).is_err());
    }

    #[test]
    fn replies_are_tagged_by_status() {
        let ok = ToolReply::ok(serde_json::json!({"text": "HI"}));
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            serde_json::json!({"status": "ok", "v": 1, "result": {"text": "HI"}})
        );
        let err: ToolReply =
            serde_json::from_str(r#"{"status": "error", "v": 1, "message": "down"}"#).unwrap();
        assert_eq!(err, ToolReply::error("down", false));
        assert!(
            serde_json::from_str::<ToolReply>(r#"{"status": "ok", "v": 1, "result": 1, "x": 2}"#)
                .is_err()
        );
    }
}

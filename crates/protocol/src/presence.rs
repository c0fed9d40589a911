//! Presence: what every process writes to the `<p>-agents` bucket (key = its agent id,
//! per-key TTL) on every heartbeat, so the watchdog can tell live, dead and stuck
//! processes apart and release their work.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, Role, SessionId, TaskId};
use crate::version::V1;

/// One message a process is working on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    /// The session.
    pub session_id: SessionId,
    /// The task, for a worker's task attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// The task's role, for a worker's task attempt (it names the task record's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::Role>,
    /// The attempt, for a worker's task attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The delivery's ack subject: publishing `-NAK` there releases it for redelivery now.
    pub ack_subject: String,
    /// When work on it started, ms since the Unix epoch.
    pub since_ms: u64,
    /// When it last made progress, ms since the Unix epoch.
    pub progress_ms: u64,
}

/// A process's presence record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Presence {
    /// Protocol version (1).
    pub v: V1,
    /// The process's agent id (also the key).
    pub agent_id: AgentId,
    /// The role it serves (`orchestrator` for `serve`).
    pub role: Role,
    /// Subject that answers while the process is connected (request/reply; "no
    /// responders" means its connection is gone).
    pub ping_subject: String,
    /// When the process started, ms since the Unix epoch.
    pub started_ms: u64,
    /// When this record was written, ms since the Unix epoch.
    pub renewed_ms: u64,
    /// What it is working on.
    pub in_flight: Vec<InFlight>,
}

/// The registration of a `serve` process's task-signing key, at `signer.<public key>`
/// in the session-records bucket (only `serve` may write it). Workers look a signer up
/// once and then trust task messages it signed (`Flotilla-Signer`,
/// `Flotilla-Signed-Batch`, `Flotilla-Signature`) without reading their session record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignerRecord {
    /// Format version (1).
    pub v: u32,
    /// The public key: an nkey, as in the record's key.
    pub public_key: String,
    /// The `serve` process that holds the private half.
    pub agent_id: String,
    /// When it registered, ms since the epoch.
    pub since_ms: u64,
}

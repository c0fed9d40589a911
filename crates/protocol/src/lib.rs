//! Flotilla's wire protocol: everything two Flotilla processes, or a Flotilla process
//! and a client in any language, must agree on. No I/O, no async runtime.
//!
//! Messages are JSON with an explicit `v` version field and no unknown fields; ids are
//! validated types that are always safe in a subject token; subjects, streams and
//! buckets are named in [`subject`] only.
//!
//! # Layout
//! - [`budget`]: budget kinds, per-attempt spend and token ledgers.
//! - [`ids`]: `SessionId`, `TaskId`, `Role`, `AgentId`, `MessageId`.
//! - [`subject`]: the [`Namespace`] that builds and parses every subject and name.
//! - [`open`]: opening a session (request and reply).
//! - [`inbox`]: messages on agent inboxes (start, task, result).
//! - [`event`]: the session event log.
//! - [`record`]: session and task records kept in KV.
//! - [`presence`]: what each process heartbeats into the agents bucket.
//! - [`limits`]: the fleet rate limiter's permits and the leader's records.
//! - [`tool`]: tool names, tool calls and replies (tools are NATS micro services).
//! - [`output`]: plans, task outputs, the final answer, and their validation.
//! - [`error`]: the closed set of wire error codes and their dispositions.
//! - [`codec`]: size-limited decoding into typed errors.
//! - [`headers`], [`trace`]: NATS header names and W3C trace context.
//! - [`backoff`]: the one backoff policy every retry loop uses (not wire, but shared).
//! - [`schema`]: JSON Schemas generated from these types (checked in under `docs/schema/`).

pub mod backoff;
pub mod budget;
pub mod codec;
pub mod control;
pub mod error;
pub mod event;
pub mod headers;
pub mod ids;
pub mod inbox;
pub mod limits;
pub mod open;
pub mod output;
pub mod presence;
pub mod record;
pub mod schema;
pub mod subject;
pub mod task_machine;
pub mod tool;
pub mod trace;
pub mod version;

pub use backoff::{Backoff, Jitter};
pub use budget::{BudgetKind, Ledger, Spend};
pub use codec::{DEFAULT_MAX_PAYLOAD, DecodeError, decode, encode};
pub use control::{AnswerInput, AnswerReply, CancelReply, CancelSession, StopAck, StopSession};
pub use error::{Disposition, ErrorCode};
pub use event::{DispatchedTask, Event, EventBody, EventKindName, PlannedTask, SessionOutcome};
pub use ids::{AgentId, InvalidId, MessageId, Role, SessionId, TaskId};
pub use inbox::{
    InboxMessage, InputMessage, ResultMessage, RouteError, StartMessage, TaskMessage, TaskOutcome,
};
pub use limits::{
    AcquireRefusal, AcquireReply, AcquireRequest, LimiterLease, SettleRequest, WindowSnapshot,
};
pub use open::{OpenError, OpenReply, OpenSession};
pub use output::{
    Answer, AnswerSection, Artifact, OutputError, Plan, PlanError, Subtask, TaskOutput,
};
pub use presence::{InFlight, Presence, SignerRecord};
pub use record::{
    AgentHistory, Effect, HistoryTurn, MemoryStats, SessionCounters, SessionRecord, SessionStatus,
    TaskEntry, TaskRecord, TaskRunState, TaskState, TokenAccount,
};
pub use subject::{Namespace, ParsedSubject, SubjectError};
pub use tool::{ToolCall, ToolName, ToolReply};
pub use trace::TraceParent;
pub use version::V1;

/// Milliseconds since the Unix epoch for a `SystemTime` (0 before the epoch).
pub fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

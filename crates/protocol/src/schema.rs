//! JSON Schemas of every wire type, generated from the Rust types. The checked-in
//! copies live in `docs/schema/`; a test fails when they drift.

use schemars::schema_for;

use crate::{
    Answer, Event, InboxMessage, OpenReply, OpenSession, Plan, SessionRecord, TaskOutput,
    TaskRecord,
};

/// `(file name, pretty JSON)` for every schema.
pub fn all() -> Vec<(&'static str, String)> {
    let pretty = |s: schemars::Schema| {
        let mut out = serde_json::to_string_pretty(&s).unwrap_or_default();
        out.push('\n');
        out
    };
    vec![
        ("open_session.json", pretty(schema_for!(OpenSession))),
        ("open_reply.json", pretty(schema_for!(OpenReply))),
        ("inbox_message.json", pretty(schema_for!(InboxMessage))),
        ("event.json", pretty(schema_for!(Event))),
        ("session_record.json", pretty(schema_for!(SessionRecord))),
        ("task_record.json", pretty(schema_for!(TaskRecord))),
        ("plan.json", pretty(schema_for!(Plan))),
        ("task_output.json", pretty(schema_for!(TaskOutput))),
        ("answer.json", pretty(schema_for!(Answer))),
        ("presence.json", pretty(schema_for!(crate::Presence))),
        (
            "signer_record.json",
            pretty(schema_for!(crate::SignerRecord)),
        ),
        (
            "agent_history.json",
            pretty(schema_for!(crate::AgentHistory)),
        ),
        (
            "limits_acquire.json",
            pretty(schema_for!(crate::AcquireRequest)),
        ),
        (
            "limits_acquire_reply.json",
            pretty(schema_for!(crate::AcquireReply)),
        ),
        (
            "limits_settle.json",
            pretty(schema_for!(crate::SettleRequest)),
        ),
        (
            "limits_lease.json",
            pretty(schema_for!(crate::LimiterLease)),
        ),
        ("ledger.json", pretty(schema_for!(crate::Ledger))),
        (
            "limits_window.json",
            pretty(schema_for!(crate::WindowSnapshot)),
        ),
        ("tool_call.json", pretty(schema_for!(crate::ToolCall))),
        ("tool_reply.json", pretty(schema_for!(crate::ToolReply))),
        (
            "cancel_session.json",
            pretty(schema_for!(crate::CancelSession)),
        ),
        ("cancel_reply.json", pretty(schema_for!(crate::CancelReply))),
        ("stop_session.json", pretty(schema_for!(crate::StopSession))),
        ("stop_ack.json", pretty(schema_for!(crate::StopAck))),
        ("answer_input.json", pretty(schema_for!(crate::AnswerInput))),
        ("answer_reply.json", pretty(schema_for!(crate::AnswerReply))),
    ]
}

/// The schema in file `name` (as in [`all`]), parsed; generated once per process, since
/// prompts ask for structured output with these on every LLM call.
pub fn get(name: &str) -> Option<&'static serde_json::Value> {
    static CACHE: std::sync::LazyLock<std::collections::BTreeMap<&'static str, serde_json::Value>> =
        std::sync::LazyLock::new(|| {
            all()
                .into_iter()
                .filter_map(|(n, s)| serde_json::from_str(&s).ok().map(|v| (n, v)))
                .collect()
        });
    CACHE.get(name)
}

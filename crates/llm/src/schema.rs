//! Names of the structured outputs Flotilla requests. A provider that supports
//! `response_format` gets the name and the JSON Schema; the simulated provider uses the
//! name to decide what to produce.

/// The orchestrator's plan ([`flotilla_protocol::Plan`]).
pub const PLAN: &str = "flotilla_plan";
/// A worker's output ([`flotilla_protocol::TaskOutput`]).
pub const TASK_OUTPUT: &str = "flotilla_task_output";
/// The orchestrator's synthesis: `{"summary": string}`.
pub const SYNTHESIS: &str = "flotilla_synthesis";
/// The orchestrator's answer to a worker's question: `{"answer": string}`.
pub const CLARIFICATION: &str = "flotilla_clarification";

//! Flotilla agents: the [`Agent`] trait, the role-pool [`Worker`] runtime, and the
//! built-in [`LlmAgent`].
//!
//! # Layout
//! - [`agent`]: the `Agent` trait and its error.
//! - [`llm_agent`]: an agent that asks an LLM, with structured output.
//! - [`budget`]: budgets (tokens, turns, clarifications), the session token ledger,
//!   the spend meter and the call-fingerprint circuit breaker.
//! - [`history`]: agent conversations in KV (a sliding window plus a running summary).
//! - [`limits`]: the caller's side of the fleet rate limiter, and an `LlmClient`
//!   wrapper that waits for permits.
//! - [`presence`]: heartbeats of what a process is doing, and ping answers.
//! - [`role`]: worker roles defined in configuration (prompt, model, tools, limits).
//! - [`stops`]: sessions ended from outside (cancel, deadline) whose work this process
//!   must abort, and the answer to the fleet's stop notice.
//! - [`tools`]: the tool gateway (cache, idempotency, timeouts, retries, rate limits,
//!   circuit breakers) and serving a tool from Rust.
//! - [`worker`]: the pool process: pull, claim, run, validate, commit, notify, ack;
//!   and the shared helpers every inbox consumer uses to open and settle deliveries.

pub mod agent;
pub mod budget;
pub mod history;
pub mod limits;
pub mod llm_agent;
pub mod presence;
pub mod role;
pub mod stops;
pub mod tools;
pub mod worker;

pub use agent::{Agent, AgentError, AgentFuture, Allowance, ClaimCheck, TaskContext};
pub use budget::{BudgetConfig, Exhausted, SessionLedger, SpendMeter};
pub use limits::{
    LimitError, LimitStats, LimitedLlm, LimiterClient, LimitsConfig, ModelLimits, Permit,
};
pub use llm_agent::{FINDING_PREFIX, Finding, LlmAgent, finding_key};
pub use presence::{InFlightWork, LivenessConfig, RECONNECT_GRACE, Tracker};
pub use role::RoleSpec;
pub use stops::{StopGuard, Stopped, Stops, unless_stopped};
pub use tools::{
    Breaker, Pacer, ServeToolError, ToolError, ToolGateway, ToolSpec, ToolStats, ToolsConfig,
    serve_tool,
};
pub use worker::{Worker, open_inbox_delivery};

//! Flotilla agents: the [`Agent`] trait, the role-pool [`Worker`] runtime, and the
//! built-in [`LlmAgent`].
//!
//! # Layout
//! - [`agent`]: the `Agent` trait and its error.
//! - [`llm_agent`]: an agent that asks an LLM, with structured output.
//! - [`presence`]: heartbeats of what a process is doing, and ping answers.
//! - [`worker`]: the pool process: pull, claim, run, validate, commit, notify, ack;
//!   and the shared helpers every inbox consumer uses to open and settle deliveries.

pub mod agent;
pub mod llm_agent;
pub mod presence;
pub mod worker;

pub use agent::{Agent, AgentError, AgentFuture, TaskContext};
pub use llm_agent::{FINDINGS, Finding, LlmAgent};
pub use presence::{LivenessConfig, Tracker};
pub use worker::{Worker, open_inbox_delivery};

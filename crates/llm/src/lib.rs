//! Flotilla's LLM layer: the [`LlmClient`] trait every agent calls through, and the
//! deterministic [`SimulatedProvider`] that is the embedded default and the test double.
//!
//! # Layout
//! - [`client`]: the request and response types and the [`LlmClient`] trait.
//! - [`simulated`]: the simulated provider (seeded, configurable latency and usage).
//! - [`schema`]: names of the structured outputs Flotilla asks for.

pub mod client;
pub mod schema;
pub mod simulated;

pub use client::{
    ChatMessage, ChatRole, Completion, CompletionRequest, LlmClient, LlmError, LlmFuture,
    ResponseFormat, Usage,
};
pub use simulated::{SimConfig, SimulatedProvider};

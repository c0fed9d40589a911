//! Flotilla's LLM layer: the [`LlmClient`] trait every agent calls through, the
//! [`OpenAiClient`] for OpenAI-compatible HTTP APIs, and the deterministic
//! [`SimulatedProvider`] that is the embedded default and the test double.
//!
//! # Layout
//! - [`bounded`]: the per-process bound on calls in flight, and the call counter.
//! - [`client`]: the request and response types and the [`LlmClient`] trait.
//! - [`openai`]: the OpenAI-compatible client (reqwest, rustls): retries with backoff
//!   for transient failures, 429 handed back as [`LlmError::RateLimited`] for the
//!   caller's limiter, one repair round for invalid structured output.
//! - [`structured`]: parsing a structured answer and checking it against its JSON
//!   Schema (a structural subset).
//! - [`tokens`]: the shared token estimator (`ceil(chars / 4)`) used for permits,
//!   budgets and missing usage; the testkit's fake server charges the same.
//! - [`simulated`]: the simulated provider (seeded, configurable latency and usage).
//! - [`schema`]: names of the structured outputs Flotilla asks for.

pub mod bounded;
pub mod client;
pub mod openai;
pub mod schema;
pub mod simulated;
pub mod structured;
pub mod tokens;

pub use bounded::{CallCounter, InFlightLimit};
pub use client::{
    ChatMessage, ChatRole, Completion, CompletionRequest, LlmClient, LlmError, LlmFuture,
    ResponseFormat, Usage,
};
pub use openai::{OpenAiClient, OpenAiConfig, OpenAiConfigError};
pub use simulated::{Behaviour, SimConfig, SimulatedProvider};
pub use tokens::{
    DEFAULT_COMPLETION_TOKENS, estimate_prompt_tokens, estimate_request_tokens, estimate_tokens,
};

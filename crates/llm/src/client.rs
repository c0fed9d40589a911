//! The provider-neutral request/response model and the [`LlmClient`] trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    /// Instructions.
    System,
    /// The input.
    User,
    /// A previous model turn.
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Speaker.
    pub role: ChatRole,
    /// Text (shared: a role's system prompt is one allocation for all of its requests
    /// in flight, not a copy in each).
    pub content: std::sync::Arc<str>,
}

impl ChatMessage {
    /// A system message.
    pub fn system(content: impl Into<std::sync::Arc<str>>) -> Self {
        Self {
            role: ChatRole::System,
            content: content.into(),
        }
    }
    /// A user message.
    pub fn user(content: impl Into<std::sync::Arc<str>>) -> Self {
        Self {
            role: ChatRole::User,
            content: content.into(),
        }
    }
    /// An assistant message (a previous model turn).
    pub fn assistant(content: impl Into<std::sync::Arc<str>>) -> Self {
        Self {
            role: ChatRole::Assistant,
            content: content.into(),
        }
    }
}

/// Structured output requested from the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseFormat {
    /// Schema name (see [`crate::schema`]; a constant for every request made here,
    /// not a copy in each).
    pub name: std::borrow::Cow<'static, str>,
    /// JSON Schema the output must follow (shared: a request in flight holds a
    /// pointer to it, not a copy).
    pub schema: std::sync::Arc<serde_json::Value>,
}

/// A completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// Model name (shared: an agent's requests in flight point to its one copy).
    pub model: std::sync::Arc<str>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Structured output, if required.
    pub response_format: Option<ResponseFormat>,
    /// Ceiling on completion tokens.
    pub max_tokens: Option<u32>,
}

impl CompletionRequest {
    /// The request an OpenAI-style `/v1/chat/completions` JSON body describes (what
    /// [`crate::OpenAiClient`] sends): for servers and fakes that answer such requests
    /// with a [`LlmClient`] behind them. Missing parts are left empty.
    pub fn from_openai_body(body: &serde_json::Value) -> Self {
        let messages = body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| ChatMessage {
                role: match m["role"].as_str() {
                    Some("system") => ChatRole::System,
                    Some("assistant") => ChatRole::Assistant,
                    _ => ChatRole::User,
                },
                content: m["content"].as_str().unwrap_or_default().into(),
            })
            .collect();
        let format = &body["response_format"]["json_schema"];
        Self {
            model: body["model"].as_str().unwrap_or_default().into(),
            messages,
            response_format: format["name"].as_str().map(|n| ResponseFormat {
                name: n.to_owned().into(),
                schema: format["schema"].clone().into(),
            }),
            max_tokens: body["max_tokens"]
                .as_u64()
                .map(|t| u32::try_from(t).unwrap_or(u32::MAX)),
        }
    }
}

/// Token usage reported for a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Completion tokens.
    pub completion_tokens: u32,
}

/// Counts a call's tokens for Prometheus: `flotilla_llm_tokens_total{model, direction}`
/// (`input`, `output`) and `flotilla_llm_calls_total{model}`.
pub fn record_usage(model: &str, usage: &Usage) {
    metrics::counter!("flotilla_llm_calls_total", "model" => model.to_owned()).increment(1);
    metrics::counter!("flotilla_llm_tokens_total", "model" => model.to_owned(), "direction" => "input")
        .increment(u64::from(usage.prompt_tokens));
    metrics::counter!("flotilla_llm_tokens_total", "model" => model.to_owned(), "direction" => "output")
        .increment(u64::from(usage.completion_tokens));
}

impl Usage {
    /// Prompt plus completion.
    pub fn total(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The text (JSON when a response format was requested).
    pub content: String,
    /// Token usage.
    pub usage: Usage,
}

/// A call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// The provider is rate limiting: wait `retry_after` and retry.
    #[error("rate limited, retry after {retry_after:?}")]
    RateLimited {
        /// How long the provider asked to wait.
        retry_after: Option<Duration>,
    },
    /// The provider failed or could not be reached: retry later.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The provider answered with something unusable: repair or fail the attempt.
    #[error("unusable response: {0}")]
    BadResponse(String),
    /// The request itself is wrong (bad model, too long): do not retry.
    #[error("request refused: {0}")]
    Refused(String),
    /// The fleet-wide token budget is spent: no call will be made until it is raised.
    #[error("over budget: {0}")]
    OverBudget(String),
}

impl LlmError {
    /// A short stable name of the kind of failure (the `error.type` of a call's span).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::BadResponse(_) => "bad_response",
            Self::Refused(_) => "refused",
            Self::OverBudget(_) => "over_budget",
        }
    }
}

/// The future a [`LlmClient`] returns.
pub type LlmFuture<'a> = Pin<Box<dyn Future<Output = Result<Completion, LlmError>> + Send + 'a>>;

/// Anything that completes chat requests. Object-safe, so agents hold an
/// `Arc<dyn LlmClient>` and tests swap the provider.
pub trait LlmClient: Send + Sync {
    /// Completes `request`.
    fn complete<'a>(&'a self, request: &'a CompletionRequest) -> LlmFuture<'a>;
}

//! The OpenAI-compatible client: `POST {base_url}/chat/completions` over reqwest
//! (rustls), for OpenAI itself and for compatible servers (vLLM, Ollama, LiteLLM...).
//!
//! # What each outcome becomes
//! | outcome | retried here? | result |
//! | --- | --- | --- |
//! | 200 with a completion | - | `Ok`, usage from the body's `usage` (estimated with [`crate::tokens`] when absent) |
//! | connection error, timeout, 5xx, 408, 409 | yes, up to `max_retries`, exponential backoff with jitter | [`LlmError::Unavailable`] when exhausted |
//! | 429 | **no**: the caller's rate limiter must learn of it and wait | [`LlmError::RateLimited`] with `retry-after-ms` or `Retry-After` (seconds) |
//! | other 4xx (400, 401, 403, 404, 422...) | no | [`LlmError::Refused`] |
//! | 200 whose body is not a usable completion (truncated, not JSON, no `choices`) | once, within `max_retries` (a cut body is often a proxy glitch) | [`LlmError::BadResponse`] |
//! | the model refused (`message.refusal`) | no | [`LlmError::Refused`] |
//!
//! # Structured output
//! With a [`ResponseFormat`] the request carries
//! `{"type":"json_schema","json_schema":{"name","schema","strict":false}}` (or
//! `{"type":"json_object"}` with [`OpenAiConfig::json_mode`], for servers without
//! schema support). The answer is parsed and checked with [`crate::structured`]; if it
//! is invalid, the client asks **once** more, appending the bad answer and a user
//! message naming the error, and fails with [`LlmError::BadResponse`] if the second
//! answer is invalid too. The returned usage is the sum of both calls; the returned
//! content is the JSON text (without any Markdown fence the model put around it).
//!
//! The library never reads the environment: the binary puts the API key in the config.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::{
    ChatMessage, Completion, CompletionRequest, LlmClient, LlmError, LlmFuture, ResponseFormat,
    Usage,
};
use crate::{structured, tokens};

/// Settings of an [`OpenAiClient`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// API root, e.g. `https://api.openai.com/v1` (the client appends `/chat/completions`).
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Ceiling on one HTTP attempt, connection to last body byte (default 60 s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Ceiling on establishing a connection (default 10 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Retries after the first attempt for transient failures (default 3).
    pub max_retries: u32,
    /// First backoff delay; doubles per retry, with jitter (default 250 ms).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Ceiling on one backoff delay (default 8 s).
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Ask for `{"type":"json_object"}` instead of a JSON Schema (default false).
    pub json_mode: bool,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".to_owned(),
            api_key: None,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            max_retries: 3,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
            json_mode: false,
        }
    }
}

impl std::fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("json_mode", &self.json_mode)
            .finish()
    }
}

/// The configuration cannot make a client: fix the configuration.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiConfigError {
    /// `base_url` is not an `http` or `https` URL.
    #[error("invalid base_url {url:?}: {reason}")]
    BaseUrl {
        /// The configured value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `api_key` cannot go in an HTTP header (control characters, newlines).
    #[error("api_key contains characters not allowed in an HTTP header")]
    ApiKey,
    /// The HTTP client could not be built (TLS backend).
    #[error("could not build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// An [`LlmClient`] for OpenAI-compatible chat completion APIs.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    auth: Option<HeaderValue>,
    config: OpenAiConfig,
}

/// The message appended, after the bad answer, to ask for a repaired one.
pub fn repair_message(error: &str) -> String {
    format!(
        "Your previous answer was invalid: {error}. Answer again with only JSON matching the schema."
    )
}

/// Backoff before retry number `retry` (0-based): `base * 2^retry`, capped at `max`,
/// then scaled into `[1/2, 1]` of itself by `unit` in `[0, 1)` ("equal jitter").
pub fn backoff_delay(base: Duration, max: Duration, retry: u32, unit: f64) -> Duration {
    flotilla_protocol::Backoff::exponential(base, max)
        .with_jitter(flotilla_protocol::Jitter::Half)
        .delay_with(retry, unit)
}

/// A number in `[0, 1)` from the process's random hasher keys (no RNG dependency).
fn jitter_unit(salt: u64) -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// One failed attempt, before the retry decision.
#[derive(Debug)]
enum Attempt {
    /// Connection error, timeout or 5xx-like status: retry with backoff.
    Transient(String),
    /// A 200 with an unusable body: retry once.
    Unusable(String),
    /// Final: return as is.
    Final(LlmError),
}

/// A usable answer of one HTTP exchange.
struct Answer {
    content: String,
    usage: Usage,
}

#[derive(Deserialize)]
struct WireCompletion {
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
}

impl OpenAiClient {
    /// A client for `config`; checks the URL and key, sends nothing.
    pub fn new(config: OpenAiConfig) -> Result<Self, OpenAiConfigError> {
        let base = config.base_url.trim_end_matches('/');
        let parsed = reqwest::Url::parse(base).map_err(|e| OpenAiConfigError::BaseUrl {
            url: config.base_url.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(OpenAiConfigError::BaseUrl {
                url: config.base_url.clone(),
                reason: "the scheme must be http or https".into(),
            });
        }
        let auth = match &config.api_key {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| OpenAiConfigError::ApiKey)?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(OpenAiConfigError::HttpClient)?;
        Ok(Self {
            http,
            url: format!("{base}/chat/completions"),
            auth,
            config,
        })
    }

    /// The settings.
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    /// The JSON body for `messages` under `request`'s model, limits and format.
    fn body(&self, request: &CompletionRequest, messages: &[ChatMessage]) -> Value {
        let mut body = json!({ "model": request.model, "messages": messages });
        if let Some(max) = request.max_tokens {
            body["max_tokens"] = json!(max);
        }
        if let Some(ResponseFormat { name, schema }) = &request.response_format {
            body["response_format"] = if self.config.json_mode {
                json!({"type": "json_object"})
            } else {
                json!({
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema.as_ref(), "strict": false},
                })
            };
        }
        body
    }

    /// One call with retries for transient failures and unusable bodies.
    async fn call(
        &self,
        request: &CompletionRequest,
        messages: &[ChatMessage],
    ) -> Result<Answer, LlmError> {
        let body = self.body(request, messages);
        let mut retries = 0u32;
        let mut unusable_retried = false;
        loop {
            let error = match self.attempt(&body, messages).await {
                Ok(answer) => return Ok(answer),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Transient(e)) if retries < self.config.max_retries => e,
                Err(Attempt::Unusable(e))
                    if retries < self.config.max_retries && !unusable_retried =>
                {
                    unusable_retried = true;
                    e
                }
                Err(Attempt::Transient(e)) => {
                    return Err(LlmError::Unavailable(format!(
                        "{e} (after {} attempts)",
                        retries + 1
                    )));
                }
                Err(Attempt::Unusable(e)) => return Err(LlmError::BadResponse(e)),
            };
            let delay = backoff_delay(
                self.config.backoff_base,
                self.config.backoff_max,
                retries,
                jitter_unit(u64::from(retries)),
            );
            tracing::warn!(
                url = %self.url,
                model = %request.model,
                attempt = retries + 1,
                ?delay,
                error = %error,
                "llm call failed, retrying"
            );
            tokio::time::sleep(delay).await;
            retries += 1;
        }
    }

    /// One HTTP exchange.
    async fn attempt(&self, body: &Value, messages: &[ChatMessage]) -> Result<Answer, Attempt> {
        let mut req = self.http.post(&self.url).json(body);
        if let Some(auth) = &self.auth {
            req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Attempt::Transient(describe(&e)))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            // A body cut by the connection (or the timeout) is transient.
            Err(e) => return Err(Attempt::Transient(describe(&e))),
        };
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Attempt::Final(LlmError::RateLimited {
                retry_after: retry_after(&headers),
            }));
        }
        if !status.is_success() {
            let msg = format!("http {status}: {}", error_message(&bytes));
            return Err(
                if status.is_server_error()
                    || status == StatusCode::REQUEST_TIMEOUT
                    || status == StatusCode::CONFLICT
                {
                    Attempt::Transient(msg)
                } else {
                    Attempt::Final(LlmError::Refused(msg))
                },
            );
        }
        let wire: WireCompletion = serde_json::from_slice(&bytes)
            .map_err(|e| Attempt::Unusable(format!("not a chat completion: {e}")))?;
        let Some(choice) = wire.choices.into_iter().next() else {
            return Err(Attempt::Unusable("the completion has no choices".into()));
        };
        let content = match (choice.message.content, choice.message.refusal) {
            (_, Some(refusal)) => {
                return Err(Attempt::Final(LlmError::Refused(format!(
                    "the model refused: {refusal}"
                ))));
            }
            (Some(c), None) => c,
            (None, None) => return Err(Attempt::Unusable("the completion has no content".into())),
        };
        let reported = wire.usage.unwrap_or(WireUsage {
            prompt_tokens: None,
            completion_tokens: None,
        });
        let usage = Usage {
            prompt_tokens: reported
                .prompt_tokens
                .unwrap_or_else(|| tokens::estimate_prompt_tokens(messages)),
            completion_tokens: reported
                .completion_tokens
                .unwrap_or_else(|| tokens::estimate_tokens(&content)),
        };
        Ok(Answer { content, usage })
    }

    async fn complete_inner(&self, request: &CompletionRequest) -> Result<Completion, LlmError> {
        let first = self.call(request, &request.messages).await?;
        let Some(format) = &request.response_format else {
            return Ok(Completion {
                content: first.content,
                usage: first.usage,
            });
        };
        let error = match structured::check(&first.content, &format.schema) {
            Ok(content) => {
                return Ok(Completion {
                    content,
                    usage: first.usage,
                });
            }
            Err(e) => e,
        };
        tracing::debug!(schema = %format.name, error = %error, "invalid structured output, asking for a repair");
        let mut messages = request.messages.clone();
        messages.push(ChatMessage::assistant(first.content));
        messages.push(ChatMessage::user(repair_message(&error)));
        let second = self.call(request, &messages).await?;
        let usage = Usage {
            prompt_tokens: first
                .usage
                .prompt_tokens
                .saturating_add(second.usage.prompt_tokens),
            completion_tokens: first
                .usage
                .completion_tokens
                .saturating_add(second.usage.completion_tokens),
        };
        match structured::check(&second.content, &format.schema) {
            Ok(content) => Ok(Completion { content, usage }),
            Err(e) => Err(LlmError::BadResponse(format!(
                "invalid {} output after one repair: {e}",
                format.name
            ))),
        }
    }
}

impl LlmClient for OpenAiClient {
    fn complete<'a>(&'a self, request: &'a CompletionRequest) -> LlmFuture<'a> {
        Box::pin(async move {
            let c = self.complete_inner(request).await?;
            crate::client::record_usage(&request.model, &c.usage);
            Ok(c)
        })
    }
}

/// A transport error with its cause chain (reqwest's own message is terse).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transport error"
    };
    let mut msg = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `retry-after-ms` (milliseconds, may be fractional) or else `Retry-After` (whole
/// seconds; the HTTP-date form is not read).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let ms = header("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    ms.or_else(|| {
        header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

/// The `error.message` of an OpenAI-style error body, or the start of the body.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ChatRole;

    #[test]
    fn config_loads_with_defaults_and_human_durations() {
        let c: OpenAiConfig = serde_json::from_value(json!({
            "base_url": "http://localhost:8000/v1",
            "timeout": "90s",
            "backoff_base": "100ms",
        }))
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(90));
        assert_eq!(c.backoff_base, Duration::from_millis(100));
        assert_eq!(c.max_retries, 3);
        assert!(serde_json::from_value::<OpenAiConfig>(json!({"bogus": 1})).is_err());
    }

    #[test]
    fn debug_hides_the_key() {
        let c = OpenAiConfig {
            api_key: Some("sk-secret".into()),
            ..OpenAiConfig::default()
        };
        assert!(!format!("{c:?}").contains("sk-secret"));
    }

    #[test]
    fn rejects_bad_config() {
        let bad_url = OpenAiClient::new(OpenAiConfig {
            base_url: "not a url".into(),
            ..OpenAiConfig::default()
        });
        assert!(matches!(bad_url, Err(OpenAiConfigError::BaseUrl { .. })));
        let ftp = OpenAiClient::new(OpenAiConfig {
            base_url: "ftp://example.com/v1".into(),
            ..OpenAiConfig::default()
        });
        assert!(matches!(ftp, Err(OpenAiConfigError::BaseUrl { .. })));
        let key = OpenAiClient::new(OpenAiConfig {
            api_key: Some("a\nb".into()),
            ..OpenAiConfig::default()
        });
        assert!(matches!(key, Err(OpenAiConfigError::ApiKey)));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let (b, m) = (Duration::from_millis(100), Duration::from_secs(1));
        let ms = |retry, unit| backoff_delay(b, m, retry, unit).as_secs_f64() * 1000.0;
        let close = |a: f64, want: f64| (a - want).abs() < 0.001;
        assert!(close(ms(0, 0.0), 50.0));
        assert!(close(ms(0, 0.5), 75.0));
        assert!(ms(0, 0.999_999) < 100.0 && ms(0, 0.999_999) > 99.9);
        assert!(close(ms(2, 0.0), 200.0));
        assert!(close(ms(3, 0.0), 400.0));
        // 1.6 s capped at 1 s, then halved by the jitter floor.
        assert!(close(ms(4, 0.0), 500.0));
        assert!(close(ms(40, 0.0), 500.0));
        let units: Vec<f64> = (0..100).map(|_| jitter_unit(3)).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(units.iter().any(|u| *u != units[0]), "jitter must vary");
    }

    #[test]
    fn body_carries_the_format() {
        let client = OpenAiClient::new(OpenAiConfig::default()).unwrap();
        let req = CompletionRequest {
            model: "m".into(),
            messages: vec![ChatMessage::system("s"), ChatMessage::user("u")],
            response_format: Some(ResponseFormat {
                name: "n".into(),
                schema: json!({"type": "object"}).into(),
            }),
            max_tokens: Some(9),
        };
        let b = client.body(&req, &req.messages);
        assert_eq!(
            b,
            json!({
                "model": "m",
                "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                "max_tokens": 9,
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "n", "schema": {"type": "object"}, "strict": false}},
            })
        );
        let json_mode = OpenAiClient::new(OpenAiConfig {
            json_mode: true,
            ..OpenAiConfig::default()
        })
        .unwrap();
        let b = json_mode.body(
            &CompletionRequest {
                max_tokens: None,
                ..req.clone()
            },
            &[ChatMessage {
                role: ChatRole::Assistant,
                content: "a".into(),
            }],
        );
        assert_eq!(b["response_format"], json!({"type": "json_object"}));
        assert!(b.get("max_tokens").is_none());
        assert_eq!(b["messages"][0]["role"], "assistant");
    }

    #[test]
    fn reads_retry_after_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("1250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1250)));
    }

    #[test]
    fn a_body_reads_back_as_the_request_it_came_from() {
        let client = OpenAiClient::new(OpenAiConfig::default()).unwrap();
        let request = CompletionRequest {
            model: "m".into(),
            messages: vec![ChatMessage::system("s"), ChatMessage::user("u")],
            response_format: Some(ResponseFormat {
                name: "flotilla_plan".into(),
                schema: std::sync::Arc::new(json!({"type": "object"})),
            }),
            max_tokens: Some(99),
        };
        let body = client.body(&request, &request.messages);
        assert_eq!(CompletionRequest::from_openai_body(&body), request);
    }
}

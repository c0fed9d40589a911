//! A fake OpenAI-compatible server for tests and demos: `POST /v1/chat/completions`
//! and `GET /v1/models` on a random loopback port, with provider-style rate limits
//! (requests and tokens per sliding window, answered with 429 and `Retry-After`),
//! optional bearer-key checking, and a script of faults (5xx, 429, slow, truncated or
//! malformed bodies, fixed content) consumed one per request.
//!
//! # Token accounting
//! Prompt tokens are estimated as **`ceil(total chars of all message contents / 4)`**
//! (chars are Unicode scalar values), the same formula as
//! `flotilla_llm::tokens::estimate_prompt_tokens`; keep the two in step. A reply's
//! completion tokens are `min(max_tokens, FakeConfig::completion_tokens)`.
//!
//! # Rate limits
//! Over the last [`FakeConfig::window`], a chat request is answered 429 if the
//! accepted requests in the window are already `>= rpm`, or if the tokens charged in
//! the window plus this request's estimate (prompt tokens plus `max_tokens`, or
//! [`FakeConfig::completion_tokens`] when unset) exceed `tpm`. An accepted request is
//! charged at arrival: one request, and its prompt plus completion tokens. A 429 is
//! not charged, nor are scripted faults. A request whose estimate alone exceeds `tpm`
//! is always 429 (retrying after one window will not help, as with real providers).
//!
//! The server task stops (gracefully) when the [`FakeOpenAi`] is dropped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// Computes a reply's content from the request body (the parsed JSON).
pub type Responder = Arc<dyn Fn(&Value) -> String + Send + Sync>;

/// Settings of a [`FakeOpenAi`].
#[derive(Clone)]
pub struct FakeConfig {
    /// Requests per window; `None` is unlimited.
    pub rpm: Option<u64>,
    /// Tokens per window; `None` is unlimited.
    pub tpm: Option<u64>,
    /// The sliding window the limits apply to (default 60 s; tests compress it).
    pub window: Duration,
    /// Completion tokens of a reply, capped by the request's `max_tokens` (default 50).
    pub completion_tokens: u32,
    /// Added delay before every normal answer (default none).
    pub latency: Duration,
    /// If set, requests must carry `Authorization: Bearer <key>`, else 401.
    pub api_key: Option<String>,
    /// Fixed content of every normal reply (unless [`FakeConfig::responder`] is set).
    pub reply: Option<String>,
    /// Computes the content of every normal reply; wins over [`FakeConfig::reply`].
    pub responder: Option<Responder>,
    /// Model ids listed by `GET /v1/models` (default `["fake-model"]`).
    pub models: Vec<String>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            rpm: None,
            tpm: None,
            window: Duration::from_secs(60),
            completion_tokens: 50,
            latency: Duration::ZERO,
            api_key: None,
            reply: None,
            responder: None,
            models: vec!["fake-model".to_owned()],
        }
    }
}

impl std::fmt::Debug for FakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeConfig")
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("window", &self.window)
            .field("completion_tokens", &self.completion_tokens)
            .field("latency", &self.latency)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("reply", &self.reply)
            .field("responder", &self.responder.as_ref().map(|_| "<fn>"))
            .field("models", &self.models)
            .finish()
    }
}

/// A scripted behaviour, consumed by one chat request before normal handling
/// (after the API key check and body parsing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer this status with an OpenAI-style JSON error body.
    Status(u16),
    /// Answer 429 with `Retry-After` (whole seconds, rounded up, at least 1) and
    /// `retry-after-ms`.
    RateLimited {
        /// What the headers say.
        retry_after: Duration,
    },
    /// Sleep, then handle the request normally.
    Slow(Duration),
    /// Answer 200 with the first half of a completion body (invalid JSON; the
    /// `Content-Length` matches the truncated body).
    Truncated,
    /// Answer 200 with valid JSON that is not a chat completion (no `choices`).
    Malformed,
    /// Handle the request normally, replying with exactly this content.
    Content(String),
    /// Answer exactly this status and body (`Content-Type: application/json`), not
    /// charged: for shapes the other behaviours do not cover (no `usage`, a refusal).
    Raw {
        /// HTTP status.
        status: u16,
        /// The body, verbatim.
        body: String,
    },
}

/// What the server has seen and answered so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Chat requests received (every answer below counts one).
    pub requests: u64,
    /// Chat completions answered 200 with a proper body.
    pub ok: u64,
    /// Answered 429 (rate limit or script).
    pub http_429: u64,
    /// Answered another 4xx (bad key, bad body, script).
    pub http_4xx: u64,
    /// Answered 5xx (script).
    pub http_5xx: u64,
    /// Answered a scripted truncated, malformed or raw 2xx.
    pub faults: u64,
    /// Tokens charged (prompt plus completion of accepted requests).
    pub tokens: u64,
    /// Most accepted requests ever inside one window.
    pub max_requests_in_window: u64,
    /// Most tokens ever charged inside one window.
    pub max_tokens_in_window: u64,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeStartError {
    /// Binding the loopback listener failed: retry or give up.
    #[error("could not bind the fake OpenAI server: {0}")]
    Bind(#[from] std::io::Error),
}

/// A running fake OpenAI-compatible server.
#[derive(Debug)]
pub struct FakeOpenAi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeOpenAi {
    /// Binds `127.0.0.1:0` and serves in a background task of the current runtime.
    pub async fn start(config: FakeConfig) -> Result<Self, FakeStartError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                window: SlidingWindow::new(config.window),
                ..Inner::default()
            }),
            config,
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .with_state(Arc::clone(&shared));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:<port>/v1`, the base URL an OpenAI client wants.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues `behaviour` for the next chat request that gets past the key check.
    pub fn push_script(&self, behaviour: Behaviour) {
        self.shared.lock().script.push_back(behaviour);
    }

    /// Scripted behaviours not consumed yet.
    pub fn script_len(&self) -> usize {
        self.shared.lock().script.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> FakeStats {
        self.shared.lock().stats
    }

    /// The body of every chat request received, in order (parsed JSON; a body that
    /// is not JSON is recorded as a JSON string of its text).
    pub fn requests_log(&self) -> Vec<Value> {
        self.shared.lock().log.clone()
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Debug)]
struct Shared {
    config: FakeConfig,
    inner: Mutex<Inner>,
}

impl Shared {
    /// The state lock. Only held for counter updates, never across an `.await`.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Default)]
struct Inner {
    window: SlidingWindow,
    script: VecDeque<Behaviour>,
    stats: FakeStats,
    log: Vec<Value>,
    next_id: u64,
}

/// Accepted requests of the last `span`, as (arrival, tokens charged). Pure: time is
/// an argument.
#[derive(Debug, Default)]
struct SlidingWindow {
    span: Duration,
    entries: VecDeque<(Instant, u64)>,
    tokens: u64,
}

impl SlidingWindow {
    fn new(span: Duration) -> Self {
        Self {
            span,
            ..Self::default()
        }
    }

    /// Drops entries that arrived `span` or longer before `now`.
    fn prune(&mut self, now: Instant) {
        while let Some(&(t, n)) = self.entries.front() {
            if now.saturating_duration_since(t) >= self.span {
                self.entries.pop_front();
                self.tokens -= n;
            } else {
                break;
            }
        }
    }

    /// Admits a request estimated at `estimate` tokens and charges `charge`, or says
    /// how long until it would be admitted.
    fn admit(
        &mut self,
        now: Instant,
        rpm: Option<u64>,
        tpm: Option<u64>,
        estimate: u64,
        charge: u64,
    ) -> Result<(), Duration> {
        self.prune(now);
        let expiry = |t: Instant| (t + self.span).saturating_duration_since(now);
        let mut refused = None::<Duration>;
        let mut refuse = |wait: Duration| {
            let wait = wait.max(Duration::from_millis(1));
            refused = Some(refused.map_or(wait, |w| w.max(wait)));
        };
        let len = self.entries.len();
        if let Some(rpm) = rpm
            && len as u64 >= rpm
        {
            // The oldest leave first: the one at `len - rpm` must go for a slot.
            match usize::try_from(rpm).ok().filter(|r| *r > 0) {
                Some(r) => refuse(self.entries.get(len - r).map_or(self.span, |e| expiry(e.0))),
                None => refuse(self.span),
            }
        }
        if let Some(tpm) = tpm
            && self.tokens + estimate > tpm
        {
            if estimate > tpm {
                refuse(self.span);
            } else {
                let mut left = self.tokens;
                for &(t, n) in &self.entries {
                    left -= n;
                    if left + estimate <= tpm {
                        refuse(expiry(t));
                        break;
                    }
                }
            }
        }
        if let Some(wait) = refused {
            return Err(wait);
        }
        self.entries.push_back((now, charge));
        self.tokens += charge;
        Ok(())
    }

    fn requests(&self) -> u64 {
        self.entries.len() as u64
    }
}

/// `ceil(chars / 4)` over all message contents; see the module docs.
fn prompt_tokens(messages: &[Value]) -> u64 {
    let chars: usize = messages
        .iter()
        .map(|m| content_text(&m["content"]).chars().count())
        .sum();
    chars.div_ceil(4) as u64
}

/// A message content: a string, or the concatenated text parts of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .concat(),
        _ => String::new(),
    }
}

/// The parts of a chat request the fake looks at.
struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    max_tokens: Option<u32>,
    /// The `json_schema.schema` of a `json_schema` response format.
    schema: Option<Value>,
    /// A JSON response was requested (`json_object` or `json_schema`).
    json: bool,
}

fn parse_request(body: &Value) -> Result<ChatRequest, String> {
    let model = body["model"]
        .as_str()
        .ok_or("`model` must be a string")?
        .to_owned();
    let messages = body["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or("`messages` must be a non-empty array")?
        .clone();
    for m in &messages {
        if !matches!(
            m["role"].as_str(),
            Some("system" | "user" | "assistant" | "developer" | "tool")
        ) {
            return Err(format!("invalid message role in {m}"));
        }
    }
    let max_tokens = match body.get("max_tokens").or(body.get("max_completion_tokens")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or("`max_tokens` must be a positive integer")?,
        ),
    };
    let (json, schema) = match body.get("response_format") {
        None | Some(Value::Null) => (false, None),
        Some(f) => match f["type"].as_str() {
            Some("text") => (false, None),
            Some("json_object") => (true, None),
            Some("json_schema") => {
                let js = &f["json_schema"];
                if js["name"].as_str().is_none() {
                    return Err("`response_format.json_schema.name` is required".into());
                }
                (true, js.get("schema").cloned())
            }
            _ => return Err(format!("unsupported response_format {f}")),
        },
    };
    Ok(ChatRequest {
        model,
        messages,
        max_tokens,
        schema,
        json,
    })
}

/// The smallest instance of `schema` that has every required property (a best
/// effort, for default replies to structured requests).
fn minimal_instance(schema: &Value, depth: u32) -> Value {
    let ty = match &schema["type"] {
        Value::String(s) => s.as_str(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .next()
            .unwrap_or("object"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    match ty {
        "object" if depth < 8 => {
            let mut out = serde_json::Map::new();
            if let Some(required) = schema["required"].as_array() {
                for key in required.iter().filter_map(Value::as_str) {
                    out.insert(
                        key.to_owned(),
                        minimal_instance(&schema["properties"][key], depth + 1),
                    );
                }
            }
            Value::Object(out)
        }
        "object" => json!({}),
        "array" => json!([]),
        "integer" | "number" => json!(0),
        "boolean" => json!(false),
        "null" => Value::Null,
        _ => json!("fake"),
    }
}

fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn error_response(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    (status, axum::Json(error_body(message, kind, code))).into_response()
}

fn rate_limited(retry_after: Duration, message: &str) -> Response {
    let ms = retry_after.as_nanos().div_ceil(1_000_000).max(1);
    let secs = retry_after.as_nanos().div_ceil(1_000_000_000).max(1);
    let mut resp = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        message,
        "rate_limit_exceeded",
        Some("rate_limit_exceeded"),
    );
    let headers = resp.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
    headers.insert("retry-after-ms", HeaderValue::from(ms as u64));
    resp
}

fn authorized(config: &FakeConfig, headers: &HeaderMap) -> bool {
    let Some(key) = &config.api_key else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|v| v == key)
}

fn unauthorized() -> Response {
    error_response(
        StatusCode::UNAUTHORIZED,
        "Incorrect API key provided.",
        "invalid_request_error",
        Some("invalid_api_key"),
    )
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&shared.config, &headers) {
        return unauthorized();
    }
    let data: Vec<Value> = shared
        .config
        .models
        .iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": 0, "owned_by": "flotilla-testkit"}),
        )
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    {
        let mut inner = shared.lock();
        inner.stats.requests += 1;
        let entry = match &parsed {
            Ok(v) => v.clone(),
            Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
        };
        inner.log.push(entry);
    }
    let resp = handle(&shared, &headers, parsed).await;
    let status = resp.status();
    let mut inner = shared.lock();
    if status.as_u16() == 429 {
        inner.stats.http_429 += 1;
    } else if status.is_client_error() {
        inner.stats.http_4xx += 1;
    } else if status.is_server_error() {
        inner.stats.http_5xx += 1;
    }
    resp
}

async fn handle(
    shared: &Shared,
    headers: &HeaderMap,
    parsed: Result<Value, serde_json::Error>,
) -> Response {
    let config = &shared.config;
    if !authorized(config, headers) {
        return unauthorized();
    }
    let body = match parsed {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("invalid JSON body: {e}");
            return error_response(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None);
        }
    };
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(msg) => {
            return error_response(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None);
        }
    };
    let script = shared.lock().script.pop_front();
    let mut content = None;
    match script {
        None => {}
        Some(Behaviour::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let kind = if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            };
            return error_response(status, &format!("scripted status {code}"), kind, None);
        }
        Some(Behaviour::RateLimited { retry_after }) => {
            return rate_limited(retry_after, "Rate limit reached (scripted).");
        }
        Some(Behaviour::Slow(d)) => tokio::time::sleep(d).await,
        Some(Behaviour::Truncated) => {
            let full = completion_body(shared, &req, "truncated reply".into(), 0, 0).to_string();
            shared.lock().stats.faults += 1;
            let half = full.as_bytes()[..full.len() / 2].to_vec();
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                half,
            )
                .into_response();
        }
        Some(Behaviour::Malformed) => {
            shared.lock().stats.faults += 1;
            return axum::Json(json!({
                "id": "chatcmpl-malformed",
                "object": "chat.completion",
                "created": now_secs(),
                "model": req.model,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }))
            .into_response();
        }
        Some(Behaviour::Content(c)) => content = Some(c),
        Some(Behaviour::Raw { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status.is_success() {
                shared.lock().stats.faults += 1;
            }
            return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        }
    }

    let prompt = prompt_tokens(&req.messages);
    let completion = req.max_tokens.map_or(config.completion_tokens, |m| {
        m.min(config.completion_tokens)
    });
    let estimate = prompt + u64::from(req.max_tokens.unwrap_or(config.completion_tokens));
    let charge = prompt + u64::from(completion);
    {
        let mut inner = shared.lock();
        let admitted = inner
            .window
            .admit(Instant::now(), config.rpm, config.tpm, estimate, charge);
        if let Err(wait) = admitted {
            drop(inner);
            let msg = format!(
                "Rate limit reached for {}: limit rpm {:?}, tpm {:?} per {:?}; requested {estimate} tokens.",
                req.model, config.rpm, config.tpm, config.window
            );
            return rate_limited(wait, &msg);
        }
        inner.stats.tokens += charge;
        let (r, t) = (inner.window.requests(), inner.window.tokens);
        let stats = &mut inner.stats;
        stats.max_requests_in_window = stats.max_requests_in_window.max(r);
        stats.max_tokens_in_window = stats.max_tokens_in_window.max(t);
    }
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    let content = content.unwrap_or_else(|| default_content(config, &body, &req));
    let resp = completion_body(shared, &req, content, prompt, u64::from(completion));
    shared.lock().stats.ok += 1;
    axum::Json(resp).into_response()
}

fn default_content(config: &FakeConfig, body: &Value, req: &ChatRequest) -> String {
    if let Some(f) = &config.responder {
        return f(body);
    }
    if let Some(r) = &config.reply {
        return r.clone();
    }
    let chars: usize = req
        .messages
        .iter()
        .map(|m| content_text(&m["content"]).chars().count())
        .sum();
    let text = format!("fake reply to {chars} chars");
    match (&req.schema, req.json) {
        (Some(schema), _) => minimal_instance(schema, 0).to_string(),
        (None, true) => json!({ "reply": text }).to_string(),
        (None, false) => text,
    }
}

fn completion_body(
    shared: &Shared,
    req: &ChatRequest,
    content: String,
    prompt: u64,
    completion: u64,
) -> Value {
    let id = {
        let mut inner = shared.lock();
        inner.next_id += 1;
        inner.next_id
    };
    json!({
        "id": format!("chatcmpl-fake-{id}"),
        "object": "chat.completion",
        "created": now_secs(),
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn rpm_fills_then_frees_as_entries_age() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(S);
        for i in 0..5 {
            let now = t0 + Duration::from_millis(100 * i);
            assert_eq!(w.admit(now, Some(5), None, 1, 1), Ok(()));
        }
        // Sixth at 450 ms: the first (at 0 ms) leaves at 1000 ms.
        let now = t0 + Duration::from_millis(450);
        assert_eq!(
            w.admit(now, Some(5), None, 1, 1),
            Err(Duration::from_millis(550))
        );
        assert_eq!(w.requests(), 5, "a 429 is not charged");
        // At 1000 ms the first has left: admitted.
        let now = t0 + Duration::from_millis(1000);
        assert_eq!(w.admit(now, Some(5), None, 1, 1), Ok(()));
        assert_eq!(w.requests(), 5);
    }

    #[test]
    fn tpm_counts_the_estimate_and_charges_actual() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(S);
        // Estimate 60, charge 40.
        assert_eq!(w.admit(t0, None, Some(100), 60, 40), Ok(()));
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(w.admit(t1, None, Some(100), 60, 40), Ok(()));
        assert_eq!(w.tokens, 80);
        // 80 + 30 > 100: must wait until the first entry (t0) leaves.
        let t2 = t0 + Duration::from_millis(300);
        assert_eq!(
            w.admit(t2, None, Some(100), 30, 30),
            Err(Duration::from_millis(700))
        );
        // 80 + 90 > 100 even after t0 leaves (40 + 90): wait for both.
        assert_eq!(
            w.admit(t2, None, Some(100), 90, 90),
            Err(Duration::from_millis(900))
        );
        // Exactly at the limit is allowed.
        assert_eq!(w.admit(t2, None, Some(100), 20, 20), Ok(()));
        assert_eq!(w.tokens, 100);
        // Larger than the limit alone: always refused, for a whole window.
        assert_eq!(w.admit(t2, None, Some(100), 101, 1), Err(S));
    }

    #[test]
    fn minimal_instance_fills_required_properties() {
        let schema = json!({
            "type": "object",
            "required": ["summary", "items", "n", "nested"],
            "properties": {
                "summary": {"type": "string"},
                "items": {"type": "array"},
                "n": {"type": "integer"},
                "nested": {"type": "object", "required": ["kind"], "properties": {"kind": {"enum": ["a", "b"]}}},
                "optional": {"type": "string"}
            }
        });
        assert_eq!(
            minimal_instance(&schema, 0),
            json!({"summary": "fake", "items": [], "n": 0, "nested": {"kind": "a"}})
        );
    }

    #[test]
    fn prompt_estimate_is_ceil_chars_over_four() {
        let msgs = vec![
            json!({"role": "system", "content": "abc"}),
            json!({"role": "user", "content": [{"type": "text", "text": "defgh"}]}),
        ];
        assert_eq!(prompt_tokens(&msgs), 2);
        assert_eq!(prompt_tokens(&[json!({"role": "user", "content": "x"})]), 1);
    }
}

//! The tool gateway: how agents call tools, and how a Rust process serves one.
//!
//! Tools are NATS micro services (`<p>-tool-<name>`, endpoint `<p>.tool.<name>`) that
//! any language can implement; see `docs/protocol.md`, section 13. [`ToolGateway`]
//! calls the tools a process is configured for ([`ToolSpec`] each) and adds, per tool:
//!
//! - a result cache for deterministic tools without side effects (`t.<hash>` keys of
//!   the `<p>-cache` bucket, with a per-key TTL), shared by every process;
//! - an idempotency key for tools with side effects (a hash of session, task, tool and
//!   arguments, sent in the call and its header), and a record of the result under
//!   `i.<key>`: a redelivered task that makes the same call gets the recorded result and
//!   the effect is not repeated, even when the tool itself does not deduplicate;
//! - a timeout per attempt, retries with backoff on timeouts, no responders and
//!   retryable errors;
//! - an in-process rate limit ([`Pacer`]) and a circuit breaker ([`Breaker`]), both
//!   pure logic on a caller-supplied clock.
//!
//! [`serve_tool`] serves a tool from Rust.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use flotilla_bus::metrics::Count;
use flotilla_bus::{Bus, CoreError, RequestError};
use flotilla_protocol::subject::keys;
use flotilla_protocol::{InvalidId, SessionId, TaskId, ToolCall, ToolName, ToolReply, V1, headers};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How the gateway treats one tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolSpec {
    /// Same arguments, same result: results are cached (only for tools without side
    /// effects) and shared by every process.
    pub deterministic: bool,
    /// How long a cached result lives (whole seconds, at least 1 s).
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Calling the tool changes something: every call carries an idempotency key, and
    /// the gateway records the result so the same call is never made twice.
    pub side_effects: bool,
    /// How long the record of a side-effecting call's result lives (whole seconds):
    /// make it longer than a task can take to be redelivered.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// How long one attempt may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after the first, on a timeout, no responders or a retryable error.
    pub retries: u32,
    /// Attempts per second from this process, evenly spaced (0: unlimited).
    pub rate_per_s: f64,
    /// Consecutive failed calls that open the circuit breaker (0: never).
    pub breaker_failures: u32,
    /// How long an open breaker fails calls fast before it lets one trial call through.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl Default for ToolSpec {
    fn default() -> Self {
        Self {
            deterministic: false,
            cache_ttl: Duration::from_secs(600),
            side_effects: false,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
            retries: 2,
            rate_per_s: 0.0,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// The tools a process may call, by name (`[tools.<name>]` in configuration).
pub type ToolsConfig = BTreeMap<String, ToolSpec>;

/// A tool call did not produce a result. Each variant says what the caller does next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolError {
    /// No such tool is configured for this process: tell the agent it does not exist;
    /// calling again will not help.
    #[error("unknown tool {tool:?}")]
    Unknown {
        /// The name asked for.
        tool: String,
    },
    /// The tool ran and refused the call (bad arguments, not allowed): show the agent
    /// the message; the same call will fail again.
    #[error("tool {tool} failed: {message}")]
    Failed {
        /// The tool.
        tool: String,
        /// The tool's message.
        message: String,
    },
    /// Every attempt timed out: the tool may be overloaded; try again later.
    #[error("tool {tool} timed out {attempts} times")]
    Timeout {
        /// The tool.
        tool: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Nobody serves the tool, or it kept answering with retryable errors: try again
    /// later.
    #[error("tool {tool} unavailable: {detail}")]
    Unavailable {
        /// The tool.
        tool: String,
        /// The last problem.
        detail: String,
    },
    /// The tool failed repeatedly and calls fail fast for a while: try again after
    /// `retry_in`.
    #[error("tool {tool} circuit open, retry in {retry_in:?}")]
    CircuitOpen {
        /// The tool.
        tool: String,
        /// When a trial call will be let through.
        retry_in: Duration,
    },
    /// The tool answered something that is not a tool reply: its implementation is
    /// broken; do not retry.
    #[error("tool {tool} sent a bad reply: {detail}")]
    BadReply {
        /// The tool.
        tool: String,
        /// What was wrong.
        detail: String,
    },
}

impl ToolError {
    /// A short stable name of the kind of failure (the `error.type` of a call's span).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unknown { .. } => "unknown_tool",
            Self::Failed { .. } => "failed",
            Self::Timeout { .. } => "timeout",
            Self::Unavailable { .. } => "unavailable",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::BadReply { .. } => "bad_reply",
        }
    }

    /// Whether the same call may succeed later (timeouts, unavailable, circuit open).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. } | Self::Unavailable { .. } | Self::CircuitOpen { .. }
        )
    }
}

/// An in-process rate limit: at most `rate` attempts per second, evenly spaced (a
/// token bucket of one token). Pure logic on a caller-supplied clock.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Option<Duration>,
    next: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate_per_s` attempts per second (0 or less, or not finite:
    /// unlimited).
    pub fn new(rate_per_s: f64) -> Self {
        let interval = (rate_per_s.is_finite() && rate_per_s > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / rate_per_s));
        Self {
            interval,
            next: None,
        }
    }

    /// Reserves the next slot at or after `now`: the caller waits until the returned
    /// instant, then goes.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let Some(interval) = self.interval else {
            return now;
        };
        let at = self.next.map_or(now, |n| n.max(now));
        self.next = Some(at + interval);
        at
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    Trial { until: Instant },
}

/// A circuit breaker: after `threshold` consecutive failed calls it opens, and calls
/// fail fast for `cooldown`; then one trial call goes through, and its outcome closes
/// or reopens it. Pure logic on a caller-supplied clock.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: BreakerState,
}

impl Breaker {
    /// A closed breaker (`threshold` 0: never opens).
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    /// May a call go through at `now`? `Err` holds how long until a trial call may.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } | BreakerState::Trial { until } if now >= until => {
                // A trial whose caller vanished must not hold the breaker forever:
                // after another cooldown, the next call is the trial.
                self.state = BreakerState::Trial {
                    until: now + self.cooldown,
                };
                Ok(())
            }
            BreakerState::Open { until } | BreakerState::Trial { until } => Err(until - now),
        }
    }

    /// Records the outcome of an admitted call.
    pub fn record(&mut self, ok: bool, now: Instant) {
        self.state = match (self.state, ok) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Trial { .. } | BreakerState::Open { .. }, false) => BreakerState::Open {
                until: now + self.cooldown,
            },
            (BreakerState::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if self.threshold > 0 && failures >= self.threshold {
                    BreakerState::Open {
                        until: now + self.cooldown,
                    }
                } else {
                    BreakerState::Closed { failures }
                }
            }
        };
    }

    /// Whether calls currently fail fast.
    pub fn is_open(&self) -> bool {
        !matches!(self.state, BreakerState::Closed { .. })
    }
}

/// What the gateway did, for tests, benches and summaries.
#[derive(Debug)]
pub struct ToolStats {
    /// Calls asked of the gateway (`flotilla_tool_calls_total`).
    pub calls: Count,
    /// Calls answered from the deterministic cache (`flotilla_tool_cache_hits_total`).
    pub cache_hits: Count,
    /// Side-effecting calls answered from their idempotency record
    /// (`flotilla_tool_replays_total`).
    pub replayed: Count,
    /// Requests sent to tools, retries included (`flotilla_tool_attempts_total`).
    pub attempts: Count,
    /// Calls failed fast by an open breaker (`flotilla_tool_circuit_open_total`).
    pub circuit_open: Count,
}

impl Default for ToolStats {
    fn default() -> Self {
        Self {
            calls: Count::new("flotilla_tool_calls_total"),
            cache_hits: Count::new("flotilla_tool_cache_hits_total"),
            replayed: Count::new("flotilla_tool_replays_total"),
            attempts: Count::new("flotilla_tool_attempts_total"),
            circuit_open: Count::new("flotilla_tool_circuit_open_total"),
        }
    }
}

struct Tool {
    name: ToolName,
    spec: ToolSpec,
    pacer: std::sync::Mutex<Pacer>,
    breaker: std::sync::Mutex<Breaker>,
}

/// Calls tools over NATS with caching, idempotency, timeouts, retries, rate limits and
/// circuit breakers. Cheap to clone.
#[derive(Clone)]
pub struct ToolGateway {
    bus: Bus,
    tools: Arc<BTreeMap<String, Tool>>,
    cache: Arc<tokio::sync::OnceCell<kv::Store>>,
    stats: Arc<ToolStats>,
}

impl std::fmt::Debug for ToolGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolGateway")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why an attempt did not produce a result.
enum AttemptError {
    /// Worth another attempt.
    Retry(ToolError),
    /// Final.
    Stop(ToolError),
}

impl ToolGateway {
    /// A gateway for the tools in `specs`. Fails on a name that is not a valid tool
    /// name (`[a-z][a-z0-9_-]{0,63}`).
    pub fn new(bus: Bus, specs: BTreeMap<String, ToolSpec>) -> Result<Self, InvalidId> {
        let mut tools = BTreeMap::new();
        for (name, spec) in specs {
            let tool = Tool {
                name: ToolName::parse(name.clone())?,
                pacer: std::sync::Mutex::new(Pacer::new(spec.rate_per_s)),
                breaker: std::sync::Mutex::new(Breaker::new(
                    spec.breaker_failures,
                    spec.breaker_cooldown,
                )),
                spec,
            };
            tools.insert(name, tool);
        }
        Ok(Self {
            bus,
            tools: Arc::new(tools),
            cache: Arc::new(tokio::sync::OnceCell::new()),
            stats: Arc::new(ToolStats::default()),
        })
    }

    /// Whether `tool` is configured.
    pub fn knows(&self, tool: &str) -> bool {
        self.tools.contains_key(tool)
    }

    /// The configured tool names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    /// The spec of `tool`, if configured.
    pub fn spec(&self, tool: &str) -> Option<&ToolSpec> {
        self.tools.get(tool).map(|t| &t.spec)
    }

    /// What this gateway has done.
    pub fn stats(&self) -> &ToolStats {
        &self.stats
    }

    /// Calls `tool` with `arguments` for `task` of `session`, and returns its result.
    /// The call is a span (`execute_tool <name>`, OpenTelemetry GenAI attributes).
    pub async fn call(
        &self,
        session: &SessionId,
        task: &TaskId,
        tool: &str,
        arguments: &serde_json::Value,
    ) -> Result<serde_json::Value, ToolError> {
        let span = tracing::info_span!(
            "execute_tool",
            otel.name = format!("execute_tool {tool}"),
            gen_ai.operation.name = "execute_tool",
            gen_ai.tool.name = tool,
            error.type = tracing::field::Empty,
        );
        let out = self
            .call_in_span(session, task, tool, arguments)
            .instrument(span.clone())
            .await;
        if let Err(e) = &out {
            span.record("error.type", e.kind());
        }
        out
    }

    async fn call_in_span(
        &self,
        session: &SessionId,
        task: &TaskId,
        tool: &str,
        arguments: &serde_json::Value,
    ) -> Result<serde_json::Value, ToolError> {
        self.stats.calls.increment();
        let t = self.tools.get(tool).ok_or_else(|| ToolError::Unknown {
            tool: tool.to_owned(),
        })?;
        let args = canonical_json(arguments);
        // Where the result is (or will be) kept, for how long, and the idempotency key.
        let (record, idempotency_key) = if t.spec.side_effects {
            let key = fingerprint(&[
                b"effect",
                session.as_str().as_bytes(),
                task.as_str().as_bytes(),
                tool.as_bytes(),
                &args,
            ]);
            (
                Some((keys::tool_effect(&key), t.spec.idempotency_ttl)),
                Some(key),
            )
        } else if t.spec.deterministic {
            let key = fingerprint(&[b"result", tool.as_bytes(), &args]);
            (Some((keys::tool_result(&key), t.spec.cache_ttl)), None)
        } else {
            (None, None)
        };
        if let Some((key, _)) = &record
            && let Some(result) = self.recorded(key).await
        {
            let counter = if t.spec.side_effects {
                &self.stats.replayed
            } else {
                &self.stats.cache_hits
            };
            counter.increment();
            tracing::debug!(tool, key, "tool result from the cache bucket");
            return Ok(result);
        }
        let admitted = lock(&t.breaker).admit(Instant::now());
        if let Err(retry_in) = admitted {
            self.stats.circuit_open.increment();
            flotilla_bus::trace::span_event(
                "circuit_open",
                vec![flotilla_bus::trace::KeyValue::new(
                    "gen_ai.tool.name",
                    tool.to_owned(),
                )],
            );
            return Err(ToolError::CircuitOpen {
                tool: tool.to_owned(),
                retry_in,
            });
        }
        let call = ToolCall {
            v: V1,
            tool: tool.to_owned(),
            arguments: arguments.clone(),
            session_id: session.clone(),
            task_id: task.clone(),
            idempotency_key,
        };
        let outcome = self.attempts(t, &call).await;
        // A tool that ran and refused the call is healthy: only failures to get an
        // answer count against the breaker.
        let healthy = matches!(outcome, Ok(_) | Err(ToolError::Failed { .. }));
        lock(&t.breaker).record(healthy, Instant::now());
        let result = outcome?;
        if let Some((key, ttl)) = record {
            self.record(&key, &result, ttl).await;
        }
        Ok(result)
    }

    async fn attempts(&self, t: &Tool, call: &ToolCall) -> Result<serde_json::Value, ToolError> {
        let subject = self.bus.names().tool(&t.name);
        let body = Bytes::from(serde_json::to_vec(call).unwrap_or_default());
        let mut headers = async_nats::HeaderMap::new();
        if let Some(key) = &call.idempotency_key {
            headers.insert(headers::IDEMPOTENCY_KEY, key.as_str());
        }
        let tries = t.spec.retries.saturating_add(1);
        let mut timeouts = 0;
        let mut last = None;
        for attempt in 0..tries {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let at = lock(&t.pacer).reserve(Instant::now());
            tokio::time::sleep_until(at).await;
            self.stats.attempts.increment();
            let reply = self
                .bus
                .request(
                    subject.clone(),
                    Some(headers.clone()),
                    body.clone(),
                    t.spec.timeout,
                )
                .await;
            match classify(&t.name, reply) {
                Ok(v) => return Ok(v),
                Err(AttemptError::Stop(e)) => return Err(e),
                Err(AttemptError::Retry(e)) => {
                    tracing::debug!(tool = %t.name, attempt, error = %e, "tool attempt failed");
                    if matches!(e, ToolError::Timeout { .. }) {
                        timeouts += 1;
                    }
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(ToolError::Timeout { tool, .. }) => ToolError::Timeout {
                tool,
                attempts: timeouts,
            },
            Some(e) => e,
            None => ToolError::Unavailable {
                tool: t.name.to_string(),
                detail: "no attempt made".into(),
            },
        })
    }

    async fn store(&self) -> Option<&kv::Store> {
        let bucket = self.bus.names().bucket_cache();
        match self
            .cache
            .get_or_try_init(|| self.bus.open_bucket(&bucket))
            .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(bucket, error = %e, "cache bucket unavailable");
                None
            }
        }
    }

    async fn recorded(&self, key: &str) -> Option<serde_json::Value> {
        let store = self.store().await?;
        match store.get(key).await {
            Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(key, error = %e, "unreadable cached tool result, ignored");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot read the tool cache");
                None
            }
        }
    }

    /// Writes a result with its own TTL (a few tries: for a side-effecting call, a lost
    /// record means a redelivery repeats the effect unless the tool deduplicates).
    async fn record(&self, key: &str, result: &serde_json::Value, ttl: Duration) {
        let bucket = self.bus.names().bucket_cache();
        let payload = Bytes::from(serde_json::to_vec(result).unwrap_or_default());
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        for attempt in 0..3u32 {
            let err = match self
                .bus
                .put_expiring(&bucket, key, payload.clone(), ttl, None)
                .await
            {
                Ok(_) => return,
                Err(e) => e,
            };
            tracing::warn!(key, attempt, error = %err, "tool result not recorded");
            tokio::time::sleep(backoff(attempt + 1)).await;
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Delay before attempt `n` (1-based): 50 ms, 100 ms, 200 ms, ... at most 1 s.
fn backoff(n: u32) -> Duration {
    flotilla_protocol::Backoff::exponential(Duration::from_millis(50), Duration::from_secs(1))
        .delay(n.saturating_sub(1))
}

fn classify(
    tool: &ToolName,
    reply: Result<async_nats::Message, RequestError>,
) -> Result<serde_json::Value, AttemptError> {
    let name = || tool.to_string();
    let msg = match reply {
        Ok(m) => m,
        Err(e) => {
            return Err(match e {
                RequestError::TimedOut { .. } => AttemptError::Retry(ToolError::Timeout {
                    tool: name(),
                    attempts: 1,
                }),
                RequestError::NoResponders { .. } => AttemptError::Retry(ToolError::Unavailable {
                    tool: name(),
                    detail: "no responders".into(),
                }),
                RequestError::Refused { source, .. } => AttemptError::Stop(ToolError::Failed {
                    tool: name(),
                    message: source.to_string(),
                }),
                RequestError::Failed { source, .. } => {
                    AttemptError::Retry(ToolError::Unavailable {
                        tool: name(),
                        detail: source.to_string(),
                    })
                }
            });
        }
    };
    match serde_json::from_slice::<ToolReply>(&msg.payload) {
        Ok(ToolReply::Ok { result, .. }) => Ok(result),
        Ok(ToolReply::Error {
            message,
            retryable: true,
            ..
        }) => Err(AttemptError::Retry(ToolError::Unavailable {
            tool: name(),
            detail: message,
        })),
        Ok(ToolReply::Error { message, .. }) => Err(AttemptError::Stop(ToolError::Failed {
            tool: name(),
            message,
        })),
        Err(e) => {
            // A generic NATS micro error (no tool reply body): 5xx is worth a retry.
            let header = |h: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|hs| hs.get(h))
                    .map(|v| v.as_str().to_owned())
            };
            match header("Nats-Service-Error") {
                Some(message) => {
                    let code: u16 = header("Nats-Service-Error-Code")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(500);
                    if code >= 500 {
                        Err(AttemptError::Retry(ToolError::Unavailable {
                            tool: name(),
                            detail: message,
                        }))
                    } else {
                        Err(AttemptError::Stop(ToolError::Failed {
                            tool: name(),
                            message,
                        }))
                    }
                }
                None => Err(AttemptError::Stop(ToolError::BadReply {
                    tool: name(),
                    detail: e.to_string(),
                })),
            }
        }
    }
}

/// `value` as JSON with every object's keys sorted (whatever serde_json's map order),
/// so equal values always hash the same.
pub fn canonical_json(value: &serde_json::Value) -> Vec<u8> {
    fn sorted(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                serde_json::Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_vec(&sorted(value)).unwrap_or_default()
}

/// FNV-1a (128 bits) of length-prefixed `parts`, as 32 hex digits.
fn fingerprint(parts: &[&[u8]]) -> String {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u128::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for p in parts {
        eat(&(p.len() as u64).to_le_bytes());
        eat(p);
    }
    format!("{h:032x}")
}

/// Serving a tool failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ServeToolError {
    /// The name is not a valid tool name: pick another.
    #[error(transparent)]
    InvalidName(#[from] InvalidId),
    /// The service could not be registered: check the connection and retry.
    #[error("cannot start tool service {service}: {detail}")]
    Start {
        /// The service name.
        service: String,
        /// The cause.
        detail: String,
    },
}

/// Serves tool `name` as the NATS micro service `<p>-tool-<name>` with one endpoint on
/// `<p>.tool.<name>`, answering each call with `handler` (calls run concurrently, up
/// to 256 at a time). Returns once the endpoint is subscribed; the service runs in a
/// task (the returned handle) until `shutdown`.
///
/// A call that does not decode gets a non-retryable error reply (and the NATS micro
/// error headers, code 400). An idempotency key sent only in the header is copied into
/// the call.
pub async fn serve_tool<F, Fut>(
    bus: &Bus,
    name: &str,
    description: &str,
    handler: F,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeToolError>
where
    F: Fn(ToolCall) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ToolReply> + Send + 'static,
{
    use futures::StreamExt;
    let tool = ToolName::parse(name)?;
    let names = bus.names();
    let service_name = names.tool_service_name(&tool);
    let start_err = |detail: String| ServeToolError::Start {
        service: service_name.clone(),
        detail,
    };
    let service = bus
        .start_service(&service_name, description, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| match e {
            CoreError::Service { source, .. } => start_err(source.to_string()),
            other => start_err(other.to_string()),
        })?;
    let mut endpoint = service
        .endpoint_builder()
        .name(tool.as_str())
        .add(names.tool(&tool))
        .await
        .map_err(|e| start_err(e.to_string()))?;
    bus.flush().await.map_err(|e| match e {
        CoreError::Flush(source) => start_err(source.to_string()),
        other => start_err(other.to_string()),
    })?;
    let handler = Arc::new(handler);
    let max_payload = bus.config().max_payload;
    Ok(tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(256));
        loop {
            let req = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = endpoint.next() => match r { Some(r) => r, None => break },
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut reply_headers = async_nats::HeaderMap::new();
                let reply = match flotilla_protocol::decode::<ToolCall>(
                    &req.message.payload,
                    max_payload,
                ) {
                    Ok(mut call) => {
                        if call.idempotency_key.is_none() {
                            call.idempotency_key = req
                                .message
                                .headers
                                .as_ref()
                                .and_then(|h| h.get(headers::IDEMPOTENCY_KEY))
                                .map(|v| v.as_str().to_owned());
                        }
                        handler(call).await
                    }
                    Err(e) => {
                        let message = format!("malformed tool call: {e}");
                        reply_headers.insert("Nats-Service-Error", message.as_str());
                        reply_headers.insert("Nats-Service-Error-Code", "400");
                        ToolReply::error(message, false)
                    }
                };
                let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
                if let Err(e) = req.respond_with_headers(Ok(body), reply_headers).await {
                    tracing::debug!(error = %e, "could not reply to a tool call");
                }
                drop(permit);
            });
        }
        let _ = service.stop().await;
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_attempts_evenly() {
        let mut p = Pacer::new(5.0);
        let t0 = Instant::now();
        let slots: Vec<_> = (0..4).map(|_| p.reserve(t0) - t0).collect();
        assert_eq!(
            slots,
            [0, 200, 400, 600].map(Duration::from_millis).to_vec()
        );
        // Idle time is not banked: after a long pause the next slot is now.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.reserve(later), later);
        assert_eq!(p.reserve(later), later + Duration::from_millis(200));
        let mut unlimited = Pacer::new(0.0);
        assert_eq!(unlimited.reserve(t0), t0);
        assert_eq!(unlimited.reserve(t0), t0);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_consecutive_failures_and_trials_after_cooldown() {
        let cooldown = Duration::from_secs(30);
        let mut b = Breaker::new(3, cooldown);
        let t0 = Instant::now();
        for _ in 0..2 {
            b.admit(t0).unwrap();
            b.record(false, t0);
        }
        // A success resets the count.
        b.record(true, t0);
        for _ in 0..3 {
            b.admit(t0).unwrap();
            b.record(false, t0);
        }
        assert!(b.is_open());
        assert_eq!(
            b.admit(t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(20))
        );
        // After the cooldown one trial goes through, the others still fail fast.
        let t1 = t0 + cooldown;
        b.admit(t1).unwrap();
        assert!(b.admit(t1).is_err());
        // The trial fails: open again for a full cooldown.
        b.record(false, t1);
        assert_eq!(
            b.admit(t1 + Duration::from_secs(1)),
            Err(Duration::from_secs(29))
        );
        let t2 = t1 + cooldown;
        b.admit(t2).unwrap();
        b.record(true, t2);
        assert!(!b.is_open());
        b.admit(t2).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_trial_does_not_hold_the_breaker() {
        let mut b = Breaker::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        b.record(false, t0);
        let t1 = t0 + Duration::from_secs(5);
        b.admit(t1).unwrap(); // the trial's caller never records
        assert!(b.admit(t1 + Duration::from_secs(1)).is_err());
        b.admit(t1 + Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn breaker_threshold_zero_never_opens() {
        let mut b = Breaker::new(0, Duration::from_secs(1));
        let now = Instant::now();
        for _ in 0..100 {
            b.record(false, now);
        }
        assert!(b.admit(now).is_ok());
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"d": 0, "c": 1}], "x": null}}"#)
                .unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a": {"x": null, "y": [1, {"c": 1, "d": 0}]}, "b": 1}"#)
                .unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            String::from_utf8(canonical_json(&a)).unwrap(),
            r#"{"a":{"x":null,"y":[1,{"c":1,"d":0}]},"b":1}"#
        );
    }

    #[test]
    fn fingerprints_separate_their_parts() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_eq!(fingerprint(&[b"x"]).len(), 32);
        assert_eq!(fingerprint(&[b"x"]), fingerprint(&[b"x"]));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(30), Duration::from_secs(1));
    }

    #[test]
    fn spec_parses_humane_durations_and_rejects_unknown_keys() {
        let spec: ToolSpec = serde_json::from_value(serde_json::json!({
            "deterministic": true, "cache_ttl": "5m", "timeout": "2s", "rate_per_s": 5.0
        }))
        .unwrap();
        assert!(spec.deterministic);
        assert_eq!(spec.cache_ttl, Duration::from_secs(300));
        assert_eq!(spec.timeout, Duration::from_secs(2));
        assert_eq!(spec.retries, 2);
        assert_eq!(spec.breaker_failures, 5);
        assert!(serde_json::from_value::<ToolSpec>(serde_json::json!({"ttl": "1s"})).is_err());
    }
}

//! The caller's side of the fleet rate limiter: [`LimiterClient`] asks the leader for
//! permits on `<p>.limits.acquire` and settles them on `<p>.limits.settle`, and
//! [`LimitedLlm`] wraps any [`LlmClient`] so every call waits for a permit first, is
//! settled with its real usage after, and reports a 429 that still happens.
//!
//! Models without configured limits are called directly, with no round trip.

use flotilla_bus::metrics::Count;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use flotilla_bus::Bus;
use flotilla_llm::{Completion, CompletionRequest, LlmClient, LlmError, LlmFuture};
use flotilla_protocol::{AcquireRefusal, AcquireReply, AcquireRequest, SettleRequest, V1};
use serde::{Deserialize, Serialize};

/// One model's provider limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    /// Requests per window (per minute by default).
    pub rpm: u64,
    /// Tokens per window (prompt + completion).
    pub tpm: u64,
}

/// The rate limiter's settings. Every process must share the `models` table (the
/// leader enforces it; callers use it to know which models go through the limiter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Run the limiter at all (a `serve` then campaigns for leadership).
    pub enabled: bool,
    /// Fraction of each limit kept free as a safety margin.
    pub margin: f64,
    /// The provider's accounting window (one minute for RPM/TPM; compressed in tests).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the leader lease lives without renewal (whole seconds).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long a caller waits for a permit before failing with a typed error.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Calls retried after a 429 (each after the provider's `Retry-After`).
    pub max_429_retries: u32,
    /// Fleet-wide token budget across every model and session (0: none).
    pub global_token_budget: u64,
    /// Limits per model name.
    pub models: BTreeMap<String, ModelLimits>,
    /// LLM calls one process may have in flight at once (a memory bound; the
    /// provider's real limits are `models`). Handlers waiting on a call hold no other
    /// slot, so this, not handler concurrency, is what bounds calls.
    pub max_in_flight: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            margin: 0.2,
            window: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(30),
            max_429_retries: 3,
            global_token_budget: 0,
            models: BTreeMap::new(),
            max_in_flight: 10_000,
        }
    }
}

/// A permit could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitError {
    /// No permit within the caller's hard timeout: the fleet is over its limits; retry
    /// the task later.
    #[error("no rate-limit permit for {model} within {waited:?}")]
    Timeout {
        /// The model.
        model: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The call can never get a permit (too large, or the global budget is spent):
    /// do not retry it.
    #[error("rate limiter refused {model}: {message}")]
    Refused {
        /// The model.
        model: String,
        /// Why.
        code: AcquireRefusal,
        /// Detail.
        message: String,
    },
    /// The limiter could not read the request (`code` from the closed set): a bug or
    /// a version skew between this process and the leader; do not retry it.
    #[error("rate limiter rejected the request for {model} ({code}): {message}")]
    Rejected {
        /// The model.
        model: String,
        /// Why.
        code: flotilla_protocol::ErrorCode,
        /// Detail.
        message: String,
    },
}

/// A granted permit: settle it after the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// The model.
    pub model: String,
    /// Permit id.
    pub id: String,
    /// Grant time on the leader.
    pub granted_ms: u64,
    /// Tokens reserved.
    pub reserved: u64,
    /// How long the caller waited for it.
    pub waited: Duration,
}

/// Rate-limit counters of one process (read by benches and summaries).
#[derive(Debug)]
pub struct LimitStats {
    /// Permits granted (`flotilla_rate_limit_permits_total`).
    pub granted: Count,
    /// Permits that had to wait (`flotilla_rate_limit_waits_total`; how long, in
    /// `flotilla_rate_limit_wait_seconds`).
    pub waited: Count,
    /// Total wait, microseconds.
    pub wait_us: AtomicU64,
    /// 429s that still happened (`flotilla_llm_rate_limited_total`).
    pub http_429: Count,
    /// Acquires that timed out (`flotilla_rate_limit_timeouts_total`).
    pub timeouts: Count,
    waits: std::sync::Mutex<Vec<u64>>,
}

impl Default for LimitStats {
    fn default() -> Self {
        Self {
            granted: Count::new("flotilla_rate_limit_permits_total"),
            waited: Count::new("flotilla_rate_limit_waits_total"),
            wait_us: AtomicU64::new(0),
            http_429: Count::new("flotilla_llm_rate_limited_total"),
            timeouts: Count::new("flotilla_rate_limit_timeouts_total"),
            waits: std::sync::Mutex::default(),
        }
    }
}

impl LimitStats {
    fn record_wait(&self, waited: Duration) {
        let us = waited.as_micros() as u64;
        self.granted.increment();
        self.wait_us.fetch_add(us, Ordering::Relaxed);
        if waited >= Duration::from_millis(1) {
            self.waited.increment();
            metrics::histogram!("flotilla_rate_limit_wait_seconds").record(waited.as_secs_f64());
        }
        let mut w = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a bench's percentiles come from the first million permits.
        if w.len() < 1_000_000 {
            w.push(us);
        }
    }

    /// Every recorded permit wait, in microseconds.
    pub fn waits_us(&self) -> Vec<u64> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Asks the limiter leader for permits.
#[derive(Clone)]
pub struct LimiterClient {
    bus: Bus,
    config: Arc<LimitsConfig>,
    stats: Arc<LimitStats>,
}

impl std::fmt::Debug for LimiterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimiterClient").finish_non_exhaustive()
    }
}

/// How long one acquire request waits for the leader before asking again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

impl LimiterClient {
    /// A client over `bus`.
    pub fn new(bus: Bus, config: LimitsConfig) -> Self {
        Self {
            bus,
            config: Arc::new(config),
            stats: Arc::default(),
        }
    }

    /// This process's counters.
    pub fn stats(&self) -> Arc<LimitStats> {
        self.stats.clone()
    }

    /// True if calls to `model` go through the limiter.
    pub fn limits(&self, model: &str) -> bool {
        self.config.enabled
            && (self.config.models.contains_key(model) || self.config.global_token_budget > 0)
    }

    /// Waits for a permit for `tokens` on `model`, up to the configured hard timeout.
    /// While there is no leader (a failover), keeps asking until the timeout.
    pub async fn acquire(&self, model: &str, tokens: u64) -> Result<Permit, LimitError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.acquire_timeout;
        let body = Bytes::from(
            serde_json::to_vec(&AcquireRequest {
                v: V1,
                model: model.to_owned(),
                tokens,
            })
            .unwrap_or_default(),
        );
        let subject = self.bus.names().limits_acquire();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let reply = self
                .bus
                .request(subject.clone(), None, body.clone(), REQUEST_TIMEOUT)
                .await;
            let pause = match reply {
                Ok(msg) => match serde_json::from_slice::<AcquireReply>(&msg.payload) {
                    Ok(AcquireReply::Granted {
                        permit, granted_ms, ..
                    }) => {
                        let waited = started.elapsed();
                        self.stats.record_wait(waited);
                        return Ok(Permit {
                            model: model.to_owned(),
                            id: permit,
                            granted_ms,
                            reserved: tokens,
                            waited,
                        });
                    }
                    Ok(AcquireReply::Wait { retry_after_ms, .. }) => {
                        Duration::from_millis(retry_after_ms.max(1))
                    }
                    Ok(AcquireReply::Refused { code, message, .. }) => {
                        return Err(LimitError::Refused {
                            model: model.to_owned(),
                            code,
                            message,
                        });
                    }
                    // Our own request was unreadable: a bug or a version skew, and
                    // asking again would not help.
                    Ok(AcquireReply::Error { code, message, .. }) => {
                        return Err(LimitError::Rejected {
                            model: model.to_owned(),
                            code,
                            message,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable limiter reply");
                        Duration::from_millis(100)
                    }
                },
                // No responders (no leader yet) or a timeout: ask again shortly.
                Err(_) => Duration::from_millis(50 * u64::from(attempt.min(10))),
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.stats.timeouts.increment();
                return Err(LimitError::Timeout {
                    model: model.to_owned(),
                    waited: started.elapsed(),
                });
            }
            // Jitter spreads callers told the same retry time.
            let jitter = Duration::from_micros(u64::from(nuid_jitter()) % 2000);
            tokio::time::sleep((pause + jitter).min(deadline - now)).await;
        }
    }

    /// Settles `permit` with the tokens used; `rate_limited` when the provider still
    /// answered 429. Best effort: a lost settlement leaves the reservation standing,
    /// which errs on the safe side.
    pub async fn settle(&self, permit: &Permit, used: u64, rate_limited: Option<Duration>) {
        if rate_limited.is_some() {
            self.stats.http_429.increment();
        }
        let body = SettleRequest {
            v: V1,
            model: permit.model.clone(),
            permit: permit.id.clone(),
            granted_ms: permit.granted_ms,
            reserved: permit.reserved,
            used,
            rate_limited_ms: rate_limited.map(|d| d.as_millis() as u64),
        };
        let payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        // The leader settles a permit once, so asking again is safe.
        for attempt in 1..=3u32 {
            let res = self
                .bus
                .request(
                    self.bus.names().limits_settle(),
                    None,
                    payload.clone(),
                    REQUEST_TIMEOUT,
                )
                .await;
            if res.is_ok() {
                return;
            }
            tokio::time::sleep(
                flotilla_protocol::Backoff::exponential(
                    Duration::from_millis(100),
                    Duration::from_secs(1),
                )
                .delay(attempt - 1),
            )
            .await;
        }
        tracing::warn!(permit = %permit.id, "settlement not confirmed; its reservation stands until the leader expires it");
    }
}

/// A cheap, non-cryptographic jitter source.
fn nuid_jitter() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// An [`LlmClient`] whose calls go through the fleet rate limiter.
#[derive(Clone)]
pub struct LimitedLlm {
    inner: Arc<dyn LlmClient>,
    limiter: LimiterClient,
}

impl std::fmt::Debug for LimitedLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedLlm").finish_non_exhaustive()
    }
}

impl LimitedLlm {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn LlmClient>, limiter: LimiterClient) -> Self {
        Self { inner, limiter }
    }

    /// `inner` bounded to `max_in_flight` calls at once, and behind the fleet limiter
    /// when `config` limits anything. One per process (or per component of an
    /// in-process fleet).
    pub fn wrap(inner: Arc<dyn LlmClient>, bus: &Bus, config: &LimitsConfig) -> Arc<dyn LlmClient> {
        let inner: Arc<dyn LlmClient> = Arc::new(flotilla_llm::InFlightLimit::new(
            inner,
            config.max_in_flight,
        ));
        if config.enabled && (!config.models.is_empty() || config.global_token_budget > 0) {
            Arc::new(Self::new(
                inner,
                LimiterClient::new(bus.clone(), config.clone()),
            ))
        } else {
            inner
        }
    }

    async fn call(&self, request: &CompletionRequest) -> Result<Completion, LlmError> {
        if !self.limiter.limits(&request.model) {
            return self.inner.complete(request).await;
        }
        let estimate = u64::from(flotilla_llm::estimate_request_tokens(request));
        let mut retries = 0;
        loop {
            let span = tracing::info_span!(
                "rate_limit",
                model = %request.model,
                tokens = estimate,
                waited_ms = tracing::field::Empty,
            );
            let permit = self
                .limiter
                .acquire(&request.model, estimate)
                .instrument(span.clone())
                .await
                .inspect(|p| {
                    span.record("waited_ms", p.waited.as_millis() as u64);
                })
                .map_err(|e| match e {
                    LimitError::Timeout { .. } => LlmError::RateLimited { retry_after: None },
                    LimitError::Refused {
                        code: AcquireRefusal::GlobalBudget,
                        message,
                        ..
                    } => LlmError::OverBudget(message),
                    LimitError::Refused { .. } | LimitError::Rejected { .. } => {
                        LlmError::Refused(e.to_string())
                    }
                })?;
            if permit.waited >= Duration::from_millis(1) {
                crate::budget::SpendMeter::record_wait(permit.waited);
                tracing::debug!(model = %request.model, waited_ms = permit.waited.as_millis() as u64, "rate-limit wait");
            }
            match self.inner.complete(request).await {
                Ok(c) => {
                    self.limiter
                        .settle(&permit, u64::from(c.usage.total()), None)
                        .await;
                    return Ok(c);
                }
                Err(LlmError::RateLimited { retry_after }) => {
                    let wait = retry_after.unwrap_or(Duration::from_secs(1));
                    self.limiter.settle(&permit, 0, Some(wait)).await;
                    retries += 1;
                    if retries > self.limiter.config.max_429_retries {
                        return Err(LlmError::RateLimited { retry_after });
                    }
                    tracing::warn!(model = %request.model, wait_ms = wait.as_millis() as u64, "provider answered 429 despite a permit");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    // The provider may have counted the prompt: keep that much.
                    let prompt =
                        estimate.saturating_sub(u64::from(request.max_tokens.unwrap_or(0)));
                    self.limiter.settle(&permit, prompt, None).await;
                    return Err(e);
                }
            }
        }
    }
}

impl LlmClient for LimitedLlm {
    fn complete<'a>(&'a self, request: &'a CompletionRequest) -> LlmFuture<'a> {
        Box::pin(self.call(request))
    }
}

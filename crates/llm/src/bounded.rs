//! Wrappers that every process puts around its provider: [`InFlightLimit`] bounds the
//! calls one process has in flight (a memory bound: a call waiting on the provider holds
//! its request and nothing else), and counts the calls made.
//!
//! The provider's real limit (requests and tokens per minute) is the fleet rate
//! limiter's; this bound only keeps one process from holding more calls than its memory
//! allows. Handler concurrency is not the bound: a handler waiting on an LLM call holds
//! no scarce slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::client::{CompletionRequest, LlmClient, LlmFuture};

/// Calls made through an [`InFlightLimit`] (shared by its clones and siblings).
#[derive(Debug, Default)]
pub struct CallCounter {
    started: AtomicU64,
    waited: AtomicU64,
}

impl CallCounter {
    /// Calls started.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Calls that had to wait for a free place.
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }
}

/// At most `max` calls of one process in flight; the rest wait their turn.
#[derive(Clone)]
pub struct InFlightLimit {
    inner: Arc<dyn LlmClient>,
    places: Arc<Semaphore>,
    max: usize,
    counter: Arc<CallCounter>,
    /// Whether each call is a `chat` span (off for a counter wrapped by another bound).
    span: bool,
}

impl std::fmt::Debug for InFlightLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightLimit")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl InFlightLimit {
    /// `inner` with at most `max` calls in flight (at least 1).
    pub fn new(inner: Arc<dyn LlmClient>, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            inner,
            places: Arc::new(Semaphore::new(max)),
            max,
            counter: Arc::default(),
            span: true,
        }
    }

    /// Only counts the calls of `inner` (no bound, no span): the load generator's view
    /// of a whole in-process fleet, whose components each put their own bound (and
    /// span) around it.
    pub fn counting(inner: Arc<dyn LlmClient>) -> Self {
        Self {
            span: false,
            ..Self::new(inner, Semaphore::MAX_PERMITS)
        }
    }

    /// The same provider with its own bound of the same size, counting into the same
    /// counter: one per component when several "processes" share an OS process (the
    /// in-process fleet of `demo` and `bench`).
    pub fn sibling(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            places: Arc::new(Semaphore::new(self.max)),
            max: self.max,
            counter: self.counter.clone(),
            span: self.span,
        }
    }

    /// The calls counted so far.
    pub fn counter(&self) -> Arc<CallCounter> {
        self.counter.clone()
    }
}

impl LlmClient for InFlightLimit {
    fn complete<'a>(&'a self, request: &'a CompletionRequest) -> LlmFuture<'a> {
        Box::pin(async move {
            let place = match self.places.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    self.counter.waited.fetch_add(1, Ordering::Relaxed);
                    // (Boxed: a wait for a place is rare, and inline it would size
                    // this future, which every call holds through its wait.)
                    Box::pin(self.places.clone().acquire_owned())
                        .await
                        .map_err(|_| {
                            crate::LlmError::Unavailable("the in-flight limit was closed".into())
                        })?
                }
            };
            self.counter.started.fetch_add(1, Ordering::Relaxed);
            if !self.span {
                let out = self.inner.complete(request).await;
                drop(place);
                return out;
            }
            // The call's span, with OpenTelemetry's GenAI attributes.
            let span = tracing::info_span!(
                "chat",
                otel.name = format!("chat {}", request.model),
                otel.kind = "client",
                gen_ai.operation.name = "chat",
                gen_ai.request.model = %request.model,
                gen_ai.request.max_tokens = request.max_tokens,
                gen_ai.usage.input_tokens = tracing::field::Empty,
                gen_ai.usage.output_tokens = tracing::field::Empty,
                error.type = tracing::field::Empty,
            );
            // Pinned in place and its span read back from it after the call, rather than
            // a second copy of the span held beside it through the call.
            let call = self.inner.complete(request).instrument(span);
            tokio::pin!(call);
            let out = call.as_mut().await;
            let span = call.span();
            match &out {
                Ok(c) => {
                    span.record("gen_ai.usage.input_tokens", c.usage.prompt_tokens);
                    span.record("gen_ai.usage.output_tokens", c.usage.completion_tokens);
                }
                Err(e) => {
                    span.record("error.type", e.kind());
                }
            }
            drop(place);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SimConfig, SimulatedProvider};

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_bound_wait_and_every_call_is_counted() {
        let sim: Arc<dyn LlmClient> = Arc::new(SimulatedProvider::new(SimConfig {
            latency_ms: 1000,
            jitter: 0.0,
            ..SimConfig::default()
        }));
        let limit = Arc::new(InFlightLimit::new(sim, 2));
        let req = CompletionRequest {
            model: "m".into(),
            messages: vec![crate::ChatMessage::user("hello")],
            response_format: None,
            max_tokens: Some(10),
        };
        let started = tokio::time::Instant::now();
        let calls = (0..4).map(|_| {
            let (l, r) = (limit.clone(), req.clone());
            tokio::spawn(async move { l.complete(&r).await.map(|_| ()) })
        });
        let calls: Vec<_> = calls.collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        // Two rounds of two calls.
        assert_eq!(started.elapsed().as_millis() / 100, 20);
        assert_eq!(limit.counter().started(), 4);
        assert_eq!(limit.counter().waited(), 2);
    }
}

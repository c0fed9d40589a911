//! Budgets that stop runaway work: their configuration, the per-session token
//! [`SessionLedger`] (a server-side counter: reserve before a call, settle after, so
//! spend overshoots by at most one call; used once a session's attempts no longer fit
//! on allowances, see [`crate::Allowance`]), the [`SpendMeter`] an attempt's calls are
//! counted in, and the [`CallFingerprints`] circuit breaker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_bus::Bus;
use flotilla_protocol::{BudgetKind, Ledger, SessionId, Spend, V1};
use serde::{Deserialize, Serialize};

/// Retries of a ledger increment (the server may be briefly away).
const LEDGER_BACKOFF: flotilla_protocol::Backoff =
    flotilla_protocol::Backoff::exponential(Duration::from_millis(50), Duration::from_millis(800));

/// Budget settings. Every process of a fleet should share them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Most tokens one call may use (prompt + completion ceiling).
    pub call_tokens: u64,
    /// Most tokens one agent task attempt may use over all its turns.
    pub task_tokens: u64,
    /// Most tokens one session may use (orchestrator and agents); 0: no session budget.
    /// Attempts run on allowances of it (see [`flotilla_protocol::TokenAccount`]) while
    /// their worst case fits, and on the [`SessionLedger`] past that.
    pub session_tokens: u64,
    /// Most turns (LLM calls) one agent task attempt may take.
    pub max_turns: u32,
    /// Clarification exchanges per session; after them the orchestrator commits to its
    /// best interpretation and agents may not ask again.
    pub clarifications: u32,
    /// The circuit breaker opens when an agent makes the same call this many times.
    pub circuit_repeats: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            call_tokens: 8_192,
            task_tokens: 50_000,
            session_tokens: 250_000,
            max_turns: 8,
            clarifications: 6,
            circuit_repeats: 3,
        }
    }
}

/// A budget stopped the work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("budget {budget} exhausted: {reason}")]
pub struct Exhausted {
    /// Which budget.
    pub budget: BudgetKind,
    /// Detail: limit and spend.
    pub reason: String,
}

/// A session's token ledger could not be read or written: retry later.
#[derive(Debug, thiserror::Error)]
#[error("session ledger unavailable: {0}")]
pub struct LedgerUnavailable(pub String);

/// How long a call waits for calls in flight to settle before their reservations
/// count as spent.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(120);

/// The counter holds `used << SHIFT | reserved`: both parts move in one increment.
const SHIFT: u32 = 40;
const RESERVED_MASK: i128 = (1 << SHIFT) - 1;

/// Header naming the tokens a settled call used (for `largest_call` when the ledger is
/// read back).
const CALL_TOKENS: &str = "Flotilla-Call-Tokens";

/// Tokens held for a call in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    session: SessionId,
    tokens: u64,
}

/// The per-session token ledger: one JetStream counter per session, `<p>.spend.s.<sid>`
/// in the `<P>_SPEND` stream (server-side `Nats-Incr`, server 2.12+). Its value is
/// `used << 40 | reserved`, so a reservation is one increment (`+tokens`) whose answer
/// says what was used and reserved before it, and a settlement is one increment
/// (`used << 40 - tokens`): two messages per call, no read, no compare-and-set conflicts
/// between a session's concurrent calls. Every increment carries a message id, so a
/// retried one is not counted twice.
#[derive(Debug, Clone)]
pub struct SessionLedger {
    bus: Bus,
}

fn split(total: i128) -> (u64, u64) {
    let used = (total >> SHIFT).max(0) as u64;
    let reserved = (total & RESERVED_MASK).max(0) as u64;
    (used, reserved)
}

fn counter_value(payload: &[u8]) -> Option<i128> {
    #[derive(serde::Deserialize)]
    struct Val {
        val: String,
    }
    serde_json::from_slice::<Val>(payload)
        .ok()
        .and_then(|v| v.val.parse().ok())
}

impl SessionLedger {
    /// The ledger over `bus`.
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    /// Adds `delta` to the session's counter; returns the new total.
    async fn incr(
        &self,
        session: &SessionId,
        delta: i128,
        call_tokens: Option<u64>,
    ) -> Result<i128, LedgerUnavailable> {
        let id = format!("{session}.spend.{:016x}", flotilla_bus::trace::random_u64());
        self.incr_with_id(session, delta, call_tokens, &id).await
    }

    /// Charges `tokens` as used: a session's token account moving to the ledger (see
    /// [`flotilla_protocol::TokenAccount`]). One increment with message id
    /// `<sid>.spend.seed`, so a repeated seed is not counted twice.
    pub async fn seed(&self, session: &SessionId, tokens: u64) -> Result<(), LedgerUnavailable> {
        let id = format!("{session}.spend.seed");
        self.incr_with_id(session, i128::from(tokens) << SHIFT, None, &id)
            .await
            .map(|_| ())
    }

    async fn incr_with_id(
        &self,
        session: &SessionId,
        delta: i128,
        call_tokens: Option<u64>,
        msg_id: &str,
    ) -> Result<i128, LedgerUnavailable> {
        let subject = self.bus.names().spend(session);
        let mut h = async_nats::HeaderMap::new();
        h.insert(flotilla_protocol::headers::MSG_ID, msg_id);
        if let Some(t) = call_tokens {
            h.insert(CALL_TOKENS, t.to_string().as_str());
        }
        let mut last = String::new();
        for attempt in 0..5u32 {
            match self.bus.counter_add(&subject, delta, h.clone()).await {
                Ok(Some(v)) => return Ok(v),
                // A repeat the server recognized (its first copy was counted): the
                // current total is the answer.
                Ok(None) => return self.total(session).await,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(LEDGER_BACKOFF.delay(attempt)).await;
        }
        Err(LedgerUnavailable(last))
    }

    /// The ledgers' stream (not looked up: no request).
    async fn stream(&self) -> Result<flotilla_bus::StreamHandle, LedgerUnavailable> {
        self.bus
            .stream_unchecked(&self.bus.names().stream_spend())
            .await
            .map_err(|e| LedgerUnavailable(e.to_string()))
    }

    /// The counter's current value (0 if the session has none yet).
    async fn total(&self, session: &SessionId) -> Result<i128, LedgerUnavailable> {
        let names = self.bus.names();
        let stream = self.stream().await?;
        match stream.last_message(&names.spend(session)).await {
            Ok(Some(m)) => counter_value(&m.payload)
                .ok_or_else(|| LedgerUnavailable("unreadable counter value".into())),
            Ok(None) => Ok(0),
            Err(e) => Err(LedgerUnavailable(e.to_string())),
        }
    }

    /// The session's spend so far (tokens used, and reserved by calls in flight), with
    /// the number of settled calls and the largest of them, read back from the
    /// counter's increments (for inspection; the hot path never reads the ledger).
    pub async fn read(&self, session: &SessionId) -> Result<Ledger, LedgerUnavailable> {
        let (tokens, reserved) = split(self.total(session).await?);
        let mut ledger = Ledger {
            v: V1,
            tokens,
            reserved,
            ..Ledger::default()
        };
        let names = self.bus.names();
        let stream = self.stream().await?;
        let mut msgs = stream
            .replay(&[names.spend(session)])
            .await
            .map_err(|e| LedgerUnavailable(e.to_string()))?;
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_millis(300), msgs.next()).await
        {
            if let Some(t) = m
                .headers
                .as_ref()
                .and_then(|h| h.get(CALL_TOKENS))
                .and_then(|v| v.as_str().parse::<u64>().ok())
            {
                ledger.calls += 1;
                ledger.largest_call = ledger.largest_call.max(t);
            }
            if m.info().map(|i| i.pending == 0).unwrap_or(true) {
                break;
            }
        }
        Ok(ledger)
    }

    /// Reserves `tokens` for a call while the session has budget left: admitted while
    /// used plus reserved tokens (before this one) are below `budget` (so the spend
    /// passes the budget by at most this one call), waiting while calls in flight may
    /// spend the rest, and refused once the used tokens alone reach it. One increment
    /// when admitted; a refused or waiting reservation is taken back with another.
    pub async fn reserve(
        &self,
        session: &SessionId,
        tokens: u64,
        budget: u64,
    ) -> Result<Result<Reservation, Exhausted>, LedgerUnavailable> {
        let tokens = tokens.min(RESERVED_MASK as u64);
        let deadline = tokio::time::Instant::now() + IN_FLIGHT_WAIT;
        loop {
            let (used, reserved) = split(self.incr(session, i128::from(tokens), None).await?);
            let before = reserved.saturating_sub(tokens);
            if used < budget && used + before < budget {
                return Ok(Ok(Reservation {
                    session: session.clone(),
                    tokens,
                }));
            }
            // Not admitted: take the reservation back.
            self.incr(session, -i128::from(tokens), None).await?;
            if used >= budget {
                return Ok(Err(Exhausted {
                    budget: BudgetKind::SessionTokens,
                    reason: format!("session spent {used} of {budget} tokens"),
                }));
            }
            // Calls in flight may spend the rest: see what they use. A reservation that
            // is never settled (its process died mid-call) counts as spent once the
            // wait is over.
            if tokio::time::Instant::now() >= deadline {
                return Ok(Err(Exhausted {
                    budget: BudgetKind::SessionTokens,
                    reason: format!(
                        "session spent {used} of {budget} tokens, and calls in flight hold {before} more"
                    ),
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces a reservation with the tokens the call really used: one increment.
    pub async fn settle(&self, r: Reservation, used: u64) -> Result<(), LedgerUnavailable> {
        let delta = (i128::from(used) << SHIFT) - i128::from(r.tokens);
        self.incr(&r.session, delta, Some(used)).await.map(|_| ())
    }
}

/// Counts one attempt's calls, tokens and rate-limit waits. Rate-limited clients
/// record their waits into the meter of the attempt they run in (see [`SpendMeter::scope`]).
#[derive(Debug, Clone, Default)]
pub struct SpendMeter(Arc<Mutex<Spend>>);

tokio::task_local! {
    static METER: SpendMeter;
}

impl SpendMeter {
    fn with<R>(&self, f: impl FnOnce(&mut Spend) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Counts a call of `tokens`.
    pub fn add_call(&self, tokens: u64) {
        self.with(|s| s.add_call(tokens));
    }

    /// The spend so far.
    pub fn spend(&self) -> Spend {
        self.with(|s| *s)
    }

    /// Runs `fut` with this meter as the current attempt's. (Tokio's scope future
    /// itself, not an `async fn` around it: a task holds it through its model call.)
    pub fn scope<F: std::future::Future>(
        self,
        fut: F,
    ) -> impl std::future::Future<Output = F::Output> {
        METER.scope(self, fut)
    }

    /// Records a rate-limit wait in the current attempt's meter, if any.
    pub fn record_wait(waited: Duration) {
        let _ = METER.try_with(|m| {
            m.with(|s| {
                s.rate_limit_waits += 1;
                s.rate_limit_wait_ms += waited.as_millis() as u64;
            })
        });
    }
}

/// The circuit breaker's memory of one attempt's calls: each distinct call's
/// fingerprint and count, in a list (an attempt makes a few dozen calls at most, and
/// every task keeps this through its model calls: a list is 24 bytes where a hash map
/// is 48).
#[derive(Debug, Default)]
pub struct CallFingerprints {
    seen: Vec<(u64, u32)>,
}

impl CallFingerprints {
    /// Counts a call; `Err` once the same call has been made `repeats` times.
    pub fn observe(&mut self, call: &str, repeats: u32) -> Result<(), Exhausted> {
        let fp = fingerprint(call);
        let i = match self.seen.iter().position(|(f, _)| *f == fp) {
            Some(i) => i,
            None => {
                self.seen.push((fp, 0));
                self.seen.len() - 1
            }
        };
        let n = &mut self.seen[i].1;
        *n += 1;
        if *n >= repeats.max(2) {
            return Err(Exhausted {
                budget: BudgetKind::CircuitBreaker,
                reason: format!("the same call (fingerprint {fp:016x}) was made {n} times"),
            });
        }
        Ok(())
    }
}

/// FNV-1a of a call's canonical text.
pub fn fingerprint(call: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in call.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_circuit_opens_on_the_nth_identical_call() {
        let mut f = CallFingerprints::default();
        assert!(f.observe("search {\"q\":\"x\"}", 3).is_ok());
        assert!(f.observe("search {\"q\":\"y\"}", 3).is_ok());
        assert!(f.observe("search {\"q\":\"x\"}", 3).is_ok());
        let e = f.observe("search {\"q\":\"x\"}", 3).unwrap_err();
        assert_eq!(e.budget, BudgetKind::CircuitBreaker);
        assert!(e.reason.contains("3 times"), "{}", e.reason);
    }

    #[tokio::test]
    async fn waits_are_recorded_in_the_scoped_meter_only() {
        let m = SpendMeter::default();
        SpendMeter::record_wait(Duration::from_millis(5)); // no scope: dropped
        m.clone()
            .scope(async {
                SpendMeter::record_wait(Duration::from_millis(30));
            })
            .await;
        let s = m.spend();
        assert_eq!((s.rate_limit_waits, s.rate_limit_wait_ms), (1, 30));
    }
}

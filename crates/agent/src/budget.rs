//! Budgets that stop runaway work: their configuration, the per-session token
//! [`SessionLedger`] (reserve before a call, settle after, so spend overshoots by at
//! most one call), the [`SpendMeter`] an attempt's calls are counted in, and the
//! [`CallFingerprints`] circuit breaker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_bus::{Bus, KvError};
use flotilla_protocol::{BudgetKind, Ledger, SessionId, Spend, V1};
use serde::{Deserialize, Serialize};

/// Budget settings. Every process of a fleet should share them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Most tokens one call may use (prompt + completion ceiling).
    pub call_tokens: u64,
    /// Most tokens one agent task attempt may use over all its turns.
    pub task_tokens: u64,
    /// Most tokens one session may use (orchestrator and agents); 0: no session budget
    /// (and no ledger round trips).
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
pub struct LedgerUnavailable(#[from] pub KvError);

/// How long a call waits for calls in flight to settle before their reservations
/// count as spent.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(120);

/// Tokens held for a call in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    session: SessionId,
    tokens: u64,
    /// The ledger as the reservation wrote it, to settle without reading it again when
    /// nobody else wrote since.
    written: Option<(Ledger, u64)>,
}

/// The per-session token ledger in the `<p>-limits` bucket (`spend.s.<sid>`).
#[derive(Debug, Clone)]
pub struct SessionLedger {
    bus: Bus,
}

fn ledger_key(session: &SessionId) -> String {
    format!("spend.s.{session}")
}

impl SessionLedger {
    /// The ledger over `bus`.
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    /// The session's spend so far (tokens used, and reserved by calls in flight).
    pub async fn read(&self, session: &SessionId) -> Result<Ledger, LedgerUnavailable> {
        Ok(self
            .bus
            .limits()
            .get::<Ledger>(&ledger_key(session))
            .await?
            .map(|(l, _)| l)
            .unwrap_or_default())
    }

    /// Reserves `tokens` for a call while the session has budget left: admitted while
    /// used plus reserved tokens are below `budget` (so the spend passes the budget by
    /// at most this one call), waiting while calls in flight may spend the rest, and
    /// refused once the used tokens alone reach it.
    pub async fn reserve(
        &self,
        session: &SessionId,
        tokens: u64,
        budget: u64,
    ) -> Result<Result<Reservation, Exhausted>, LedgerUnavailable> {
        let key = ledger_key(session);
        let records = self.bus.limits();
        let deadline = tokio::time::Instant::now() + IN_FLIGHT_WAIT;
        loop {
            let current = records.get::<Ledger>(&key).await?;
            let mut ledger = current.as_ref().map(|(l, _)| l.clone()).unwrap_or(Ledger {
                v: V1,
                ..Ledger::default()
            });
            if ledger.tokens >= budget {
                return Ok(Err(Exhausted {
                    budget: BudgetKind::SessionTokens,
                    reason: format!(
                        "session spent {} of {budget} tokens in {} calls",
                        ledger.tokens, ledger.calls
                    ),
                }));
            }
            if ledger.tokens + ledger.reserved >= budget {
                // Calls in flight may spend the rest: see what they used. A reservation
                // that is never settled (its process died mid-call) counts as spent
                // once the wait is over.
                if tokio::time::Instant::now() >= deadline {
                    return Ok(Err(Exhausted {
                        budget: BudgetKind::SessionTokens,
                        reason: format!(
                            "session spent {} of {budget} tokens, and calls in flight hold {} more",
                            ledger.tokens, ledger.reserved
                        ),
                    }));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            ledger.reserved += tokens;
            ledger.calls += 1;
            let res = match current {
                Some((_, rev)) => records.update(&key, &ledger, rev).await,
                None => records.create(&key, &ledger).await,
            };
            match res {
                Ok(rev) => {
                    return Ok(Ok(Reservation {
                        session: session.clone(),
                        tokens,
                        written: Some((ledger, rev)),
                    }));
                }
                Err(KvError::Conflict { .. } | KvError::Exists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Replaces a reservation with the tokens the call really used.
    pub async fn settle(&self, r: Reservation, used: u64) -> Result<(), LedgerUnavailable> {
        let key = ledger_key(&r.session);
        let records = self.bus.limits();
        // First try on the ledger as the reservation left it (one round trip when no
        // other call of the session wrote since), then re-read on conflict.
        let mut known = r.written.clone();
        loop {
            let current = match known.take() {
                Some(k) => Some(k),
                None => records.get::<Ledger>(&key).await?,
            };
            let Some((mut ledger, rev)) = current else {
                return Ok(());
            };
            ledger.reserved = ledger.reserved.saturating_sub(r.tokens);
            ledger.tokens += used;
            ledger.largest_call = ledger.largest_call.max(used);
            match records.update(&key, &ledger, rev).await {
                Ok(_) => return Ok(()),
                Err(KvError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
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

    /// Runs `fut` with this meter as the current attempt's.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        METER.scope(self, fut).await
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

/// The circuit breaker's memory of one attempt's calls.
#[derive(Debug, Default)]
pub struct CallFingerprints {
    seen: HashMap<u64, u32>,
}

impl CallFingerprints {
    /// Counts a call; `Err` once the same call has been made `repeats` times.
    pub fn observe(&mut self, call: &str, repeats: u32) -> Result<(), Exhausted> {
        let fp = fingerprint(call);
        let n = self.seen.entry(fp).or_default();
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

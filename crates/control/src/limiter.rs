//! The fleet rate limiter's leader: one `serve` at a time holds a lease in the
//! `<p>-limits` bucket (per-key TTL) and serves the `<p>-limits` micro service
//! (`<p>.limits.acquire`, `<p>.limits.settle`). The others watch the lease and take
//! over when it expires.
//!
//! Limits are sliding windows of requests and tokens per model ([`RateWindow`], pure
//! and clock-driven), kept below the provider's limits by a safety margin. The leader
//! writes each window to the bucket a few times a second; a new leader starts from the
//! last snapshot and assumes the old leader granted everything it could after it, so a
//! failover never lets the fleet exceed a limit.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use bytes::Bytes;
use flotilla_agent::{LimitsConfig, ModelLimits};
use flotilla_bus::Bus;
use flotilla_protocol::{
    AcquireRefusal, AcquireReply, AcquireRequest, Ledger, LimiterLease, SettleRequest, V1,
    WindowSnapshot, epoch_ms,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Why a permit cannot be granted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Ask again after this many milliseconds.
    Wait(u64),
    /// Never (the call alone exceeds the window's token budget).
    TooLarge,
}

/// Slots per window: grants are accounted in `window / SLOTS` buckets, each counted
/// until its end plus the window (conservative by at most one slot).
const SLOTS: u64 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    start: u64,
    requests: u64,
    tokens: u64,
}

/// A sliding window of grants for one model. Pure: every method takes `now` in ms.
///
/// A grant counts from its slot until the slot's end plus the window plus a skew
/// allowance (a fiftieth of the window, at most 1 s): the provider starts counting a
/// call when it arrives, a little after the grant, so without the allowance a burst
/// granted as the previous burst leaves the window would overlap it at the provider.
#[derive(Debug, Clone)]
pub struct RateWindow {
    window_ms: u64,
    slot_ms: u64,
    skew_ms: u64,
    limits: ModelLimits,
    margin: f64,
    /// 1.0 normally; lowered by 10% per 429 (floor 0.5) and restored after a clean
    /// window.
    factor: f64,
    last_429_ms: u64,
    slots: VecDeque<Slot>,
    requests: u64,
    tokens: u64,
    paused_until_ms: u64,
}

impl RateWindow {
    /// A window enforcing `limits` less `margin` over `window`.
    pub fn new(limits: ModelLimits, window: Duration, margin: f64) -> Self {
        let window_ms = (window.as_millis() as u64).max(1);
        let slot_ms = (window_ms / SLOTS).max(1);
        Self {
            window_ms,
            slot_ms,
            skew_ms: (window_ms / 50).clamp(slot_ms, 1_000),
            limits,
            margin: margin.clamp(0.0, 0.9),
            factor: 1.0,
            last_429_ms: 0,
            slots: VecDeque::new(),
            requests: 0,
            tokens: 0,
            paused_until_ms: 0,
        }
    }

    fn cap(&self, limit: u64) -> u64 {
        ((limit as f64) * (1.0 - self.margin) * self.factor)
            .floor()
            .max(1.0) as u64
    }

    /// Requests allowed in any window.
    pub fn max_requests(&self) -> u64 {
        self.cap(self.limits.rpm)
    }

    /// Tokens allowed in any window.
    pub fn max_tokens(&self) -> u64 {
        self.cap(self.limits.tpm)
    }

    /// Requests and tokens counted in the window at `now`.
    pub fn used(&mut self, now: u64) -> (u64, u64) {
        self.expire(now);
        (self.requests, self.tokens)
    }

    fn expiry(&self, s: &Slot) -> u64 {
        s.start + self.slot_ms + self.window_ms + self.skew_ms
    }

    fn expire(&mut self, now: u64) {
        while let Some(s) = self.slots.front() {
            if self.expiry(s) > now {
                break;
            }
            self.requests -= s.requests;
            self.tokens -= s.tokens;
            self.slots.pop_front();
        }
        if self.factor < 1.0 && now.saturating_sub(self.last_429_ms) > self.window_ms {
            self.factor = 1.0;
        }
    }

    fn add(&mut self, start: u64, requests: u64, tokens: u64) {
        self.requests += requests;
        self.tokens += tokens;
        match self.slots.iter_mut().rev().find(|s| s.start == start) {
            Some(s) => {
                s.requests += requests;
                s.tokens += tokens;
            }
            None => {
                let at = self
                    .slots
                    .iter()
                    .rposition(|s| s.start < start)
                    .map_or(0, |i| i + 1);
                self.slots.insert(
                    at,
                    Slot {
                        start,
                        requests,
                        tokens,
                    },
                );
            }
        }
    }

    /// Grants one request reserving `tokens` at `now`, returning the grant's slot time
    /// (settle with it), or says how long to wait.
    pub fn try_acquire(&mut self, now: u64, tokens: u64) -> Result<u64, Denied> {
        self.expire(now);
        let (max_r, max_t) = (self.max_requests(), self.max_tokens());
        let never = ((self.limits.tpm as f64) * (1.0 - self.margin)).floor() as u64;
        if tokens > never.max(1) {
            return Err(Denied::TooLarge);
        }
        if self.paused_until_ms > now {
            return Err(Denied::Wait(self.paused_until_ms - now));
        }
        if self.requests < max_r && self.tokens + tokens <= max_t {
            let start = now - now % self.slot_ms;
            self.add(start, 1, tokens);
            return Ok(start);
        }
        // The earliest time enough old grants have expired.
        let (mut r, mut t) = (self.requests, self.tokens);
        for s in &self.slots {
            r -= s.requests;
            t -= s.tokens;
            if r < max_r && t + tokens <= max_t {
                return Err(Denied::Wait(self.expiry(s).saturating_sub(now).max(1)));
            }
        }
        Err(Denied::Wait(self.slot_ms.max(1)))
    }

    /// Settles a grant made at `granted_ms` that reserved `reserved` and used `used`.
    pub fn settle(&mut self, now: u64, granted_ms: u64, reserved: u64, used: u64) {
        self.expire(now);
        // From the back: settlements are for recent grants.
        let slot = self.slots.iter_mut().rev().find(|s| s.start == granted_ms);
        match slot {
            Some(s) => {
                // Never below zero: a slot may hold another term's phantom reservation.
                let new = (s.tokens + used).saturating_sub(reserved);
                self.tokens = self.tokens + new - s.tokens;
                s.tokens = new;
            }
            None if granted_ms + self.slot_ms + self.window_ms + self.skew_ms > now && used > 0 => {
                // A grant this leader does not know (made by an earlier one): count
                // what it used.
                self.add(granted_ms - granted_ms % self.slot_ms, 0, used);
            }
            None => {}
        }
    }

    /// A 429 despite a permit: pause grants for `retry_after_ms` and shrink the
    /// window's capacity by 10% (down to half) until a clean window passes.
    pub fn penalize(&mut self, now: u64, retry_after_ms: u64) {
        self.paused_until_ms = self.paused_until_ms.max(now + retry_after_ms);
        self.factor = (self.factor * 0.9).max(0.5);
        self.last_429_ms = now;
    }

    /// The window as a snapshot.
    pub fn snapshot(&mut self, now: u64, global_tokens: u64) -> WindowSnapshot {
        self.expire(now);
        WindowSnapshot {
            v: V1,
            taken_ms: now,
            slots: self
                .slots
                .iter()
                .map(|s| [s.start, s.requests, s.tokens])
                .collect(),
            paused_until_ms: self.paused_until_ms,
            global_tokens,
        }
    }

    /// Restores a predecessor's snapshot, assuming it granted everything it could in
    /// the `gap_ms` after the snapshot was taken (it may have; we cannot know).
    pub fn restore(&mut self, snap: &WindowSnapshot, gap_ms: u64, now: u64) {
        for [start, requests, tokens] in &snap.slots {
            self.add(*start, *requests, *tokens);
        }
        self.paused_until_ms = self.paused_until_ms.max(snap.paused_until_ms);
        self.expire(now);
        let (max_r, max_t) = (self.max_requests(), self.max_tokens());
        let phantom_at = snap.taken_ms + gap_ms;
        let at = phantom_at - phantom_at % self.slot_ms;
        let (r, t) = (
            max_r.saturating_sub(self.requests),
            max_t.saturating_sub(self.tokens),
        );
        if at + self.slot_ms + self.window_ms + self.skew_ms > now && (r > 0 || t > 0) {
            self.add(at, r, t);
        }
    }
}

/// The limiter failed for good.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    /// The limits bucket cannot be opened: check the topology and NATS.
    #[error("cannot open the limits bucket: {0}")]
    Bucket(String),
}

/// How often the leader writes its windows.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);

/// The limiter of one `serve` process: campaigns, and leads while it holds the lease.
#[derive(Debug)]
pub struct Limiter {
    bus: Bus,
    config: LimitsConfig,
    holder: String,
}

fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

/// The KV key of a model's window snapshot: hex, since model names may hold characters
/// a key may not (`llama3:8b`).
pub fn window_key(model: &str) -> String {
    let hex: String = model.bytes().map(|b| format!("{b:02x}")).collect();
    format!("window.{hex}")
}

/// The lease key.
pub const LEASE_KEY: &str = "leader";

enum Outcome {
    Shutdown,
    Lost,
}

impl Limiter {
    /// A limiter over `bus`; `holder` names this process in the lease.
    pub fn new(bus: Bus, config: LimitsConfig, holder: impl Into<String>) -> Self {
        Self {
            bus,
            config,
            holder: holder.into(),
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.config.lease_ttl.as_secs().max(1))
    }

    /// Campaigns and leads until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), LimiterError> {
        let bucket = self.bus.names().bucket_limits();
        let store = self
            .bus
            .open_bucket(&bucket)
            .await
            .map_err(|e| LimiterError::Bucket(e.to_string()))?;
        // One watch of the lease for the whole run (a new one is made only if it ends).
        let mut watch = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Free when absent, deleted or expired (a purge marker).
            let free_after = match store.entry(LEASE_KEY).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => None,
                Ok(Some(e)) => Some(e.revision),
                Ok(None) => Some(0),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the limiter lease");
                    None
                }
            };
            if let Some(last) = free_after
                && let Some(seq) = self.publish_lease(&bucket, last).await
            {
                tracing::info!(holder = %self.holder, term = seq, "rate limiter leadership taken");
                // A leader does not follow the lease (its own renewals would pile up).
                watch = None;
                match self.lead(&store, &bucket, seq, &shutdown).await {
                    Outcome::Shutdown => return Ok(()),
                    Outcome::Lost => {
                        tracing::warn!(holder = %self.holder, "rate limiter leadership lost");
                    }
                }
                continue;
            }
            // Follow: wait for the lease to change, or re-check now and then.
            if watch.is_none() {
                watch = store.watch(LEASE_KEY).await.ok();
            }
            let recheck = tokio::time::sleep(self.ttl() / 2);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = recheck => {}
                changed = async { match watch.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => {
                    if changed.is_none() {
                        watch = None;
                    }
                }
            }
        }
    }

    /// Publishes the lease in `bucket` expecting `last` as the key's last sequence.
    async fn publish_lease(&self, bucket: &str, last: u64) -> Option<u64> {
        let lease = LimiterLease {
            v: V1,
            holder: self.holder.clone(),
            pid: std::process::id(),
            since_ms: now_ms(),
        };
        let payload = Bytes::from(serde_json::to_vec(&lease).unwrap_or_default());
        self.bus
            .put_expiring(bucket, LEASE_KEY, payload, self.ttl(), Some(last))
            .await
            .ok()
    }

    /// Loads the predecessor's windows. Every leader writes its windows before it
    /// grants anything, so "no snapshot" means no grants were ever made.
    async fn load_windows(&self, store: &kv::Store, term: u64) -> State {
        let now = now_ms();
        let mut windows = BTreeMap::new();
        let mut global_tokens = 0;
        for (model, limits) in &self.config.models {
            let mut w = RateWindow::new(*limits, self.config.window, self.config.margin);
            let snap = match store.get(window_key(model)).await {
                Ok(Some(b)) => serde_json::from_slice::<WindowSnapshot>(&b).ok(),
                _ => None,
            };
            if let Some(s) = snap {
                // The predecessor granted for at most its self-fencing limit past
                // its last renewal, and wrote snapshots every SNAPSHOT_EVERY
                // before that: a lease TTL bounds the gap.
                let gap = (self.ttl().as_millis() as u64).min(now.saturating_sub(s.taken_ms));
                w.restore(&s, gap, now);
                global_tokens = global_tokens.max(s.global_tokens);
            }
            windows.insert(model.clone(), w);
        }
        let global = match store.get(GLOBAL_KEY).await {
            Ok(Some(b)) => serde_json::from_slice::<Ledger>(&b).unwrap_or_default(),
            _ => Ledger::default(),
        };
        State {
            windows,
            term,
            next: 0,
            global_tokens: global.tokens.max(global_tokens),
            global_inflight: 0,
            open: std::collections::HashMap::new(),
            // The predecessor's calls in flight: settled to us by permit, or written
            // off as spent after a while (their process may be gone).
            inherited: global.reserved,
            inherited_until: tokio::time::Instant::now() + INHERITED_HOLD,
            global_calls: global.calls,
            global_largest: global.largest_call,
            dirty: true,
        }
    }

    async fn lead(
        &self,
        store: &kv::Store,
        bucket: &str,
        mut seq: u64,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let term = seq;
        let mut state = self.load_windows(store, term).await;
        // Written before the first grant, so a successor never mistakes "no snapshot"
        // for "nothing granted".
        if let Err(e) = state.write_snapshots(store).await {
            tracing::warn!(error = %e, "cannot write the limiter's first snapshot; not leading");
            return Outcome::Lost;
        }
        let names = self.bus.names().clone();
        let service = match self
            .bus
            .start_service(
                &names.limits_service_name(),
                "Flotilla fleet rate limiter (served by the current leader)",
                env!("CARGO_PKG_VERSION"),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the limiter service");
                return Outcome::Lost;
            }
        };
        let acquire = service
            .endpoint_builder()
            .name("acquire")
            .add(names.limits_acquire())
            .await;
        let settle = service
            .endpoint_builder()
            .name("settle")
            .add(names.limits_settle())
            .await;
        let (Ok(mut acquire), Ok(mut settle)) = (acquire, settle) else {
            let _ = service.stop().await;
            return Outcome::Lost;
        };
        let ttl = self.ttl();
        let mut renew = tokio::time::interval(ttl / 3);
        renew.tick().await;
        let mut snapshot = tokio::time::interval(SNAPSHOT_EVERY);
        let mut renewed_at = tokio::time::Instant::now();
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Outcome::Shutdown,
                Some(req) = acquire.next() => {
                    // Self-fencing: never grant on a lease that may have expired.
                    if renewed_at.elapsed() > ttl.mul_f64(0.8) {
                        break Outcome::Lost;
                    }
                    let reply = state.acquire(&req.message.payload, self.config.global_token_budget);
                    let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
                    let _ = req.respond(Ok(body)).await;
                }
                Some(req) = settle.next() => {
                    let body = match state.settle(&req.message.payload) {
                        Ok(()) => Bytes::from_static(b"{\"v\":1}"),
                        Err(e) => Bytes::from(serde_json::to_vec(&e).unwrap_or_default()),
                    };
                    let _ = req.respond(Ok(body)).await;
                }
                _ = renew.tick() => {
                    match self.publish_lease(bucket, seq).await {
                        Some(s) => { seq = s; renewed_at = tokio::time::Instant::now(); }
                        None => break Outcome::Lost,
                    }
                }
                _ = snapshot.tick() => {
                    state.expire_open(INHERITED_HOLD);
                    if state.dirty && let Err(e) = state.write_snapshots(store).await {
                        tracing::warn!(error = %e, "cannot write a limiter snapshot");
                    }
                }
            }
        };
        let _ = service.stop().await;
        if matches!(outcome, Outcome::Shutdown) {
            // Hand over at once rather than after the TTL.
            let _ = store.delete_expect_revision(LEASE_KEY, Some(seq)).await;
        }
        outcome
    }
}

/// The leader's state for one term.
struct State {
    windows: BTreeMap<String, RateWindow>,
    term: u64,
    next: u64,
    /// Tokens used by settled calls, fleet-wide.
    global_tokens: u64,
    /// Tokens reserved by this term's calls in flight.
    global_inflight: u64,
    /// This term's permits not yet settled: tokens reserved, and when.
    open: std::collections::HashMap<u64, (u64, tokio::time::Instant)>,
    /// Tokens reserved by the previous leader's calls in flight.
    inherited: u64,
    inherited_until: tokio::time::Instant,
    global_calls: u64,
    global_largest: u64,
    dirty: bool,
}

/// How long a new leader waits for its predecessor's calls in flight to settle before
/// counting their reservations as spent.
const INHERITED_HOLD: Duration = Duration::from_secs(120);

/// The fleet-wide spend ledger the leader keeps (key `spend.global`).
pub const GLOBAL_KEY: &str = "spend.global";

impl State {
    /// Permits never settled within the hold (their caller died mid-call, or every
    /// settlement was lost) count as spent in full, so they stop holding the budget.
    fn expire_open(&mut self, hold: Duration) {
        let now = tokio::time::Instant::now();
        let stale: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= hold)
            .map(|(n, _)| *n)
            .collect();
        for n in stale {
            if let Some((reserved, _)) = self.open.remove(&n) {
                self.global_inflight = self.global_inflight.saturating_sub(reserved);
                self.global_tokens += reserved;
                self.dirty = true;
            }
        }
    }

    async fn write_snapshots(&mut self, store: &kv::Store) -> Result<(), kv::PutError> {
        self.dirty = false;
        let now = now_ms();
        let global = self.global_tokens;
        for (model, w) in self.windows.iter_mut() {
            let snap = w.snapshot(now, global);
            let bytes = Bytes::from(serde_json::to_vec(&snap).unwrap_or_default());
            store.put(window_key(model), bytes).await?;
        }
        let ledger = Ledger {
            v: V1,
            tokens: global,
            reserved: self.global_inflight + self.inherited,
            calls: self.global_calls,
            largest_call: self.global_largest,
        };
        let bytes = Bytes::from(serde_json::to_vec(&ledger).unwrap_or_default());
        store.put(GLOBAL_KEY, bytes).await?;
        Ok(())
    }

    fn acquire(&mut self, payload: &[u8], global_budget: u64) -> AcquireReply {
        let req: AcquireRequest = match flotilla_protocol::decode(payload, 64 * 1024) {
            Ok(r) => r,
            Err(e) => {
                return AcquireReply::Error {
                    v: V1,
                    code: e.code(),
                    message: e.to_string(),
                };
            }
        };
        if self.inherited > 0 && tokio::time::Instant::now() >= self.inherited_until {
            self.global_tokens += std::mem::take(&mut self.inherited);
        }
        if global_budget > 0 && self.global_tokens >= global_budget {
            return AcquireReply::Refused {
                v: V1,
                code: AcquireRefusal::GlobalBudget,
                message: format!(
                    "global token budget {global_budget} spent ({} tokens)",
                    self.global_tokens
                ),
            };
        }
        if global_budget > 0
            && self.global_tokens + self.global_inflight + self.inherited >= global_budget
        {
            // Calls in flight may spend the rest: wait for their settlements.
            return AcquireReply::Wait {
                v: V1,
                retry_after_ms: 100,
            };
        }
        let now = now_ms();
        let Some(w) = self.windows.get_mut(&req.model) else {
            // Unlimited model: count it toward the global budget only.
            self.global_inflight += req.tokens;
            self.global_calls += 1;
            self.dirty = true;
            self.next += 1;
            self.open
                .insert(self.next, (req.tokens, tokio::time::Instant::now()));
            return AcquireReply::Granted {
                v: V1,
                permit: format!("{}.{}", self.term, self.next),
                granted_ms: now,
            };
        };
        match w.try_acquire(now, req.tokens) {
            Ok(granted_ms) => {
                self.dirty = true;
                self.global_inflight += req.tokens;
                self.global_calls += 1;
                self.next += 1;
                self.open
                    .insert(self.next, (req.tokens, tokio::time::Instant::now()));
                AcquireReply::Granted {
                    v: V1,
                    permit: format!("{}.{}", self.term, self.next),
                    granted_ms,
                }
            }
            Err(Denied::Wait(ms)) => AcquireReply::Wait {
                v: V1,
                retry_after_ms: ms,
            },
            Err(Denied::TooLarge) => AcquireReply::Refused {
                v: V1,
                code: AcquireRefusal::TooLarge,
                message: format!(
                    "{} tokens exceed {}'s window budget of {}",
                    req.tokens,
                    req.model,
                    w.max_tokens()
                ),
            },
        }
    }

    /// Applies a settlement; a request it cannot read is answered with its error.
    fn settle(&mut self, payload: &[u8]) -> Result<(), AcquireReply> {
        let req = match flotilla_protocol::decode::<SettleRequest>(payload, 64 * 1024) {
            Ok(r) => r,
            Err(e) => {
                return Err(AcquireReply::Error {
                    v: V1,
                    code: e.code(),
                    message: e.to_string(),
                });
            }
        };
        let now = now_ms();
        let (term, n) = req
            .permit
            .split_once('.')
            .and_then(|(t, n)| Some((t.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
            .unwrap_or((0, 0));
        let same_term = term == self.term;
        if same_term {
            // Settled once: a repeated settlement (its reply was lost) changes nothing.
            let Some((reserved, _)) = self.open.remove(&n) else {
                return Ok(());
            };
            self.global_inflight = self.global_inflight.saturating_sub(reserved);
        } else {
            self.inherited = self.inherited.saturating_sub(req.reserved);
        }
        self.global_tokens += req.used;
        self.global_largest = self.global_largest.max(req.used);
        self.dirty = true;
        if let Some(w) = self.windows.get_mut(&req.model) {
            if same_term {
                w.settle(now, req.granted_ms, req.reserved, req.used);
            } else {
                w.settle(now, req.granted_ms, 0, req.used);
            }
            if let Some(ms) = req.rate_limited_ms {
                w.penalize(now, ms);
            }
            self.dirty = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(rpm: u64, tpm: u64) -> RateWindow {
        RateWindow::new(ModelLimits { rpm, tpm }, Duration::from_secs(60), 0.2)
    }

    #[test]
    fn grants_up_to_the_margin_then_waits_for_the_oldest_to_expire() {
        let mut w = window(10, 1_000_000);
        assert_eq!(w.max_requests(), 8);
        for i in 0..8 {
            assert!(w.try_acquire(1_000 + i * 1000, 10).is_ok());
        }
        match w.try_acquire(9_000, 10) {
            Err(Denied::Wait(ms)) => {
                // The first grant (slot 1000) expires at 1000 + 100 + 60000 + 1000 (skew).
                assert_eq!(ms, 62_100 - 9_000);
            }
            other => panic!("expected a wait, got {other:?}"),
        }
        assert!(
            w.try_acquire(62_100, 10).is_ok(),
            "free once the first expired"
        );
        assert!(w.try_acquire(62_100, 10).is_err());
    }

    #[test]
    fn tokens_are_reserved_then_settled_with_real_usage() {
        let mut w = window(1000, 1000);
        assert_eq!(w.max_tokens(), 800);
        let g = w.try_acquire(0, 500).unwrap();
        assert!(matches!(w.try_acquire(10, 400), Err(Denied::Wait(_))));
        w.settle(20, g, 500, 100);
        assert_eq!(w.used(20), (1, 100));
        assert!(
            w.try_acquire(30, 400).is_ok(),
            "settling freed the unused reservation"
        );
        assert_eq!(w.try_acquire(40, 900), Err(Denied::TooLarge));
    }

    #[test]
    fn a_429_pauses_and_shrinks_until_a_clean_window() {
        let mut w = window(100, 1_000_000);
        w.penalize(1_000, 2_000);
        assert_eq!(w.try_acquire(1_500, 1), Err(Denied::Wait(1_500)));
        assert_eq!(w.max_requests(), 72);
        assert!(w.try_acquire(3_000, 1).is_ok());
        w.used(70_000);
        assert_eq!(w.max_requests(), 80, "restored after a clean window");
    }

    #[test]
    fn a_new_leader_assumes_the_old_one_used_its_headroom() {
        let mut old = window(10, 1_000_000);
        for _ in 0..3 {
            old.try_acquire(1_000, 5).unwrap();
        }
        let snap = old.snapshot(1_050, 15);
        let mut new = window(10, 1_000_000);
        new.restore(&snap, 400, 3_000);
        assert_eq!(new.used(3_000).0, 8, "3 known grants plus 5 possible ones");
        assert!(new.try_acquire(3_000, 1).is_err());
        // The phantom grants expire one window after the snapshot gap.
        assert!(new.try_acquire(1_450 + 100 + 60_000 + 1_000, 1).is_ok());
    }

    #[test]
    fn no_window_of_the_configured_length_ever_exceeds_the_cap() {
        // Randomized load; every window [t, t + 60 s) must hold at most the cap.
        let mut w = window(50, 5_000);
        let mut grants: Vec<(u64, u64)> = Vec::new();
        let mut seed = 42u64;
        let mut now = 0;
        while now < 300_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            now += seed >> 54;
            let tokens = 1 + (seed >> 40) % 200;
            if let Ok(at) = w.try_acquire(now, tokens) {
                let used = tokens / 2;
                w.settle(now, at, tokens, used);
                grants.push((now, used));
            }
        }
        for (i, (t, _)) in grants.iter().enumerate() {
            let in_window: Vec<_> = grants[i..]
                .iter()
                .take_while(|(u, _)| *u < t + 60_000)
                .collect();
            assert!(
                in_window.len() as u64 <= 40,
                "{} requests in a window",
                in_window.len()
            );
            let tokens: u64 = in_window.iter().map(|(_, k)| k).sum();
            assert!(tokens <= 4_000, "{tokens} tokens in a window");
        }
        assert!(
            grants.len() > 150,
            "the limiter let load through: {}",
            grants.len()
        );
    }
}

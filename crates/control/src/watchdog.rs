//! The watchdog: finds processes that died, froze or got stuck, and releases their
//! work for redelivery now instead of when its ack wait runs out.
//!
//! It follows two KV watches: the presences in the agents bucket, and the task claims
//! and commits (`*.c.>` and `*.t.>`, one watch, in stream order) in the sessions
//! bucket. It indexes running claims by task key (a claim names its holder and its
//! delivery's ack subject) and drops one when its attempt's commit comes. Every `probe_every` it pings each
//! process on its own subject:
//! - **disconnected**: the ping gets "no responders" (the server dropped the process's
//!   connection) on every probe for `liveness.disconnect_confirm` (2 s): a `kill -9` is
//!   seen within that and one probe. One "no responders" is not enough: after the loss
//!   of the cluster node a process was connected to, a healthy process is without a
//!   subscription until it has reconnected, and releasing its work then would have
//!   another process redo it. After the watchdog's own connection was lost (a server
//!   restart cuts off every process, each reconnecting on its own backoff) the window
//!   is at least [`RECONNECT_GRACE`] from its return;
//! - **presence expired**: a presence seen before is gone (its TTL ran out: a frozen or
//!   partitioned process);
//! - **no presence**: a holder of running claims that has no presence and does not
//!   answer its ping (it died while this watchdog was not looking);
//! - **stuck**: a task its holder's presence lists as without progress for
//!   `stuck_timeout`.
//!
//! A ghost's work is what its presence lists (the orchestrator's deliveries) and every
//! running claim it holds. Releasing a task fences the old holder first (its claim goes
//! back to `queued`, so the server refuses its late commit, which was fenced on the
//! claim's revision), then publishes
//! `-NAK` to the delivery's ack subject on the holder's behalf, then logs a `reassigned`
//! event. Every step is idempotent, so several `serve` instances may watch at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use tracing::Instrument;

use async_nats::jetstream::kv;
use bytes::Bytes;
use flotilla_agent::{LivenessConfig, RECONNECT_GRACE};
use flotilla_bus::{Applied, Bus, KvError, RequestError, Start, Step};
use flotilla_protocol::subject::keys;
use flotilla_protocol::{
    AgentId, DEFAULT_MAX_PAYLOAD, EventBody, InFlight, Presence, TaskRecord, TaskRunState, decode,
    epoch_ms, task_machine,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// What the watchdog has done.
#[derive(Debug, Default)]
pub struct WatchdogCounters {
    /// Processes found dead or expired.
    pub ghosts: AtomicU64,
    /// Tasks taken from a holder and released.
    pub reassigned: AtomicU64,
}

/// The watchdog of one `serve`.
#[derive(Debug)]
pub struct Watchdog {
    bus: Bus,
    /// Processes whose pings got "no responders", since when (cleared by an answer).
    gone_since: HashMap<String, tokio::time::Instant>,
    /// When this watchdog last saw its own connection down or re-established.
    own_outage: Option<tokio::time::Instant>,
    /// The connection's count of connects at the last probe.
    connects: u64,
    config: LivenessConfig,
    store: kv::Store,
    /// Last presence seen of every process, to know what an expired one held.
    seen: HashMap<String, Presence>,
    /// The running claims of the fleet.
    claims: ClaimIndex,
    /// Counters.
    pub counters: Arc<WatchdogCounters>,
}

fn now() -> u64 {
    epoch_ms(SystemTime::now())
}

impl Watchdog {
    /// A watchdog over `bus`'s agents bucket.
    pub async fn new(bus: Bus, config: LivenessConfig) -> Result<Self, KvError> {
        let store = bus.open_bucket(&bus.names().bucket_agents()).await?;
        Ok(Self {
            bus,
            gone_since: HashMap::new(),
            own_outage: None,
            connects: 0,
            config,
            store,
            seen: HashMap::new(),
            claims: ClaimIndex::default(),
            counters: Arc::default(),
        })
    }

    /// Probes until `shutdown`. Presences and claims arrive through two KV watchers
    /// (no listing per probe): a presence put updates the view, its TTL expiry (purge
    /// marker) is a ghost; a task record put adds or clears a claim.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let sessions = self.bus.sessions().store().clone();
        let Some(mut watch) = self.watch_until_ready(&self.store, &[">"], &shutdown).await else {
            return;
        };
        let Some(mut tasks) = self
            .watch_until_ready(&sessions, &[keys::ALL_CLAIMS, keys::ALL_TASKS], &shutdown)
            .await
        else {
            return;
        };
        let mut tick = tokio::time::interval(self.config.probe_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                entry = watch.next() => match entry {
                    Some(Ok(e)) => self.observe(e).await,
                    // After a server restart the watcher reports missed heartbeats and
                    // recovers: keep going.
                    Some(Err(e)) => tracing::debug!(error = %e, "presence watch hiccup"),
                    None => return,
                },
                entry = tasks.next() => match entry {
                    Some(Ok(e)) => self.observe_claim(e),
                    Some(Err(e)) => tracing::debug!(error = %e, "task record watch hiccup"),
                    None => return,
                },
                _ = tick.tick() => self.probe().await,
            }
        }
    }

    async fn watch_until_ready(
        &self,
        store: &kv::Store,
        keys: &[&str],
        shutdown: &CancellationToken,
    ) -> Option<kv::Watch> {
        loop {
            match store.watch_many_with_history(keys.iter().copied()).await {
                Ok(w) => return Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, ?keys, "cannot watch; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(self.config.probe_every) => {}
                    }
                }
            }
        }
    }

    /// Indexes a task's running claim (or drops the key's old claim); a commit
    /// drops the claim of its attempt.
    fn observe_claim(&mut self, entry: kv::Entry) {
        if let Some(claim_key) = keys::claim_of_commit(&entry.key) {
            let committed = (entry.operation == kv::Operation::Put)
                .then(|| serde_json::from_slice::<ClaimView>(&entry.value).ok())
                .flatten();
            let ended = |held: &HeldClaim| {
                committed
                    .as_ref()
                    .is_some_and(|c| held.attempt <= c.attempt)
            };
            if self.claims.get(claim_key.as_str()).is_some_and(ended) {
                self.claims.remove(claim_key.as_str());
            }
            return;
        }
        self.claims.remove(entry.key.as_str());
        if entry.operation != kv::Operation::Put {
            return;
        }
        let Ok(rec) = serde_json::from_slice::<ClaimView>(&entry.value) else {
            return;
        };
        let (TaskRunState::Running, Some(holder), Some(ack_subject)) =
            (rec.state, rec.holder, rec.ack_subject)
        else {
            return;
        };
        self.claims.insert(
            entry.key.into_boxed_str(),
            HeldClaim {
                holder,
                attempt: rec.attempt,
                ack_subject: ack_subject.into_boxed_str(),
                since_ms: rec.updated_ms,
            },
        );
    }

    async fn observe(&mut self, entry: kv::Entry) {
        match entry.operation {
            kv::Operation::Put => {
                if let Ok(p) = decode::<Presence>(&entry.value, DEFAULT_MAX_PAYLOAD) {
                    self.seen.insert(entry.key, p);
                }
            }
            // The TTL ran out: no renewal came (a frozen or partitioned process).
            kv::Operation::Purge => {
                if let Some(p) = self.seen.remove(&entry.key) {
                    let ghost = Ghost::of(&p);
                    self.ghost(ghost, p.in_flight, "presence expired").await;
                }
            }
            // A clean shutdown, or another watchdog burying a ghost. (Claims it still
            // holds are checked by ping as a holder without presence.)
            kv::Operation::Delete => {
                self.seen.remove(&entry.key);
            }
        }
    }

    /// Pings every known process and every holder of claims without a presence;
    /// releases the work of those whose connection is gone and of tasks that made no
    /// progress for the stuck timeout.
    pub async fn probe(&mut self) {
        // A connection that is down, or came back since the last probe (an outage
        // shorter than a probe included): every process may be reconnecting too.
        let connects = self.bus.connects();
        let before = std::mem::replace(&mut self.connects, connects);
        let connected = self.bus.is_connected();
        if !connected || (before != 0 && connects != before) {
            self.own_outage = Some(tokio::time::Instant::now());
        }
        if !connected {
            return;
        }
        let current: Vec<Presence> = self.seen.values().cloned().collect();
        let orphans: Vec<AgentId> = self
            .claims
            .holders()
            .filter(|h| !self.seen.contains_key(h.as_str()))
            .cloned()
            .collect();
        let names = self.bus.names().clone();
        let subjects = current
            .iter()
            .map(|p| p.ping_subject.clone())
            .chain(orphans.iter().map(|h| names.agent_ping(h)));
        let pings = futures::future::join_all(subjects.map(|subject| {
            let bus = self.bus.clone();
            let timeout = self.config.probe_timeout;
            async move {
                match bus.request(subject, None, Bytes::new(), timeout).await {
                    Err(RequestError::NoResponders { .. }) => Liveness::Gone,
                    Ok(_) => Liveness::Alive,
                    Err(_) => Liveness::Unresponsive,
                }
            }
        }))
        .await;
        let stuck_ms = self.config.stuck_timeout.as_millis() as u64;
        let (of_present, of_orphans) = pings.split_at(current.len());
        for (p, liveness) in current.iter().zip(of_present) {
            match liveness {
                Liveness::Gone => {
                    if self.confirmed_gone(p.agent_id.as_str()) {
                        self.ghost(Ghost::of(p), p.in_flight.clone(), "disconnected")
                            .await
                    }
                }
                Liveness::Alive | Liveness::Unresponsive => {
                    self.gone_since.remove(p.agent_id.as_str());
                    for item in &p.in_flight {
                        let idle = now().saturating_sub(item.progress_ms);
                        if item.task_id.is_some() && idle > stuck_ms {
                            self.release(
                                &Ghost::of(p),
                                item,
                                &format!("no progress for {idle} ms"),
                            )
                            .await;
                        }
                    }
                }
            }
        }
        for (agent_id, liveness) in orphans.into_iter().zip(of_orphans) {
            if !matches!(liveness, Liveness::Gone) {
                self.gone_since.remove(agent_id.as_str());
            } else if self.confirmed_gone(agent_id.as_str()) {
                let ghost = Ghost {
                    agent_id,
                    role: None,
                    renewed_ms: 0,
                };
                self.ghost(ghost, Vec::new(), "no presence").await;
            }
        }
    }

    /// Whether `agent`'s pings have got "no responders" for `disconnect_confirm` (this
    /// one included), and for [`RECONNECT_GRACE`] since this watchdog's own connection
    /// came back.
    fn confirmed_gone(&mut self, agent: &str) -> bool {
        let now = tokio::time::Instant::now();
        let since = *self.gone_since.entry(agent.to_owned()).or_insert(now);
        let grace_over = self
            .own_outage
            .is_none_or(|at| now.duration_since(at) >= RECONNECT_GRACE);
        now.duration_since(since) >= self.config.disconnect_confirm && grace_over
    }

    /// Releases everything `g` held: what its presence listed and its running claims.
    async fn ghost(&mut self, g: Ghost, listed: Vec<InFlight>, reason: &str) {
        let mut items = listed;
        let held = self.claims.take_held_by(&g.agent_id);
        if !held.is_empty() {
            let known: std::collections::HashSet<String> =
                items.iter().map(|i| i.ack_subject.clone()).collect();
            items.extend(
                held.into_iter()
                    .filter(|(_, h)| !known.contains(&*h.ack_subject))
                    .filter_map(|(key, h)| h.in_flight(&key)),
            );
        }
        self.seen.remove(g.agent_id.as_str());
        self.gone_since.remove(g.agent_id.as_str());
        self.counters.ghosts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("flotilla_heartbeats_missed_total").increment(1);
        tracing::warn!(agent = %g.agent_id, role = ?g.role, reason, in_flight = items.len(), "ghost process");
        let mut told = std::collections::HashSet::new();
        for item in &items {
            // One heartbeat_missed per session the process held work in.
            if told.insert(item.session_id.clone()) {
                let body = EventBody::HeartbeatMissed {
                    agent_id: g.agent_id.to_string(),
                    reason: reason.to_owned(),
                    silent_ms: if g.renewed_ms == 0 {
                        0
                    } else {
                        now().saturating_sub(g.renewed_ms)
                    },
                };
                let id = format!("heartbeat.{}.{}", g.agent_id, g.renewed_ms);
                if let Err(e) = self.bus.emit(&item.session_id, &id, body, None).await {
                    tracing::warn!(error = %e, "could not log a missed heartbeat");
                }
            }
            self.release(&g, item, reason).await;
        }
        // Others need not redo it (they would, harmlessly).
        let _ = self.store.delete(g.agent_id.as_str()).await;
    }

    /// Fences the holder, releases the delivery, logs the reassignment.
    async fn release(&self, p: &Ghost, item: &InFlight, reason: &str) {
        // A worker's claim: its role is in the item, or the process's presence.
        let role = item.role.as_ref().or(p.role.as_ref());
        if let (Some(task_id), Some(role), Some(attempt)) = (&item.task_id, role, item.attempt) {
            match self.fence(&p.agent_id, item, role, task_id, attempt).await {
                Ok(Some(role)) => {
                    self.counters.reassigned.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("flotilla_reassignments_total").increment(1);
                    let after_ms = now().saturating_sub(p.renewed_ms.max(item.progress_ms));
                    let body = EventBody::Reassigned {
                        task_id: task_id.clone(),
                        role,
                        attempt,
                        from: p.agent_id.to_string(),
                        reason: reason.to_owned(),
                        after_ms,
                    };
                    let id = format!("reassigned.{task_id}.{attempt}.{}", p.agent_id);
                    // A span of the session's trace (one read of its record, only when
                    // something is reassigned), so the reassignment shows in the trace
                    // between the dead holder's task span and the next holder's.
                    let trace = self
                        .bus
                        .sessions()
                        .get::<flotilla_protocol::SessionRecord>(&keys::session(&item.session_id))
                        .await
                        .ok()
                        .flatten()
                        .and_then(|(r, _)| {
                            flotilla_protocol::TraceParent::parse(&r.traceparent).ok()
                        });
                    let span = tracing::info_span!(
                        "reassign",
                        session = %item.session_id,
                        task = %task_id,
                        attempt,
                        from = %p.agent_id,
                        reason,
                    );
                    flotilla_bus::trace::set_parent(&span, trace);
                    async {
                        if let Err(e) = self.bus.emit(&item.session_id, &id, body, trace).await {
                            tracing::warn!(error = %e, "could not log a reassignment");
                        }
                        tracing::warn!(session = %item.session_id, task = %task_id, attempt, from = %p.agent_id, reason, "task reassigned");
                    }
                    .instrument(span)
                    .await;
                }
                // Not held by that process any more: nothing to release.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not fence a task");
                    return;
                }
            }
        }
        let ack = self.bus.ack_handle(&item.ack_subject);
        if let Err(e) = ack.release().await {
            tracing::warn!(error = %e, "could not release a delivery");
        }
    }

    /// Puts the task's claim back to `queued` if `holder` still runs this attempt and
    /// has not committed it. Returns the task's role when it did.
    async fn fence(
        &self,
        holder: &AgentId,
        item: &InFlight,
        role: &flotilla_protocol::Role,
        task_id: &flotilla_protocol::TaskId,
        attempt: u32,
    ) -> Result<Option<flotilla_protocol::Role>, KvError> {
        // Committed already (the holder died before its ack): nothing to take back.
        let committed = self
            .bus
            .sessions()
            .get::<TaskRecord>(&keys::task(&item.session_id, role, task_id))
            .await?;
        if committed.is_some_and(|(c, _)| {
            c.attempt > attempt
                || (c.attempt == attempt && task_machine::committed_outcome(&c).is_some())
        }) {
            return Ok(None);
        }
        let key = keys::claim(&item.session_id, role, task_id);
        let applied = self
            .bus
            .sessions()
            .transition(
                &key,
                Start::Read,
                8,
                |current: Option<&TaskRecord>| match current
                    .and_then(|r| task_machine::fence(r, holder, attempt, now()))
                {
                    Some(fenced) => {
                        let role = fenced.role.clone();
                        Step::Write(fenced, Some(role))
                    }
                    None => Step::Keep(None),
                },
            )
            .await?;
        Ok(match applied {
            Applied::Written { value, .. } => value,
            Applied::Kept(_) | Applied::Contended => None,
        })
    }
}

/// The running claims of the fleet, by task key, with a count of each holder's.
///
/// Every `serve` holds an entry for each task running in the fleet, so an entry is one
/// table slot, with the key and the ack subject its only allocations. Finding a
/// holder's claims is a scan of the table, done only when a holder is found gone. The
/// table grows to the fleet's peak of running tasks; it is shrunk once it is a quarter
/// full (at 10,000 sessions it would otherwise keep about 6 MB through the answers'
/// wave, when the tasks have ended: BENCHMARKS.md).
#[derive(Debug, Default)]
struct ClaimIndex {
    claims: HashMap<Box<str>, HeldClaim>,
    /// How many claims each holder in `claims` has.
    holders: HashMap<AgentId, usize>,
}

impl ClaimIndex {
    /// Tables this small are left as they are.
    const KEEP_CAPACITY: usize = 1024;

    /// Indexes `claim` at `key`, in place of the claim there.
    fn insert(&mut self, key: Box<str>, claim: HeldClaim) {
        *self.holders.entry(claim.holder.clone()).or_default() += 1;
        if let Some(old) = self.claims.insert(key, claim) {
            self.forget_one_of(&old.holder);
        }
    }

    fn get(&self, key: &str) -> Option<&HeldClaim> {
        self.claims.get(key)
    }

    /// Drops the claim at `key`.
    fn remove(&mut self, key: &str) -> Option<HeldClaim> {
        let old = self.claims.remove(key)?;
        self.forget_one_of(&old.holder);
        self.shrink();
        Some(old)
    }

    /// Takes out every claim `holder` has.
    fn take_held_by(&mut self, holder: &AgentId) -> Vec<(Box<str>, HeldClaim)> {
        if self.holders.remove(holder).is_none() {
            return Vec::new();
        }
        let taken = self
            .claims
            .extract_if(|_, claim| &claim.holder == holder)
            .collect();
        self.shrink();
        taken
    }

    /// The processes that hold claims.
    fn holders(&self) -> impl Iterator<Item = &AgentId> {
        self.holders.keys()
    }

    fn forget_one_of(&mut self, holder: &AgentId) {
        if let Some(n) = self.holders.get_mut(holder) {
            *n -= 1;
            if *n == 0 {
                self.holders.remove(holder);
            }
        }
    }

    /// Halves what a quarter-full table keeps (a shrink follows at least as many
    /// removals as it moves entries, so its cost is spread over them).
    fn shrink(&mut self) {
        let (len, capacity) = (self.claims.len(), self.claims.capacity());
        if capacity > Self::KEEP_CAPACITY && len < capacity / 4 {
            self.claims.shrink_to(len * 2);
        }
    }
}

/// A running claim in the index: what releasing it needs that its key (session, role
/// and task) does not say.
#[derive(Debug)]
struct HeldClaim {
    holder: AgentId,
    attempt: u32,
    ack_subject: Box<str>,
    since_ms: u64,
}

impl HeldClaim {
    /// The delivery in flight that the claim at `key` stands for.
    fn in_flight(self, key: &str) -> Option<InFlight> {
        let (session_id, role, task_id) = keys::parse_claim(key)?;
        Some(InFlight {
            session_id,
            task_id: Some(task_id),
            role: Some(role),
            attempt: Some(self.attempt),
            ack_subject: self.ack_subject.into(),
            since_ms: self.since_ms,
            progress_ms: self.since_ms,
        })
    }
}

/// The process whose work is released.
struct Ghost {
    agent_id: AgentId,
    role: Option<flotilla_protocol::Role>,
    /// Its last presence renewal (0 if none was seen).
    renewed_ms: u64,
}

impl Ghost {
    fn of(p: &Presence) -> Self {
        Self {
            agent_id: p.agent_id.clone(),
            role: Some(p.role.clone()),
            renewed_ms: p.renewed_ms,
        }
    }
}

/// What the watchdog reads of a task record (the output is skipped, and the ids: the
/// key names them).
#[derive(serde::Deserialize)]
struct ClaimView {
    attempt: u32,
    state: TaskRunState,
    #[serde(default)]
    holder: Option<AgentId>,
    #[serde(default)]
    ack_subject: Option<String>,
    updated_ms: u64,
}

enum Liveness {
    Alive,
    Gone,
    Unresponsive,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(holder: &str, attempt: u32) -> HeldClaim {
        HeldClaim {
            holder: AgentId::parse(holder).unwrap(),
            attempt,
            ack_subject: format!("$JS.ACK.s.c.1.{attempt}.1.0.0").into_boxed_str(),
            since_ms: 0,
        }
    }

    fn holders(index: &ClaimIndex) -> Vec<(String, usize)> {
        let mut v: Vec<_> = index
            .holders
            .iter()
            .map(|(h, n)| (h.to_string(), *n))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_claim_replaced_or_removed_moves_its_holder_count() {
        let mut index = ClaimIndex::default();
        index.insert("s.c.research.t1".into(), claim("a", 1));
        index.insert("s.c.research.t2".into(), claim("a", 1));
        index.insert("s.c.writing.t3".into(), claim("b", 1));
        assert_eq!(holders(&index), [("a".into(), 2), ("b".into(), 1)]);
        // Taken over: the key's claim is b's now.
        index.insert("s.c.research.t1".into(), claim("b", 2));
        assert_eq!(holders(&index), [("a".into(), 1), ("b".into(), 2)]);
        assert_eq!(index.get("s.c.research.t1").map(|c| c.attempt), Some(2));
        assert!(index.remove("s.c.research.t2").is_some());
        assert!(index.remove("s.c.research.t2").is_none());
        assert_eq!(holders(&index), [("b".into(), 2)]);
        assert_eq!(index.holders().count(), 1);
    }

    #[test]
    fn a_gone_holder_takes_out_its_claims_and_no_others() {
        let mut index = ClaimIndex::default();
        for i in 0..50 {
            let holder = if i % 5 == 0 { "dead" } else { "alive" };
            index.insert(format!("s{i}.c.research.t1").into(), claim(holder, 1));
        }
        let mut taken: Vec<_> = index
            .take_held_by(&AgentId::parse("dead").unwrap())
            .into_iter()
            .map(|(k, c)| (k.to_string(), c.holder.to_string()))
            .collect();
        taken.sort();
        assert_eq!(taken.len(), 10);
        assert!(
            taken
                .iter()
                .all(|(k, h)| h == "dead" && k.ends_with(".c.research.t1"))
        );
        assert_eq!(index.claims.len(), 40);
        assert_eq!(holders(&index), [("alive".into(), 40)]);
        assert!(
            index
                .take_held_by(&AgentId::parse("dead").unwrap())
                .is_empty()
        );
    }

    #[test]
    fn the_table_gives_back_room_once_it_empties_and_keeps_its_claims() {
        let mut index = ClaimIndex::default();
        for i in 0..40_000 {
            index.insert(format!("s{i}.c.research.t1").into(), claim("a", 1));
        }
        let peak = index.claims.capacity();
        assert!(peak >= 40_000);
        for i in 0..39_000 {
            index.remove(&format!("s{i}.c.research.t1"));
        }
        assert!(
            index.claims.capacity() <= peak / 8,
            "{} slots kept for {} claims",
            index.claims.capacity(),
            index.claims.len()
        );
        assert_eq!(index.claims.len(), 1_000);
        assert!((39_000..40_000).all(|i| index.get(&format!("s{i}.c.research.t1")).is_some()));
        assert_eq!(holders(&index), [("a".into(), 1_000)]);
    }
}

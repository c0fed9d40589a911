//! The watchdog: finds processes that died, froze or got stuck, and releases their
//! work for redelivery now instead of when its ack wait runs out.
//!
//! Every `probe_every` it reads every presence in the agents bucket and pings each
//! process on its own subject:
//! - **disconnected**: the ping gets "no responders" (the server dropped the process's
//!   connection: a `kill -9` is seen within one probe);
//! - **presence expired**: a presence seen before is gone (its TTL ran out: a frozen or
//!   partitioned process);
//! - **stuck**: a task in a live presence has made no progress for `stuck_timeout`.
//!
//! Releasing a task fences the old holder first (its task record goes back to `queued`,
//! so its late commit fails the compare-and-set), then publishes `-NAK` to the
//! delivery's ack subject on the holder's behalf, then logs a `reassigned` event. Every
//! step is idempotent, so several `serve` instances may watch at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_nats::RequestErrorKind;
use async_nats::jetstream::kv;
use bytes::Bytes;
use flotilla_agent::LivenessConfig;
use flotilla_bus::{Applied, Bus, KvError, Start, Step};
use flotilla_protocol::subject::keys;
use flotilla_protocol::{
    AgentId, DEFAULT_MAX_PAYLOAD, EventBody, InFlight, Presence, TaskRecord, decode, epoch_ms,
    task_machine,
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
    config: LivenessConfig,
    store: kv::Store,
    /// Last presence seen of every process, to know what an expired one held.
    seen: HashMap<String, Presence>,
    /// Counters.
    pub counters: Arc<WatchdogCounters>,
}

fn now() -> u64 {
    epoch_ms(SystemTime::now())
}

impl Watchdog {
    /// A watchdog over `bus`'s agents bucket.
    pub async fn new(bus: Bus, config: LivenessConfig) -> Result<Self, KvError> {
        let store = bus
            .js
            .get_key_value(bus.names().bucket_agents())
            .await
            .map_err(|e| KvError::Unavailable {
                key: bus.names().bucket_agents(),
                source: Box::new(e),
            })?;
        Ok(Self {
            bus,
            config,
            store,
            seen: HashMap::new(),
            counters: Arc::default(),
        })
    }

    /// Probes until `shutdown`. Presence arrives through one KV watcher (no listing
    /// per probe): a put updates the view, a TTL expiry (purge marker) is a ghost.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut watch = loop {
            match self.store.watch_with_history(">").await {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch presence; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(self.config.probe_every) => {}
                    }
                }
            }
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
                _ = tick.tick() => self.probe().await,
            }
        }
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
                if let Some(p) = self.seen.remove(&entry.key)
                    && !p.in_flight.is_empty()
                {
                    self.ghost(&p, "presence expired").await;
                }
            }
            // A clean shutdown, or another watchdog burying a ghost.
            kv::Operation::Delete => {
                self.seen.remove(&entry.key);
            }
        }
    }

    /// Pings every known process; releases the work of those whose connection is gone
    /// and of tasks that made no progress for the stuck timeout.
    pub async fn probe(&mut self) {
        let current: Vec<Presence> = self.seen.values().cloned().collect();
        let pings = futures::future::join_all(current.iter().map(|p| {
            let client = self.bus.client.clone();
            let subject = p.ping_subject.clone();
            let timeout = self.config.probe_timeout;
            async move {
                match tokio::time::timeout(timeout, client.request(subject, Bytes::new())).await {
                    Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Liveness::Gone,
                    Ok(Ok(_)) => Liveness::Alive,
                    _ => Liveness::Unresponsive,
                }
            }
        }))
        .await;
        let stuck_ms = self.config.stuck_timeout.as_millis() as u64;
        for (p, liveness) in current.iter().zip(pings) {
            match liveness {
                Liveness::Gone => self.ghost(p, "disconnected").await,
                Liveness::Alive | Liveness::Unresponsive => {
                    for item in &p.in_flight {
                        let idle = now().saturating_sub(item.progress_ms);
                        if item.task_id.is_some() && idle > stuck_ms {
                            self.release(p, item, &format!("no progress for {idle} ms"))
                                .await;
                        }
                    }
                }
            }
        }
    }

    async fn ghost(&mut self, p: &Presence, reason: &str) {
        self.counters.ghosts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(agent = %p.agent_id, role = %p.role, reason, in_flight = p.in_flight.len(), "ghost process");
        let mut told = std::collections::HashSet::new();
        for item in &p.in_flight {
            // One heartbeat_missed per session the process held work in.
            if told.insert(item.session_id.clone()) {
                let body = EventBody::HeartbeatMissed {
                    agent_id: p.agent_id.to_string(),
                    reason: reason.to_owned(),
                    silent_ms: now().saturating_sub(p.renewed_ms),
                };
                let id = format!("heartbeat.{}.{}", p.agent_id, p.renewed_ms);
                if let Err(e) = self.bus.emit(&item.session_id, &id, body, None).await {
                    tracing::warn!(error = %e, "could not log a missed heartbeat");
                }
            }
            self.release(p, item, reason).await;
        }
        // Others need not redo it (they would, harmlessly).
        let _ = self.store.delete(p.agent_id.as_str()).await;
        self.seen.remove(p.agent_id.as_str());
    }

    /// Fences the holder, releases the delivery, logs the reassignment.
    async fn release(&self, p: &Presence, item: &InFlight, reason: &str) {
        if let (Some(task_id), Some(attempt)) = (&item.task_id, item.attempt) {
            match self.fence(&p.agent_id, item, task_id, attempt).await {
                Ok(Some(role)) => {
                    self.counters.reassigned.fetch_add(1, Ordering::Relaxed);
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
                    if let Err(e) = self.bus.emit(&item.session_id, &id, body, None).await {
                        tracing::warn!(error = %e, "could not log a reassignment");
                    }
                    tracing::warn!(session = %item.session_id, task = %task_id, attempt, from = %p.agent_id, reason, "task reassigned");
                }
                // Not held by that process any more: nothing to release.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not fence a task");
                    return;
                }
            }
        }
        let ack = flotilla_bus::AckHandle::new(self.bus.client.clone(), item.ack_subject.clone());
        if let Err(e) = ack.release().await {
            tracing::warn!(error = %e, "could not release a delivery");
        }
    }

    /// Puts the task record back to `queued` if `holder` still runs this attempt.
    /// Returns the task's role when it did.
    async fn fence(
        &self,
        holder: &AgentId,
        item: &InFlight,
        task_id: &flotilla_protocol::TaskId,
        attempt: u32,
    ) -> Result<Option<flotilla_protocol::Role>, KvError> {
        let key = keys::task(&item.session_id, task_id);
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

enum Liveness {
    Alive,
    Gone,
    Unresponsive,
}

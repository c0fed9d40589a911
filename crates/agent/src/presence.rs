//! Presence: every process heartbeats a record of itself and of what it is working on
//! into the `<p>-agents` bucket (per-key TTL), and answers pings on its own subject
//! while connected. The watchdog in `serve` uses both to find dead, frozen and stuck
//! processes and to release their work at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_bus::Bus;
use flotilla_protocol::{AgentId, InFlight, Presence, Role, V1, epoch_ms};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Heartbeat and detection intervals (compress them in tests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// How often a process renews its presence.
    #[serde(with = "humantime_serde")]
    pub heartbeat_every: Duration,
    /// How long a presence lives without renewal (whole seconds).
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// How often the watchdog checks every presence (and pings its process).
    #[serde(with = "humantime_serde")]
    pub probe_every: Duration,
    /// How long a ping may take before the process counts as unresponsive (frozen
    /// processes are then caught by their presence expiring).
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// A task with no progress for this long is taken from its holder.
    #[serde(with = "humantime_serde")]
    pub stuck_timeout: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            heartbeat_every: Duration::from_secs(5),
            presence_ttl: Duration::from_secs(20),
            probe_every: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            stuck_timeout: Duration::from_secs(60),
        }
    }
}

/// What this process is working on, shared between its handlers (which add and remove
/// entries) and its heartbeat (which publishes them). A plain mutex: every critical
/// section is one map operation, never held across an `.await`.
#[derive(Debug, Clone)]
pub struct Tracker {
    inner: Arc<Mutex<HashMap<String, InFlight>>>,
    /// Wakes the heartbeat when work starts, so the presence lists it right away
    /// rather than at the next periodic renewal.
    changed: Arc<tokio::sync::Notify>,
    /// Bumped on every start; the heartbeat publishes the generation it has written.
    started: Arc<std::sync::atomic::AtomicU64>,
    published: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            changed: Arc::default(),
            started: Arc::default(),
            published: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl Tracker {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, InFlight>) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records the start of work on a delivery.
    pub fn start(&self, item: InFlight) {
        self.with(|m| m.insert(item.ack_subject.clone(), item));
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Waits (at most `limit`) until the presence lists everything started so far, so a
    /// crash from here on is seen with this work in it. Returns false on timeout (no
    /// heartbeat running, or NATS slow): the work is then released by its ack wait.
    pub async fn published(&self, limit: Duration) -> bool {
        let want = self.started.load(std::sync::atomic::Ordering::SeqCst);
        let mut rx = self.published.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|g| *g >= want))
            .await
            .is_ok()
    }

    /// Records progress on a delivery.
    pub fn progress(&self, ack_subject: &str) {
        let now = epoch_ms(SystemTime::now());
        self.with(|m| {
            if let Some(i) = m.get_mut(ack_subject) {
                i.progress_ms = now;
            }
        });
    }

    /// Records the end of work on a delivery.
    pub fn finish(&self, ack_subject: &str) {
        self.with(|m| m.remove(ack_subject));
    }

    /// Everything in flight.
    pub fn snapshot(&self) -> Vec<InFlight> {
        self.with(|m| m.values().cloned().collect())
    }
}

/// How long a heartbeat woken by new work waits to gather more before publishing.
const EAGER_DEBOUNCE: Duration = Duration::from_millis(5);

/// Heartbeats a process's presence and answers its pings until `shutdown`, then
/// removes the presence.
pub async fn heartbeat(
    bus: Bus,
    agent_id: AgentId,
    role: Role,
    tracker: Tracker,
    config: LivenessConfig,
    shutdown: CancellationToken,
) {
    let names = bus.names().clone();
    let ping_subject = names.agent_ping(&agent_id);
    let mut pings = match bus.client.subscribe(ping_subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot answer pings; the watchdog will see this process only by its presence");
            return;
        }
    };
    let client = bus.client.clone();
    let answer = tokio::spawn(async move {
        while let Some(msg) = pings.next().await {
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, Bytes::from_static(b"pong")).await;
            }
        }
    });
    let subject = format!("$KV.{}.{agent_id}", names.bucket_agents());
    let ttl = Duration::from_secs(config.presence_ttl.as_secs().max(1));
    let started_ms = epoch_ms(SystemTime::now());
    loop {
        let generation = tracker.started.load(std::sync::atomic::Ordering::SeqCst);
        let presence = Presence {
            v: V1,
            agent_id: agent_id.clone(),
            role: role.clone(),
            ping_subject: ping_subject.clone(),
            started_ms,
            renewed_ms: epoch_ms(SystemTime::now()),
            in_flight: tracker.snapshot(),
        };
        let payload = Bytes::from(serde_json::to_vec(&presence).unwrap_or_default());
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload)
            .ttl(ttl);
        match bus.js.send_publish(subject.clone(), msg).await {
            Ok(ack) => match ack.await {
                Ok(_) => {
                    tracker.published.send_replace(generation);
                }
                Err(e) => tracing::warn!(error = %e, "presence not renewed"),
            },
            Err(e) => tracing::warn!(error = %e, "presence not renewed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(config.heartbeat_every) => {}
            _ = tracker.changed.notified() => {
                // Coalesce a burst of starts into one write.
                tokio::time::sleep(EAGER_DEBOUNCE).await;
            }
        }
    }
    answer.abort();
    if let Ok(store) = bus.js.get_key_value(names.bucket_agents()).await {
        let _ = store.delete(agent_id.as_str()).await;
    }
}

//! Presence: every process heartbeats a small record of itself into the `<p>-agents`
//! bucket (per-key TTL) and answers pings on its own subject while connected. The
//! watchdog in `serve` uses both to find dead, frozen and stuck processes and to
//! release their work at once.
//!
//! What a process is working on is found in two places. A worker's task attempt is
//! named by its claim in the task record (holder and ack subject), which the watchdog
//! indexes, so a worker writes nothing extra per task; its presence lists only tasks
//! that have made no progress for half the stuck timeout. `serve` lists every
//! orchestrator delivery it holds (no other record names their holder), written soon
//! after it starts and never awaited.

use std::collections::HashSet;
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
    /// How long a process's pings must keep getting "no responders" before its work is
    /// released as disconnected. One answer is not proof: when the cluster node a
    /// healthy process was connected to is lost, the process has no subscription until
    /// it has reconnected to another node. (After the watchdog's own connection was
    /// lost, the window is at least [`RECONNECT_GRACE`]: every process was cut off and
    /// reconnects on its own backoff.)
    #[serde(with = "humantime_serde")]
    pub disconnect_confirm: Duration,
    /// A task with no progress for this long is taken from its holder.
    #[serde(with = "humantime_serde")]
    pub stuck_timeout: Duration,
}

/// How long after the watchdog's own connection came back a "no responders" is not
/// taken as a disconnection: longer than the bus's reconnect backoff cap (8 s, see
/// `flotilla_bus`) plus a connect, since after a server restart every process
/// reconnects on its own schedule.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(10);

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            heartbeat_every: Duration::from_secs(5),
            presence_ttl: Duration::from_secs(20),
            probe_every: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            disconnect_confirm: Duration::from_secs(2),
            stuck_timeout: Duration::from_secs(60),
        }
    }
}

/// Which deliveries a process lists in its presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    /// Every delivery, written right away when work starts (`serve`: the orchestrator's
    /// deliveries have no other record that names their holder).
    All,
    /// Only those without progress for this long (workers: the task record's claim
    /// names the holder and the delivery, so the watchdog finds a dead worker's tasks
    /// there; the presence carries only what the stuck check needs).
    Overdue(Duration),
}

impl LivenessConfig {
    /// How long a worker's task goes without progress before its presence lists it: at
    /// least two renewals before the stuck timeout (so the watchdog sees it in time),
    /// and never under half the stuck timeout.
    pub fn list_after(&self) -> Duration {
        (self.stuck_timeout / 2).max(
            self.stuck_timeout
                .saturating_sub(self.heartbeat_every.saturating_mul(2)),
        )
    }
}

/// What this process is working on, shared between its handlers (which add and remove
/// entries) and its heartbeat (which publishes them). A plain mutex: every critical
/// section is one map operation, never held across an `.await`.
///
/// One pointer: every task's context holds a clone through its model call.
#[derive(Debug, Clone)]
pub struct Tracker(Arc<TrackerShared>);

#[derive(Debug)]
struct TrackerShared {
    set: Mutex<HashSet<Tracked>>,
    /// Wakes the heartbeat when work starts (listing `All`), so the presence lists it
    /// soon rather than at the next periodic renewal.
    changed: tokio::sync::Notify,
    listing: Listing,
    /// Whether the last listing was cut at [`PRESENCE_LIST_BUDGET`]. New work is then
    /// not listed by an early write (the oldest are listed first, so it would be cut
    /// too): it waits for the periodic renewal, which lists what room the ended work
    /// left.
    cut: std::sync::atomic::AtomicBool,
}

impl Default for Tracker {
    /// A tracker that lists every delivery (as `serve` does).
    fn default() -> Self {
        Self::listing(Listing::All)
    }
}

/// The most a presence record lists, in bytes of `in_flight` (estimated), so it stays
/// well under the server's 1 MiB payload limit whatever the load. Deliveries beyond it
/// (the newest) are recovered by their ack wait if the process dies.
pub const PRESENCE_LIST_BUDGET: usize = 512 * 1024;

impl Tracker {
    /// A tracker that lists only deliveries without progress for `after` (as workers
    /// do, with half the stuck timeout).
    pub fn overdue_after(after: Duration) -> Self {
        Self::listing(Listing::Overdue(after))
    }

    fn listing(listing: Listing) -> Self {
        Self(Arc::new(TrackerShared {
            set: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            listing,
            cut: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashSet<Tracked>) -> R) -> R {
        f(&mut self.0.set.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records the start of `work` on the delivery `ack` answers. Never waits: it
    /// wakes the heartbeat, which (listing every delivery) writes soon after,
    /// coalescing a burst, or (listing overdue ones) makes sure to look again when this
    /// one could be due. While the listing is cut at its budget it does not: the new
    /// work would not be listed.
    pub fn start(&self, ack: &flotilla_bus::AckHandle, work: InFlightWork) {
        let now = epoch_ms(SystemTime::now());
        self.start_at(ack.shared_subject(), work, now, now);
    }

    fn start_at(&self, ack: Arc<str>, work: InFlightWork, since_ms: u64, progress_ms: u64) {
        let (task_id, attempt) = work.task.map_or((None, 0), |(t, a)| (Some(t), a));
        self.with(|m| {
            m.replace(Tracked {
                ack,
                session_id: work.session_id,
                task_id,
                attempt,
                since_ms,
                progress_after: progress_after(since_ms, progress_ms),
            })
        });
        if !self.0.cut.load(std::sync::atomic::Ordering::Relaxed) {
            self.0.changed.notify_one();
        }
    }

    /// Records progress on a delivery.
    pub fn progress(&self, ack_subject: &str) {
        let now = epoch_ms(SystemTime::now());
        self.with(|m| {
            if let Some(mut i) = m.take(ack_subject) {
                i.progress_after = progress_after(i.since_ms, now);
                m.insert(i);
            }
        });
    }

    /// Records the end of work on a delivery.
    pub fn finish(&self, ack_subject: &str) {
        self.with(|m| m.remove(ack_subject));
    }

    /// How many deliveries are in flight.
    pub fn len(&self) -> usize {
        self.with(|m| m.len())
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How long until an item not yet listed becomes overdue (and must be listed), for
    /// a tracker listing overdue items only; never under a quarter of the threshold, so
    /// items turning overdue one by one are gathered into few writes.
    fn next_overdue(&self) -> Option<Duration> {
        let Listing::Overdue(after) = self.0.listing else {
            return None;
        };
        let now = epoch_ms(SystemTime::now());
        let after_ms = after.as_millis() as u64;
        self.with(|m| {
            m.iter()
                .map(|i| i.progress_ms().saturating_add(after_ms))
                .filter(|due| *due > now)
                .min()
        })
        .map(|due| Duration::from_millis(due - now + 1).max(after / 4))
    }

    /// What the presence of a process of `role` lists now: the deliveries this tracker
    /// lists, oldest first, within [`PRESENCE_LIST_BUDGET`] (a task's is listed with
    /// `role`).
    pub fn snapshot(&self, role: &Role) -> Vec<InFlight> {
        let now = epoch_ms(SystemTime::now());
        // Chosen by reference, and only what is listed is copied: `serve` lists every
        // delivery, and at 10,000 in flight copying them all at each write, to list
        // the oldest few thousand, was megabytes of short-lived copies a heartbeat.
        let (items, in_flight) = self.with(|m| {
            let mut items: Vec<&Tracked> = match self.0.listing {
                Listing::All => m.iter().collect(),
                Listing::Overdue(after) => {
                    let after = after.as_millis() as u64;
                    m.iter()
                        .filter(|i| now.saturating_sub(i.progress_ms()) >= after)
                        .collect()
                }
            };
            items.sort_by_key(|i| i.since_ms);
            let in_flight = items.len();
            let mut used = 0;
            let listed: Vec<InFlight> = items
                .into_iter()
                .take_while(|i| {
                    used += entry_size(i);
                    used <= PRESENCE_LIST_BUDGET
                })
                .map(|i| i.listed(role))
                .collect();
            (listed, in_flight)
        });
        // Said when it starts and when it ends, not at every write.
        let cut = items.len() < in_flight;
        let was_cut = self.0.cut.swap(cut, std::sync::atomic::Ordering::Relaxed);
        if cut && !was_cut {
            tracing::warn!(
                listed = items.len(),
                in_flight,
                "presence lists the oldest deliveries only, and is renewed only periodically; \
                 the rest rely on their ack wait"
            );
        } else if was_cut && !cut {
            tracing::info!(in_flight, "presence lists every delivery again");
        }
        items
    }
}

/// What a delivery in flight is for, as its presence entry lists it: the session, and
/// for a task its id and attempt. (A task's role is the process's, which its presence
/// names: it is not kept with each entry.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightWork {
    /// Session.
    pub session_id: flotilla_protocol::SessionId,
    /// Task and attempt, for a task's delivery.
    pub task: Option<(flotilla_protocol::TaskId, u32)>,
}

/// A delivery in flight, found by its ack subject: the set's key is the entry's own
/// field, which shares its text with the delivery's ack handle (not a copy).
///
/// 80 bytes: every delivery in flight has one (in a table about half again as large),
/// so its parts are kept flat, and its progress as an offset from its start.
#[derive(Debug)]
struct Tracked {
    ack: Arc<str>,
    session_id: flotilla_protocol::SessionId,
    /// For a task's delivery: its id, and the attempt (0 otherwise).
    task_id: Option<flotilla_protocol::TaskId>,
    attempt: u32,
    /// Milliseconds from `since_ms` to the last progress (saturating: 49 days).
    progress_after: u32,
    since_ms: u64,
}

/// `progress_ms` as an offset from `since_ms` (see [`Tracked`]).
fn progress_after(since_ms: u64, progress_ms: u64) -> u32 {
    u32::try_from(progress_ms.saturating_sub(since_ms)).unwrap_or(u32::MAX)
}

impl Tracked {
    /// When it last made progress (its start, if it has made none).
    fn progress_ms(&self) -> u64 {
        self.since_ms + u64::from(self.progress_after)
    }

    /// Its entry in a presence record of a process of `role`.
    fn listed(&self, role: &Role) -> InFlight {
        let task = self.task_id.as_ref();
        InFlight {
            session_id: self.session_id.clone(),
            task_id: task.cloned(),
            role: task.map(|_| role.clone()),
            attempt: task.map(|_| self.attempt),
            ack_subject: self.ack.to_string(),
            since_ms: self.since_ms,
            progress_ms: self.progress_ms(),
        }
    }
}

impl std::borrow::Borrow<str> for Tracked {
    fn borrow(&self) -> &str {
        &self.ack
    }
}

impl PartialEq for Tracked {
    fn eq(&self, other: &Self) -> bool {
        self.ack == other.ack
    }
}

impl Eq for Tracked {}

impl std::hash::Hash for Tracked {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so a lookup by `&str` finds it (`Borrow`'s contract).
        (*self.ack).hash(state);
    }
}

/// A generous estimate of an entry's JSON size.
fn entry_size(i: &Tracked) -> usize {
    i.ack.len()
        + i.session_id.as_str().len()
        + i.task_id.as_ref().map_or(0, |t| t.as_str().len())
        + 140
}

/// How long a heartbeat woken by new work waits to gather more before publishing:
/// 50 ms, plus 50 ms per thousand entries listed, so a process with many deliveries in
/// flight writes its (larger) record less often. A busy `serve` starts work every
/// millisecond or so, and each write is its whole list: at 5 ms it rewrote a 10 KB
/// record about 200 times a second in scenario A (a third of a message a session);
/// at 50 ms, 20. What it delays is only the listing of a delivery younger than that,
/// which a death in those milliseconds leaves to its ack wait.
fn eager_debounce(listed: usize) -> Duration {
    Duration::from_millis(50 + 50 * (listed as u64 / 1000))
}

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
    heartbeat_with(bus, agent_id, role, tracker, config, shutdown, None).await
}

/// [`heartbeat`], telling `first_written` once the first presence write was answered
/// (stored or refused): a process that waits for it before taking work is listed
/// before any claim of its can be seen, so the watchdog never meets its claims as
/// those of an unknown holder.
pub async fn heartbeat_with(
    bus: Bus,
    agent_id: AgentId,
    role: Role,
    tracker: Tracker,
    config: LivenessConfig,
    shutdown: CancellationToken,
    mut first_written: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let names = bus.names().clone();
    let ping_subject = names.agent_ping(&agent_id);
    let mut pings = match bus.subscribe(ping_subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot answer pings; the watchdog will see this process only by its presence");
            return;
        }
    };
    let answerer = bus.clone();
    let answer = tokio::spawn(async move {
        while let Some(msg) = pings.next().await {
            if let Some(reply) = msg.reply {
                let _ = answerer.respond(reply, Bytes::from_static(b"pong")).await;
            }
        }
    });
    let bucket = names.bucket_agents();
    let ttl = Duration::from_secs(config.presence_ttl.as_secs().max(1));
    let started_ms = epoch_ms(SystemTime::now());
    loop {
        let presence = Presence {
            v: V1,
            agent_id: agent_id.clone(),
            role: role.clone(),
            ping_subject: ping_subject.clone(),
            started_ms,
            renewed_ms: epoch_ms(SystemTime::now()),
            in_flight: tracker.snapshot(&role),
        };
        let listed = presence.in_flight.len();
        let payload = Bytes::from(serde_json::to_vec(&presence).unwrap_or_default());
        if let Err(e) = bus
            .put_expiring(&bucket, agent_id.as_str(), payload, ttl, None)
            .await
        {
            tracing::warn!(error = %e, "presence not renewed");
        }
        if let Some(tx) = first_written.take() {
            let _ = tx.send(());
        }
        // The periodic renewal, or sooner when a task turns overdue.
        let mut deadline = tokio::time::Instant::now()
            + tracker
                .next_overdue()
                .map_or(config.heartbeat_every, |d| d.min(config.heartbeat_every));
        let stop = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                _ = tokio::time::sleep_until(deadline) => break false,
                _ = tracker.0.changed.notified() => match tracker.0.listing {
                    Listing::All => {
                        // Coalesce a burst of starts into one write.
                        tokio::time::sleep(eager_debounce(listed)).await;
                        break false;
                    }
                    // New work turns overdue `after` from now at the earliest.
                    Listing::Overdue(after) => {
                        deadline = deadline.min(tokio::time::Instant::now() + after);
                    }
                },
            }
        };
        if stop {
            break;
        }
    }
    // The ping answerer stays up while the connection does: a process still draining
    // its work after shutdown must not look dead to a watchdog that pings the holder
    // of its claims.
    drop(answer);
    if let Ok(store) = bus.open_bucket(&bucket).await {
        let _ = store.delete(agent_id.as_str()).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use flotilla_protocol::SessionId;

    fn ack(n: usize) -> String {
        format!("$JS.ACK.FLOTILLA_INBOX_research.role-research.1.{n}.{n}.0.0")
    }

    fn start(t: &Tracker, n: usize, since_ms: u64, progress_ms: u64) {
        // (Even ones are tasks' deliveries, attempt 3.)
        let work = InFlightWork {
            session_id: SessionId::parse(format!("s{n}")).unwrap(),
            task: n
                .is_multiple_of(2)
                .then(|| (flotilla_protocol::TaskId::nth(n), 3)),
        };
        t.start_at(Arc::from(ack(n)), work, since_ms, progress_ms);
    }

    #[test]
    fn a_worker_lists_only_tasks_without_progress_for_the_threshold() {
        let t = Tracker::overdue_after(Duration::from_secs(10));
        let now = epoch_ms(SystemTime::now());
        start(&t, 1, now, now);
        start(&t, 2, now - 20_000, now - 20_000);
        start(&t, 3, now - 20_000, now - 1_000);
        let listed: Vec<InFlight> = t.snapshot(&Role::parse("research").unwrap());
        assert_eq!(
            listed,
            vec![InFlight {
                session_id: SessionId::parse("s2").unwrap(),
                task_id: Some(flotilla_protocol::TaskId::nth(2)),
                role: Some(Role::parse("research").unwrap()),
                attempt: Some(3),
                ack_subject: ack(2),
                since_ms: now - 20_000,
                progress_ms: now - 20_000,
            }]
        );
        assert_eq!(t.len(), 3);
        // Item 1 is due in about 10 s, item 3 in about 9 s.
        let next = t.next_overdue().unwrap();
        assert!(
            next > Duration::from_secs(8) && next <= Duration::from_millis(9_100),
            "{next:?}"
        );
        t.progress(&ack(1));
        t.finish(&ack(2));
        assert!(t.snapshot(&Role::parse("research").unwrap()).is_empty());
    }

    #[test]
    fn serve_lists_everything_oldest_first_within_the_budget() {
        let t = Tracker::default();
        let n = 20_000;
        for i in 0..n {
            start(&t, i, 1_000 + i as u64, 1_000 + i as u64);
        }
        assert!(t.next_overdue().is_none());
        let listed = t.snapshot(&Role::orchestrator());
        assert!(listed.len() < n, "{} of {n} fit", listed.len());
        assert!(listed.len() > 1_000);
        assert!(listed.windows(2).all(|w| w[0].since_ms < w[1].since_ms));
        assert_eq!(listed[0].since_ms, 1_000);
        // Written as a presence, it stays under the server's payload limit.
        let p = Presence {
            v: V1,
            agent_id: AgentId::parse("orchestrator-1").unwrap(),
            role: Role::orchestrator(),
            ping_subject: "flotilla.agent.orchestrator-1.ping".into(),
            started_ms: 0,
            renewed_ms: 0,
            in_flight: listed,
        };
        let bytes = serde_json::to_vec(&p).unwrap().len();
        assert!(bytes <= PRESENCE_LIST_BUDGET + 1024, "{bytes} bytes");
    }

    #[test]
    fn new_work_wakes_the_heartbeat_only_while_the_listing_is_whole() {
        use futures::FutureExt;
        let woken = |t: &Tracker| t.0.changed.notified().now_or_never().is_some();
        let role = Role::orchestrator();
        let t = Tracker::default();
        start(&t, 0, 1_000, 1_000);
        assert!(woken(&t), "new work is listed soon");
        let n = 20_000;
        for i in 1..n {
            start(&t, i, 1_000 + i as u64, 1_000 + i as u64);
        }
        woken(&t);
        assert!(t.snapshot(&role).len() < n, "the listing is cut");
        // The newest is cut first: an early write would not list it.
        start(&t, n, 900_000, 900_000);
        assert!(!woken(&t), "new work past the cut wakes nothing");
        for i in 0..n {
            t.finish(&ack(i));
        }
        // The periodic renewal lists what is left, whole again.
        assert_eq!(t.snapshot(&role).len(), 1);
        start(&t, n + 1, 900_001, 900_001);
        assert!(woken(&t), "new work is listed soon again");
    }

    #[test]
    fn a_tracked_delivery_stays_80_bytes() {
        // Every delivery in flight has one, in a table about half again as large.
        assert!(size_of::<Tracked>() <= 80, "{}", size_of::<Tracked>());
    }

    #[test]
    fn the_listing_threshold_leaves_two_renewals_before_the_stuck_timeout() {
        let d = LivenessConfig::default();
        assert_eq!(d.list_after(), Duration::from_secs(50));
        let fast = LivenessConfig {
            stuck_timeout: Duration::from_secs(1),
            ..LivenessConfig::default()
        };
        assert_eq!(fast.list_after(), Duration::from_millis(500));
    }
}

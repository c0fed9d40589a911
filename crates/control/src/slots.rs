//! Admission slots: the bounded session pool shared by every `serve` instance.
//!
//! The pool is `pool_size` keys `slot.<n>` in the slots bucket. Taking a slot is a
//! compare-and-set on the key's last revision as this instance saw it (0 for a key never
//! written, else the delete marker its release left), which fails if the key was taken
//! since, so two instances can never hand out the same slot, and load spreads over many
//! keys instead of one hot counter. Each instance keeps a local view of which slots are
//! taken and at which revision, fed by a KV watcher, so it picks a free-looking slot at
//! random and needs one message in the common case. (A KV `create` costs three on a
//! slot used before: the refused write, a read that finds the delete marker, and the
//! write on the marker's revision. It is the fallback when the view lags.)
//! When the view says every slot is taken the answer is an explicit "full" with a
//! `retry_after_ms` estimated from how fast slots are being freed.
//!
//! A slot is released when its session ends. A slot whose session record is missing
//! or ended (an instance crashed between taking the slot and opening the session, or
//! before releasing it) is reclaimed by [`SlotTable::reconcile`], which also reports
//! sessions stuck in planning so their `start` can be re-sent.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flotilla_bus::{Bus, KvError};
use flotilla_protocol::subject::keys;
use flotilla_protocol::{SessionId, SessionRecord, SessionStatus, epoch_ms};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// What a slot key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotValue {
    /// Protocol version (1).
    pub v: flotilla_protocol::V1,
    /// The session holding the slot.
    pub session_id: SessionId,
    /// When it was taken, ms since the Unix epoch.
    pub taken_ms: u64,
}

/// No slot could be taken.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Every slot is taken: retry after the given delay.
    #[error("the session pool is full ({size} sessions); retry after {retry_after_ms} ms")]
    Full {
        /// Pool size.
        size: u32,
        /// Suggested wait.
        retry_after_ms: u64,
    },
    /// The slots bucket could not be reached.
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// What a reconciliation pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Slots given back.
    pub reclaimed: u32,
    /// Sessions still planning long after admission.
    pub stuck_planning: Vec<SessionId>,
    /// Sessions not ended past their deadline (ms since the epoch).
    pub past_deadline: Vec<(SessionId, u64)>,
    /// Questions still waiting for a person past their wait: the timeout to send.
    pub input_timed_out: Vec<flotilla_protocol::InputMessage>,
}

/// The local view: which slots look taken, and how fast slots are freed.
///
/// Shared between the watcher task (writes) and admission handlers (reads and
/// optimistic marks) through one mutex with tiny critical sections and no `.await`
/// inside: the authoritative state is the bucket, this is only a hint.
#[derive(Debug)]
struct View {
    taken: Vec<bool>,
    /// The last revision of each slot's key seen (a value or a delete marker), 0 for
    /// none: what taking the slot expects the key to be at.
    revision: Vec<u64>,
    /// Who holds each taken slot and since when, as the watcher saw it (what the
    /// reconciler looks at without reading the slot).
    held: Vec<Option<(SessionId, u64)>>,
    count: u32,
    /// Exponentially weighted interval between frees, in ms.
    free_interval_ms: Option<f64>,
    last_free: Option<Instant>,
}

impl View {
    fn set(&mut self, n: u32, taken: bool) {
        let Some(t) = self.taken.get_mut(n as usize) else {
            return;
        };
        if *t == taken {
            return;
        }
        *t = taken;
        if taken {
            self.count += 1;
            return;
        }
        self.count -= 1;
        let now = Instant::now();
        if let Some(prev) = self.last_free {
            let ms = now.duration_since(prev).as_secs_f64() * 1000.0;
            self.free_interval_ms = Some(match self.free_interval_ms {
                Some(avg) => 0.8 * avg + 0.2 * ms,
                None => ms,
            });
        }
        self.last_free = Some(now);
    }
}

/// The session pool.
#[derive(Debug, Clone)]
pub struct SlotTable {
    bus: Bus,
    size: u32,
    default_retry_after_ms: u64,
    view: Arc<Mutex<View>>,
}

/// Floor of `retry_after_ms`.
const RETRY_AFTER_MIN_MS: u64 = 100;

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(epoch_ms(SystemTime::now()));
    h.finish()
}

impl SlotTable {
    /// A table of `size` slots. Call [`SlotTable::watch`] to keep the view current.
    pub fn new(bus: Bus, size: u32, default_retry_after_ms: u64) -> Self {
        Self {
            bus,
            size: size.max(1),
            default_retry_after_ms,
            view: Arc::new(Mutex::new(View {
                taken: vec![false; size.max(1) as usize],
                revision: vec![0; size.max(1) as usize],
                held: vec![None; size.max(1) as usize],
                count: 0,
                free_interval_ms: None,
                last_free: None,
            })),
        }
    }

    fn with_view<R>(&self, f: impl FnOnce(&mut View) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update of a hint: keep going.
        let mut g = self.view.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Slots that look taken.
    pub fn taken(&self) -> u32 {
        self.with_view(|v| v.count)
    }

    /// Keeps the local view in step with the bucket until `shutdown`. Returns once the
    /// initial state has been loaded (the watch goes on in a spawned task).
    pub async fn watch(&self, shutdown: CancellationToken) -> Result<(), KvError> {
        let store = self.bus.slots().store().clone();
        let mut watch =
            store
                .watch_with_history("slot.>")
                .await
                .map_err(|e| KvError::Unavailable {
                    key: "slot.>".into(),
                    source: Box::new(e),
                })?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        // An empty bucket sends no history: consider the view loaded after a short wait.
        let initially_empty = store
            .status()
            .await
            .map(|s| s.values() == 0)
            .unwrap_or(false);
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            if initially_empty && let Some(tx) = ready_tx.take() {
                let _ = tx.send(());
            }
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    n = watch.next() => n,
                };
                match next {
                    None => break,
                    Some(Ok(entry)) => {
                        if let Some(n) = keys::parse_slot(&entry.key) {
                            let taken =
                                entry.operation == async_nats::jetstream::kv::Operation::Put;
                            let held = taken
                                .then(|| {
                                    flotilla_protocol::decode::<SlotValue>(
                                        &entry.value,
                                        flotilla_protocol::DEFAULT_MAX_PAYLOAD,
                                    )
                                    .ok()
                                })
                                .flatten()
                                .map(|s| (s.session_id, s.taken_ms));
                            this.with_view(|v| {
                                v.set(n, taken);
                                if let Some(r) = v.revision.get_mut(n as usize) {
                                    *r = entry.revision;
                                }
                                if let Some(h) = v.held.get_mut(n as usize) {
                                    *h = held;
                                }
                            });
                        }
                        if entry.delta == 0
                            && let Some(tx) = ready_tx.take()
                        {
                            let _ = tx.send(());
                        }
                    }
                    // Heartbeat misses after a server restart: the watcher recovers.
                    Some(Err(e)) => tracing::debug!(error = %e, "slot watch hiccup"),
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
        Ok(())
    }

    /// Suggested wait before retrying when full: the observed interval between frees
    /// (so a client retrying after it likely finds a slot), jittered, clamped to
    /// 100 ms - 30 s so a crowd of waiting clients cannot flood admission.
    pub fn retry_after_ms(&self) -> u64 {
        let observed = self.with_view(|v| v.free_interval_ms);
        let ms = observed
            .map(|m| m.ceil() as u64)
            .unwrap_or(self.default_retry_after_ms);
        // Jitter (±25%) so rejected clients do not come back in lockstep.
        let jittered = ms as f64 * (0.75 + 0.5 * (random_u64() % 1000) as f64 / 1000.0);
        (jittered as u64).clamp(RETRY_AFTER_MIN_MS, 30_000)
    }

    /// Takes a free slot for `session`: its number and the revision of its key.
    pub async fn acquire(&self, session: &SessionId) -> Result<(u32, u64), SlotError> {
        let value = SlotValue {
            v: flotilla_protocol::V1,
            session_id: session.clone(),
            taken_ms: epoch_ms(SystemTime::now()),
        };
        for _ in 0..8 {
            let start = (random_u64() % u64::from(self.size)) as u32;
            let candidate = self.with_view(|v| {
                (0..self.size)
                    .map(|i| (start + i) % self.size)
                    .find(|n| !v.taken[*n as usize])
                    .inspect(|n| v.set(*n, true))
                    .map(|n| (n, v.revision[n as usize]))
            });
            let Some((n, seen)) = candidate else { break };
            let key = keys::slot(n);
            let taken = match self.bus.slots().update(&key, &value, seen).await {
                // Written since this view saw it (the watcher lags): taken, or released
                // again. A `create` tells which (a read of the key) and takes it if it
                // is free.
                Err(KvError::Conflict { .. }) => self.bus.slots().create(&key, &value).await,
                other => other,
            };
            match taken {
                Ok(rev) => return Ok((n, rev)),
                Err(KvError::Exists { .. } | KvError::Conflict { .. }) => continue,
                Err(e) => {
                    self.with_view(|v| v.set(n, false));
                    return Err(e.into());
                }
            }
        }
        Err(SlotError::Full {
            size: self.size,
            retry_after_ms: self.retry_after_ms(),
        })
    }

    /// Gives slot `n` back, if `session` still holds it.
    pub async fn release(&self, n: u32, session: &SessionId) -> Result<(), KvError> {
        release(&self.bus, n, session).await
    }

    /// Reclaims slots whose session ended or never got a record (crash leaks), if
    /// taken longer ago than `grace`, and finds sessions still planning after `grace`
    /// (their `start` may have been lost to a crash) for the caller to restart.
    ///
    /// It reads no slot: the watcher's view says who holds each one, since when, and at
    /// which revision (a delete at a revision the view has not caught up with is
    /// refused, harmlessly). So a pass reads only the records of the sessions holding
    /// slots longer than `grace`.
    pub async fn reconcile(&self, grace: Duration) -> Result<Reconciled, KvError> {
        let now = epoch_ms(SystemTime::now());
        let old: Vec<(u32, SessionId, u64)> = self.with_view(|v| {
            (0..self.size)
                .filter_map(|n| {
                    let i = n as usize;
                    let (session, taken_ms) = v.held[i].as_ref().filter(|_| v.taken[i])?;
                    (now.saturating_sub(*taken_ms) >= grace.as_millis() as u64)
                        .then(|| (n, session.clone(), v.revision[i]))
                })
                .collect()
        });
        let mut out = Reconciled::default();
        for (n, session, rev) in old {
            let key = keys::slot(n);
            let record = self
                .bus
                .sessions()
                .get_current::<SessionRecord>(&keys::session(&session), |_| true)
                .await?;
            let dead = match record {
                None => true,
                Some((r, _)) => {
                    if r.status == SessionStatus::Planning && r.slot == n {
                        out.stuck_planning.push(r.session_id.clone());
                    }
                    if let Some(d) = r.deadline_ms.filter(|d| *d <= now)
                        && !r.status.is_terminal()
                        && r.slot == n
                    {
                        out.past_deadline.push((r.session_id.clone(), d));
                    }
                    for t in r.tasks.iter().filter(|t| {
                        t.state == flotilla_protocol::TaskState::AwaitingInput
                            && t.input_deadline_ms.is_some_and(|d| d <= now)
                    }) {
                        out.input_timed_out.push(flotilla_protocol::InputMessage {
                            v: flotilla_protocol::V1,
                            session_id: r.session_id.clone(),
                            task_id: t.task_id.clone(),
                            attempt: t.attempt,
                            answer: None,
                        });
                    }
                    r.status.is_terminal() || r.slot != n
                }
            };
            if dead && self.bus.slots().delete(&key, Some(rev)).await.is_ok() {
                tracing::info!(slot = n, session = %session, "reclaimed leaked slot");
                out.reclaimed += 1;
            }
        }
        Ok(out)
    }
}

/// Gives back slot `n`, taken at `revision`: one delete that succeeds only while the
/// key is still at that revision (this session's); a conflict means it was released
/// already (and maybe taken again). Idempotent.
pub async fn release_taken(bus: &Bus, n: u32, revision: u64) -> Result<(), KvError> {
    match bus.slots().delete(&keys::slot(n), Some(revision)).await {
        Ok(()) | Err(KvError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives slot `n` back if `session` still holds it (idempotent).
pub async fn release(bus: &Bus, n: u32, session: &SessionId) -> Result<(), KvError> {
    let key = keys::slot(n);
    match bus.slots().get::<SlotValue>(&key).await? {
        Some((slot, rev)) if &slot.session_id == session => {
            match bus.slots().delete(&key, Some(rev)).await {
                Ok(()) | Err(KvError::Conflict { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        }
        _ => Ok(()),
    }
}

//! Shared memory: a session's scratchpad in the `<p>-memory` KV bucket, changed only
//! by compare-and-set, plus timed locks with fencing tokens in `<p>-locks`.
//!
//! An agent never names a session: the runtime hands it a [`SessionMemory`] bound to
//! its own session, whose methods take only a [`MemKey`] (one subject token, so it can
//! never reach into another session's `<sid>.` key space).
//!
//! - [`SessionMemory::get`] returns the value with its revision.
//! - [`SessionMemory::compare_and_set`] writes only if the revision is still the one read.
//! - [`SessionMemory::update_with`] re-reads and re-applies a merge function on conflict,
//!   with bounded, jittered retries: the tool for concurrent writers (no lost updates).
//! - [`SessionMemory::lock`] is for the rare case merge cannot serve: a timed lock
//!   (ceiling 5 s by default) with a fencing token; a write guarded by an expired lock is
//!   rejected, and a crashed holder's lock expires by itself (per-key TTL).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::kv::{KvError, wrong_last_sequence};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use flotilla_protocol::{Namespace, SessionId, subject::keys};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Retries of a conflicting compare-and-set: full jitter, so writers that collided do
/// not collide again in step.
const CAS_BACKOFF: flotilla_protocol::Backoff =
    flotilla_protocol::Backoff::exponential(Duration::from_millis(2), Duration::from_millis(64))
        .with_jitter(flotilla_protocol::Jitter::Full);

/// A shared-memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The key is not one token of `A-Z a-z 0-9 _ -` (at most 64): fix the key.
    #[error("invalid memory key {0:?}: use 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")]
    InvalidKey(String),
    /// The session template declares its keys, and this is not one of them.
    #[error("memory key {0:?} is not declared by the session template")]
    UndeclaredKey(String),
    /// The value does not have the type the template declares for the key.
    #[error("memory key {key:?} holds {expected:?} values, not this one")]
    WrongType {
        /// The key.
        key: String,
        /// The declared kind.
        expected: ValueKind,
    },
    /// The key changed since the revision given: re-read and retry (or use `update_with`).
    #[error("memory key {0:?} changed since the revision read")]
    Conflict(String),
    /// `create` on a key that holds a value.
    #[error("memory key {0:?} already exists")]
    Exists(String),
    /// `update_with` kept conflicting for its whole retry budget: the key is too hot.
    #[error("memory key {key:?} is contended: {attempts} attempts all conflicted")]
    Contended {
        /// The key.
        key: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The lock is held by someone else and did not free up in time.
    #[error("lock {0:?} is held")]
    LockHeld(String),
    /// The lock guarding this write has expired (or was taken over): the write was not made.
    #[error("lock {0:?} expired before the guarded write")]
    LockExpired(String),
    /// The stored value does not decode as the requested type.
    #[error("memory key {key:?} does not hold that type: {detail}")]
    Decode {
        /// The key.
        key: String,
        /// The serde error.
        detail: String,
    },
    /// The bucket could not be reached: retry later.
    #[error("memory bucket unavailable: {0}")]
    Unavailable(String),
}

/// The kinds of value a session template can declare for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// A JSON string.
    String,
    /// A JSON number.
    Number,
    /// A JSON boolean.
    Bool,
    /// A JSON array.
    List,
    /// A JSON object.
    Object,
    /// Anything.
    Any,
}

impl ValueKind {
    fn admits(self, v: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        matches!(
            (self, v),
            (ValueKind::Any, _)
                | (ValueKind::String, V::String(_))
                | (ValueKind::Number, V::Number(_))
                | (ValueKind::Bool, V::Bool(_))
                | (ValueKind::List, V::Array(_))
                | (ValueKind::Object, V::Object(_))
        )
    }
}

/// A session template's declared memory keys. Empty: any key, any value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemorySchema(pub BTreeMap<String, ValueKind>);

/// A validated memory key: one subject token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemKey(String);

impl MemKey {
    /// Validates `key`.
    pub fn parse(key: &str) -> Result<Self, MemoryError> {
        let ok = !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(key.to_owned()))
        } else {
            Err(MemoryError::InvalidKey(key.chars().take(80).collect()))
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A value with the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its revision: pass it to `compare_and_set`.
    pub revision: u64,
}

/// Counters of memory traffic (process-wide).
#[derive(Debug, Default)]
pub struct MemoryCounters {
    /// Compare-and-set (or create) attempts.
    pub cas_attempts: AtomicU64,
    /// Attempts that lost to a concurrent writer.
    pub conflicts: AtomicU64,
    /// `update_with` re-reads after a conflict.
    pub retries: AtomicU64,
    /// Times a lock request had to wait for a holder.
    pub lock_waits: AtomicU64,
    /// Guarded writes refused because their lock had expired.
    pub lock_expiries: AtomicU64,
}

pub use flotilla_protocol::MemoryStats;

impl MemoryCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> MemoryStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MemoryStats {
            cas_attempts: r(&self.cas_attempts),
            conflicts: r(&self.conflicts),
            retries: r(&self.retries),
            lock_waits: r(&self.lock_waits),
            lock_expiries: r(&self.lock_expiries),
        }
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Limits of memory operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Attempts `update_with` makes before reporting the key as contended.
    pub max_attempts: u32,
    /// Longest a lock may be held (requests for longer are capped).
    #[serde(with = "humantime_serde")]
    pub lock_ceiling: Duration,
    /// Declared keys and their kinds; empty allows any key.
    pub schema: MemorySchema,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 16,
            lock_ceiling: Duration::from_secs(5),
            schema: MemorySchema::default(),
        }
    }
}

/// The memory and locks buckets. Hands out [`SessionMemory`] handles. Cheap to clone
/// (one pointer).
#[derive(Clone)]
pub struct Memory(Arc<MemoryInner>);

impl std::ops::Deref for Memory {
    type Target = MemoryInner;
    fn deref(&self) -> &MemoryInner {
        &self.0
    }
}

/// What a [`Memory`] holds.
pub struct MemoryInner {
    js: jetstream::Context,
    store: kv::Store,
    /// The same bucket as typed records, for batched reads (`scan`).
    records: crate::kv::Records,
    locks: kv::Store,
    locks_bucket: String,
    config: Arc<MemoryConfig>,
    counters: Arc<crate::metrics::Counters>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").finish_non_exhaustive()
    }
}

impl Memory {
    pub(crate) async fn open(
        js: &jetstream::Context,
        ns: &Namespace,
        config: MemoryConfig,
        counters: Arc<crate::metrics::Counters>,
    ) -> Result<Self, MemoryError> {
        let open = |b: String| {
            let js = js.clone();
            async move {
                js.get_key_value(&b)
                    .await
                    .map_err(|e| MemoryError::Unavailable(e.to_string()))
            }
        };
        let store = open(ns.bucket_memory()).await?;
        Ok(Self(Arc::new(MemoryInner {
            js: js.clone(),
            records: crate::kv::Records::new(store.clone(), js.clone(), 1 << 20),
            store,
            locks: open(ns.bucket_locks()).await?,
            locks_bucket: ns.bucket_locks(),
            config: Arc::new(config),
            counters,
        })))
    }

    /// A handle on `session`'s memory. The runtime calls this for the session of the
    /// task it is running; agents only ever receive the handle.
    pub fn session(&self, session: &SessionId) -> SessionMemory {
        SessionMemory {
            mem: self.clone(),
            session: session.clone(),
            local: std::sync::OnceLock::new(),
        }
    }

    /// Counters (shared with the bus's other counters).
    pub fn stats(&self) -> MemoryStats {
        self.counters.memory.snapshot()
    }
}

/// One session's memory. Every method addresses this session's keys only.
pub struct SessionMemory {
    mem: Memory,
    session: SessionId,
    /// This handle's traffic, shared with its clones. Made at its first count (or
    /// clone): every task is handed a handle and holds it through its model calls,
    /// and most never use it.
    local: std::sync::OnceLock<Arc<MemoryCounters>>,
}

impl Clone for SessionMemory {
    fn clone(&self) -> Self {
        Self {
            mem: self.mem.clone(),
            session: self.session.clone(),
            local: std::sync::OnceLock::from(self.local().clone()),
        }
    }
}

impl std::fmt::Debug for SessionMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionMemory")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// A held timed lock. Its `token` (the lock entry's revision) fences writes: a write
/// guarded by a lock that expired or was taken over is rejected.
#[derive(Debug, Clone)]
pub struct LockGuard {
    name: MemKey,
    /// The fencing token.
    pub token: u64,
    expires_at: tokio::time::Instant,
}

impl LockGuard {
    /// When the lock expires.
    pub fn expires_at(&self) -> tokio::time::Instant {
        self.expires_at
    }
}

/// A guarded write needs at least this much of the lock left, so the lock cannot expire
/// between the check and the write landing.
const GUARD_MARGIN: Duration = Duration::from_millis(250);

impl SessionMemory {
    /// The session this handle belongs to.
    pub fn session(&self) -> &SessionId {
        &self.session
    }

    /// This handle's own traffic (the process-wide totals are in [`Memory::stats`]).
    pub fn stats(&self) -> MemoryStats {
        self.local
            .get()
            .map_or_else(MemoryStats::default, |c| c.snapshot())
    }

    /// This handle's counters (made at the first use).
    fn local(&self) -> &Arc<MemoryCounters> {
        self.local.get_or_init(Arc::default)
    }

    /// Counts one event, in this handle and process-wide.
    fn count(&self, pick: fn(&MemoryCounters) -> &AtomicU64) {
        inc(pick(&self.mem.counters.memory));
        inc(pick(self.local()));
    }

    fn key(&self, key: &MemKey) -> String {
        keys::memory(&self.session, key.as_str())
    }

    fn check<T: Serialize>(&self, key: &MemKey, value: &T) -> Result<Bytes, MemoryError> {
        let encode_error = |e: serde_json::Error| MemoryError::Decode {
            key: key.0.clone(),
            detail: e.to_string(),
        };
        let schema = &self.mem.config.schema.0;
        if schema.is_empty() {
            // No template: serialize once, straight to bytes (the hot path).
            return serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(encode_error);
        }
        let json = serde_json::to_value(value).map_err(encode_error)?;
        let kind = schema
            .get(key.as_str())
            .ok_or_else(|| MemoryError::UndeclaredKey(key.0.clone()))?;
        if !kind.admits(&json) {
            return Err(MemoryError::WrongType {
                key: key.0.clone(),
                expected: *kind,
            });
        }
        serde_json::to_vec(&json)
            .map(Bytes::from)
            .map_err(encode_error)
    }

    /// The value at `key` with its revision, or `None` (through [`crate::Records::get`],
    /// which asks the stream leader when a direct get goes unanswered).
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &MemKey,
    ) -> Result<Option<Versioned<T>>, MemoryError> {
        match self.mem.records.get::<T>(&self.key(key)).await {
            Ok(found) => Ok(found.map(|(value, revision)| Versioned { value, revision })),
            Err(KvError::Corrupt { source, .. }) => Err(MemoryError::Decode {
                key: key.0.clone(),
                detail: source.to_string(),
            }),
            Err(e) => Err(MemoryError::Unavailable(e.to_string())),
        }
    }

    /// Every key of this session whose name starts with `prefix`, with its value and
    /// revision, in one request (a batched direct get of the session's keys; at most
    /// 256). Keys whose value does not decode as `T` are left out.
    pub async fn scan<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Versioned<T>)>, MemoryError> {
        let records = &self.mem.records;
        let all = records
            .get_matching::<serde_json::Value>(&keys::memory(&self.session, "*"))
            .await
            .map_err(|e| MemoryError::Unavailable(e.to_string()))?;
        let own = format!("{}.", self.session);
        let mut out: Vec<(String, Versioned<T>)> = all
            .into_iter()
            .filter_map(|(key, value, revision)| {
                let name = key.strip_prefix(&own)?;
                if !name.starts_with(prefix) {
                    return None;
                }
                let value = serde_json::from_value(value).ok()?;
                Some((name.to_owned(), Versioned { value, revision }))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Creates `key`; [`MemoryError::Exists`] if it holds a value.
    pub async fn create<T: Serialize>(&self, key: &MemKey, value: &T) -> Result<u64, MemoryError> {
        let bytes = self.check(key, value)?;
        self.count(|c| &c.cas_attempts);
        match self.mem.store.create(self.key(key), bytes).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists || wrong_last_sequence(&e) => {
                self.count(|c| &c.conflicts);
                metrics::counter!("flotilla_cas_conflicts_total", "bucket" => "memory")
                    .increment(1);
                crate::trace::span_event(
                    "cas_conflict",
                    vec![crate::trace::KeyValue::new("flotilla.bucket", "memory")],
                );
                Err(MemoryError::Exists(key.0.clone()))
            }
            Err(e) => Err(MemoryError::Unavailable(e.to_string())),
        }
    }

    /// Writes `value` if `key` is still at `revision`; [`MemoryError::Conflict`] if not.
    pub async fn compare_and_set<T: Serialize>(
        &self,
        key: &MemKey,
        revision: u64,
        value: &T,
    ) -> Result<u64, MemoryError> {
        let bytes = self.check(key, value)?;
        self.count(|c| &c.cas_attempts);
        match self.mem.store.update(self.key(key), bytes, revision).await {
            Ok(rev) => Ok(rev),
            Err(e)
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision
                    || wrong_last_sequence(&e) =>
            {
                self.count(|c| &c.conflicts);
                metrics::counter!("flotilla_cas_conflicts_total", "bucket" => "memory")
                    .increment(1);
                crate::trace::span_event(
                    "cas_conflict",
                    vec![crate::trace::KeyValue::new("flotilla.bucket", "memory")],
                );
                Err(MemoryError::Conflict(key.0.clone()))
            }
            Err(e) => Err(MemoryError::Unavailable(e.to_string())),
        }
    }

    /// Deletes `key` if it is still at `revision`.
    pub async fn delete(&self, key: &MemKey, revision: u64) -> Result<(), MemoryError> {
        match self
            .mem
            .store
            .delete_expect_revision(self.key(key), Some(revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e)
                if e.kind() == kv::DeleteErrorKind::WrongLastRevision
                    || wrong_last_sequence(&e) =>
            {
                self.count(|c| &c.conflicts);
                metrics::counter!("flotilla_cas_conflicts_total", "bucket" => "memory")
                    .increment(1);
                crate::trace::span_event(
                    "cas_conflict",
                    vec![crate::trace::KeyValue::new("flotilla.bucket", "memory")],
                );
                Err(MemoryError::Conflict(key.0.clone()))
            }
            Err(e) => Err(MemoryError::Unavailable(e.to_string())),
        }
    }

    /// Reads `key`, applies `merge` to its value (`None` when absent), and writes the
    /// result by compare-and-set; on a conflict, re-reads and merges again, after a
    /// jittered exponential backoff, up to the configured attempts. `merge` may run
    /// several times, so it must be a pure function of its input.
    pub async fn update_with<T, F>(
        &self,
        key: &MemKey,
        mut merge: F,
    ) -> Result<Versioned<T>, MemoryError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> T,
    {
        let attempts = self.mem.config.max_attempts.max(1);
        for attempt in 0..attempts {
            if attempt > 0 {
                self.count(|c| &c.retries);
                // Full jitter over an exponential ceiling (2 ms .. 64 ms).
                tokio::time::sleep(CAS_BACKOFF.delay(attempt - 1)).await;
            }
            let current = self.get::<T>(key).await?;
            let (old, revision) = match current {
                Some(v) => (Some(v.value), Some(v.revision)),
                None => (None, None),
            };
            let new = merge(old);
            let written = match revision {
                Some(rev) => self.compare_and_set(key, rev, &new).await,
                None => self.create(key, &new).await,
            };
            match written {
                Ok(revision) => {
                    return Ok(Versioned {
                        value: new,
                        revision,
                    });
                }
                Err(MemoryError::Conflict(_) | MemoryError::Exists(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(MemoryError::Contended {
            key: key.0.clone(),
            attempts,
        })
    }

    /// Acquires the lock `name` for `hold` (capped at the configured ceiling, at least
    /// 1 s: the server's TTL granularity), waiting up to `wait` for a holder to release
    /// it or for its lock to expire.
    pub async fn lock(
        &self,
        name: &MemKey,
        hold: Duration,
        wait: Duration,
    ) -> Result<LockGuard, MemoryError> {
        let hold = hold
            .min(self.mem.config.lock_ceiling)
            .max(Duration::from_secs(1));
        // Whole seconds: the server's per-key TTL granularity.
        let hold = Duration::from_secs(hold.as_secs_f64().ceil() as u64);
        let key = self.key(name);
        let subject = format!("$KV.{}.{key}", self.mem.locks_bucket);
        let deadline = tokio::time::Instant::now() + wait;
        let mut waited = false;
        loop {
            let entry = self
                .mem
                .locks
                .entry(&key)
                .await
                .map_err(|e| MemoryError::Unavailable(e.to_string()))?;
            let free_after = match &entry {
                Some(e) if e.operation == kv::Operation::Put => None,
                Some(e) => Some(e.revision),
                None => Some(0),
            };
            if let Some(last) = free_after {
                // Not `create_with_ttl`: it drops the TTL when the key's last entry is a
                // delete or purge marker (so a crashed holder's lock would never expire).
                // Publish with the expected last sequence and the TTL ourselves.
                let started = tokio::time::Instant::now();
                let msg = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(format!("{{\"session\":\"{}\"}}", self.session)))
                    .expected_last_subject_sequence(last)
                    .ttl(hold);
                let ack = match self.mem.js.send_publish(subject.clone(), msg).await {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                match ack {
                    Ok(ack) => {
                        return Ok(LockGuard {
                            name: name.clone(),
                            token: ack.sequence,
                            expires_at: started + hold,
                        });
                    }
                    Err(e)
                        if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence
                            || wrong_last_sequence(&e) => {}
                    Err(e) => return Err(MemoryError::Unavailable(e.to_string())),
                }
            }
            if !waited {
                waited = true;
                self.count(|c| &c.lock_waits);
                metrics::counter!("flotilla_lock_waits_total").increment(1);
                crate::trace::span_event(
                    "lock_wait",
                    vec![crate::trace::KeyValue::new("flotilla.lock", name.0.clone())],
                );
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MemoryError::LockHeld(name.0.clone()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes `value` at `key` only while `guard` still holds its lock: refused with
    /// [`MemoryError::LockExpired`] once the lock has expired or been taken over.
    pub async fn set_guarded<T: Serialize>(
        &self,
        guard: &LockGuard,
        key: &MemKey,
        value: &T,
    ) -> Result<u64, MemoryError> {
        let bytes = self.check(key, value)?;
        let expired = || {
            self.count(|c| &c.lock_expiries);
            metrics::counter!("flotilla_lock_expiries_total").increment(1);
            crate::trace::span_event(
                "lock_expired",
                vec![crate::trace::KeyValue::new(
                    "flotilla.lock",
                    guard.name.0.clone(),
                )],
            );
            MemoryError::LockExpired(guard.name.0.clone())
        };
        if tokio::time::Instant::now() + GUARD_MARGIN >= guard.expires_at {
            return Err(expired());
        }
        let entry = self
            .mem
            .locks
            .entry(self.key(&guard.name))
            .await
            .map_err(|e| MemoryError::Unavailable(e.to_string()))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put && e.revision == guard.token => {}
            _ => return Err(expired()),
        }
        self.count(|c| &c.cas_attempts);
        self.mem
            .store
            .put(self.key(key), bytes)
            .await
            .map_err(|e| MemoryError::Unavailable(e.to_string()))
    }

    /// Releases the lock if `guard` still holds it.
    pub async fn unlock(&self, guard: LockGuard) -> Result<(), MemoryError> {
        match self
            .mem
            .locks
            .delete_expect_revision(self.key(&guard.name), Some(guard.token))
            .await
        {
            Ok(()) => Ok(()),
            Err(e)
                if e.kind() == kv::DeleteErrorKind::WrongLastRevision
                    || wrong_last_sequence(&e) =>
            {
                Ok(())
            }
            Err(e) => Err(MemoryError::Unavailable(e.to_string())),
        }
    }
}

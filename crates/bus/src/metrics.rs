//! Process-wide message counters, shared by every component of a process through an
//! `Arc` (atomics only: no lock, no contention worth naming).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of message traffic.
#[derive(Debug, Default)]
pub struct Counters {
    /// Task messages published to worker inboxes.
    pub dispatched: AtomicU64,
    /// Inbox messages acknowledged after handling.
    pub acked: AtomicU64,
    /// Deliveries that were redeliveries (delivery count > 1).
    pub redelivered: AtomicU64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Results refused as forged (not what the task's holder committed), also
    /// dead-lettered.
    pub forged: AtomicU64,
    /// Errors the server sent this process (permission violations among them).
    pub server_errors: AtomicU64,
    /// Times this process's connections were lost (each is then re-established).
    pub disconnects: AtomicU64,
    /// Publishes the server reported as duplicates (de-duplicated by message id).
    pub duplicates: AtomicU64,
    /// Publishes refused because the target inbox was full.
    pub backpressure: AtomicU64,
    /// Publish attempts retried after a timeout or broken connection.
    pub publish_retries: AtomicU64,
    /// Shared-memory traffic.
    pub memory: crate::memory::MemoryCounters,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    /// See [`Counters::dispatched`].
    pub dispatched: u64,
    /// See [`Counters::acked`].
    pub acked: u64,
    /// See [`Counters::redelivered`].
    pub redelivered: u64,
    /// See [`Counters::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`Counters::forged`].
    pub forged: u64,
    /// See [`Counters::server_errors`].
    pub server_errors: u64,
    /// See [`Counters::disconnects`].
    pub disconnects: u64,
    /// See [`Counters::duplicates`].
    pub duplicates: u64,
    /// See [`Counters::backpressure`].
    pub backpressure: u64,
    /// See [`Counters::publish_retries`].
    pub publish_retries: u64,
    /// See [`Counters::memory`].
    pub memory: crate::memory::MemoryStats,
}

impl Counters {
    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            dispatched: r(&self.dispatched),
            acked: r(&self.acked),
            redelivered: r(&self.redelivered),
            dead_lettered: r(&self.dead_lettered),
            forged: r(&self.forged),
            server_errors: r(&self.server_errors),
            disconnects: r(&self.disconnects),
            duplicates: r(&self.duplicates),
            backpressure: r(&self.backpressure),
            publish_retries: r(&self.publish_retries),
            memory: self.memory.snapshot(),
        }
    }
}

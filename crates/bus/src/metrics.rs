//! The process's message counters. Each is a Prometheus metric (through the `metrics`
//! facade: whatever recorder the binary installed exports it, summed over the
//! process) and also readable from its [`Counters`], which is per fleet: `bench`
//! summaries and tests read the numbers the exporter serves, for one fleet even when
//! several share a process.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// One counted thing: a `metrics` counter, and its count in this [`Counters`].
pub struct Count {
    local: AtomicU64,
    name: &'static str,
    metric: metrics::Counter,
}

impl Count {
    /// The counter `name` (a Prometheus name, `_total`), registered with the installed
    /// recorder (none yet: counted here only).
    pub fn new(name: &'static str) -> Self {
        Self {
            local: AtomicU64::new(0),
            name,
            metric: metrics::counter!(name),
        }
    }

    /// The counter `name`, exported only with labels ([`Count::increment_labeled`]).
    pub fn labeled(name: &'static str) -> Self {
        Self {
            local: AtomicU64::new(0),
            name,
            metric: metrics::Counter::noop(),
        }
    }

    /// Adds one.
    pub fn increment(&self) {
        self.local.fetch_add(1, Ordering::Relaxed);
        self.metric.increment(1);
    }

    /// Adds one, exported with `labels` (the count here is over all labels).
    pub fn increment_labeled(&self, labels: &[(&'static str, String)]) {
        self.local.fetch_add(1, Ordering::Relaxed);
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect();
        metrics::counter!(self.name, labels).increment(1);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.name, self.get())
    }
}

/// Counters of message traffic (metric names in docs/architecture.md, "Metrics").
#[derive(Debug)]
pub struct Counters {
    /// Task messages published to worker inboxes (`flotilla_tasks_dispatched_total`).
    pub dispatched: Count,
    /// Inbox messages acknowledged after handling (`flotilla_acks_total`).
    pub acked: Count,
    /// Deliveries that were redeliveries, delivery count > 1
    /// (`flotilla_redeliveries_total`).
    pub redelivered: Count,
    /// Messages moved to the dead-letter queue (`flotilla_dead_letters_total{reason}`).
    pub dead_lettered: Count,
    /// Results refused as forged (not what the task's holder committed), also
    /// dead-lettered (`flotilla_forged_results_total`).
    pub forged: Count,
    /// Errors the server sent this process, permission violations among them
    /// (`flotilla_nats_server_errors_total`).
    pub server_errors: Count,
    /// Times this process's connections were lost, each then re-established
    /// (`flotilla_nats_disconnects_total`).
    pub disconnects: Count,
    /// Publishes the server reported as duplicates, de-duplicated by message id
    /// (`flotilla_publish_duplicates_total`).
    pub duplicates: Count,
    /// Publishes refused because the target inbox was full
    /// (`flotilla_publish_backpressure_total`).
    pub backpressure: Count,
    /// Publish attempts retried after a timeout or broken connection
    /// (`flotilla_publish_retries_total`).
    pub publish_retries: Count,
    /// Shared-memory traffic.
    pub memory: crate::memory::MemoryCounters,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            dispatched: Count::new("flotilla_tasks_dispatched_total"),
            acked: Count::new("flotilla_acks_total"),
            redelivered: Count::new("flotilla_redeliveries_total"),
            dead_lettered: Count::labeled("flotilla_dead_letters_total"),
            forged: Count::new("flotilla_forged_results_total"),
            server_errors: Count::new("flotilla_nats_server_errors_total"),
            disconnects: Count::new("flotilla_nats_disconnects_total"),
            duplicates: Count::new("flotilla_publish_duplicates_total"),
            backpressure: Count::new("flotilla_publish_backpressure_total"),
            publish_retries: Count::new("flotilla_publish_retries_total"),
            memory: Default::default(),
        }
    }
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
    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            dispatched: self.dispatched.get(),
            acked: self.acked.get(),
            redelivered: self.redelivered.get(),
            dead_lettered: self.dead_lettered.get(),
            forged: self.forged.get(),
            server_errors: self.server_errors.get(),
            disconnects: self.disconnects.get(),
            duplicates: self.duplicates.get(),
            backpressure: self.backpressure.get(),
            publish_retries: self.publish_retries.get(),
            memory: self.memory.snapshot(),
        }
    }
}

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// Set to the latest reading.
    Gauge,
    /// A distribution (`_seconds`: buckets, sum, count).
    Histogram,
}

/// Every metric a Flotilla process can export: name, kind, help text. The table in
/// docs/architecture.md ("Metrics") and the dashboard under `deploy/` follow it.
pub const CATALOG: &[(&str, MetricKind, &str)] = &[
    (
        "flotilla_sessions_total",
        MetricKind::Counter,
        "Sessions ended, by outcome (completed, failed, cancelled, deadline_exceeded).",
    ),
    (
        "flotilla_session_duration_seconds",
        MetricKind::Histogram,
        "Sessions from opened to ended.",
    ),
    (
        "flotilla_sessions_in_use",
        MetricKind::Gauge,
        "Session slots taken (serve, every 5 s).",
    ),
    (
        "flotilla_session_slots",
        MetricKind::Gauge,
        "Session slots in the pool.",
    ),
    (
        "flotilla_tasks_total",
        MetricKind::Counter,
        "Task results the session record took, by role and outcome.",
    ),
    (
        "flotilla_tasks_dispatched_total",
        MetricKind::Counter,
        "Task messages published to worker inboxes.",
    ),
    (
        "flotilla_acks_total",
        MetricKind::Counter,
        "Inbox messages acknowledged after handling.",
    ),
    (
        "flotilla_redeliveries_total",
        MetricKind::Counter,
        "Deliveries with a delivery count above 1.",
    ),
    (
        "flotilla_dead_letters_total",
        MetricKind::Counter,
        "Messages dead-lettered, by reason.",
    ),
    (
        "flotilla_dead_letter_queue_depth",
        MetricKind::Gauge,
        "Messages in the dead-letter stream.",
    ),
    (
        "flotilla_inbox_depth",
        MetricKind::Gauge,
        "Messages waiting in each role's inbox stream.",
    ),
    (
        "flotilla_forged_results_total",
        MetricKind::Counter,
        "Results their task record did not vouch for.",
    ),
    (
        "flotilla_cas_conflicts_total",
        MetricKind::Counter,
        "Compare-and-set conflicts, by bucket (sessions, records, memory).",
    ),
    (
        "flotilla_lock_waits_total",
        MetricKind::Counter,
        "Shared-memory lock requests that waited for a holder.",
    ),
    (
        "flotilla_lock_expiries_total",
        MetricKind::Counter,
        "Guarded writes refused because their lock had expired.",
    ),
    (
        "flotilla_budget_exhausted_total",
        MetricKind::Counter,
        "Sessions a budget ended, by kind.",
    ),
    (
        "flotilla_circuit_opens_total",
        MetricKind::Counter,
        "Sessions the circuit breaker ended.",
    ),
    (
        "flotilla_rate_limit_waits_total",
        MetricKind::Counter,
        "LLM calls that waited for a fleet rate-limit permit.",
    ),
    (
        "flotilla_rate_limit_wait_seconds",
        MetricKind::Histogram,
        "How long those calls waited.",
    ),
    (
        "flotilla_rate_limit_permits_total",
        MetricKind::Counter,
        "Fleet rate-limit permits granted.",
    ),
    (
        "flotilla_rate_limit_timeouts_total",
        MetricKind::Counter,
        "Permit requests that timed out.",
    ),
    (
        "flotilla_llm_rate_limited_total",
        MetricKind::Counter,
        "Provider 429 answers despite a permit.",
    ),
    (
        "flotilla_tool_calls_total",
        MetricKind::Counter,
        "Tool calls asked of the gateway.",
    ),
    (
        "flotilla_tool_cache_hits_total",
        MetricKind::Counter,
        "Tool calls answered from the deterministic cache.",
    ),
    (
        "flotilla_tool_replays_total",
        MetricKind::Counter,
        "Side-effecting tool calls answered from their idempotency record.",
    ),
    (
        "flotilla_tool_attempts_total",
        MetricKind::Counter,
        "Requests sent to tools, retries included.",
    ),
    (
        "flotilla_tool_circuit_open_total",
        MetricKind::Counter,
        "Tool calls failed fast by an open circuit breaker.",
    ),
    (
        "flotilla_llm_calls_total",
        MetricKind::Counter,
        "LLM calls answered, by model.",
    ),
    (
        "flotilla_llm_tokens_total",
        MetricKind::Counter,
        "LLM tokens, by model and direction (input, output).",
    ),
    (
        "flotilla_heartbeats_missed_total",
        MetricKind::Counter,
        "Processes the watchdog found dead or frozen.",
    ),
    (
        "flotilla_reassignments_total",
        MetricKind::Counter,
        "Tasks the watchdog took from a dead or frozen holder.",
    ),
    (
        "flotilla_publish_duplicates_total",
        MetricKind::Counter,
        "Publishes the server de-duplicated by message id.",
    ),
    (
        "flotilla_publish_backpressure_total",
        MetricKind::Counter,
        "Publishes refused because the target inbox was full.",
    ),
    (
        "flotilla_publish_retries_total",
        MetricKind::Counter,
        "Publish attempts retried after a timeout or lost connection.",
    ),
    (
        "flotilla_nats_connects_total",
        MetricKind::Counter,
        "NATS connections established (first and re-connects).",
    ),
    (
        "flotilla_nats_disconnects_total",
        MetricKind::Counter,
        "NATS connections lost.",
    ),
    (
        "flotilla_nats_server_errors_total",
        MetricKind::Counter,
        "Errors the NATS server sent, permission violations among them.",
    ),
];

/// Describes every metric of [`CATALOG`] to the installed recorder and starts the
/// unlabeled counters and gauges, and the counters whose labels form a closed set, at
/// zero, so that dashboards and `rate()` see them before the first event. Call once,
/// after installing the recorder.
pub fn describe_all() {
    for &(name, kind, help) in CATALOG {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(name, help),
            MetricKind::Gauge => metrics::describe_gauge!(name, help),
            MetricKind::Histogram => {
                metrics::describe_histogram!(name, metrics::Unit::Seconds, help)
            }
        }
    }
    let labeled: &[(&str, &str, &[&str])] = &[
        (
            "flotilla_sessions_total",
            "outcome",
            &["completed", "failed", "cancelled", "deadline_exceeded"],
        ),
        (
            "flotilla_cas_conflicts_total",
            "bucket",
            &["sessions", "records", "memory"],
        ),
        (
            "flotilla_budget_exhausted_total",
            "kind",
            &[
                "call_tokens",
                "task_tokens",
                "session_tokens",
                "global_tokens",
                "turns",
                "clarifications",
            ],
        ),
    ];
    for &(name, kind, _) in CATALOG {
        if labeled.iter().any(|(n, _, _)| *n == name)
            || matches!(
                name,
                "flotilla_tasks_total"
                    | "flotilla_dead_letters_total"
                    | "flotilla_inbox_depth"
                    | "flotilla_llm_calls_total"
                    | "flotilla_llm_tokens_total"
            )
        {
            continue;
        }
        match kind {
            MetricKind::Counter => metrics::counter!(name).increment(0),
            MetricKind::Gauge => metrics::gauge!(name).increment(0.0),
            MetricKind::Histogram => {}
        }
    }
    for &(name, label, values) in labeled {
        for v in values {
            metrics::counter!(name, label => *v).increment(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_is_documented_and_well_named() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/architecture.md"),
        )
        .unwrap_or_default();
        let section = doc.split("## Metrics").nth(1).unwrap_or_default();
        for (name, kind, help) in CATALOG {
            assert!(
                section.contains(&format!("`{name}`")),
                "{name} is not in docs/architecture.md, Metrics"
            );
            assert!(!help.is_empty());
            match kind {
                MetricKind::Counter => assert!(name.ends_with("_total"), "{name}"),
                MetricKind::Histogram => assert!(name.ends_with("_seconds"), "{name}"),
                MetricKind::Gauge => assert!(!name.ends_with("_total"), "{name}"),
            }
        }
        let c = Counters::default();
        c.acked.increment();
        c.dead_lettered
            .increment_labeled(&[("reason", "malformed".into())]);
        assert_eq!((c.snapshot().acked, c.snapshot().dead_lettered), (1, 1));
    }
}

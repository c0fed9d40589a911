//! The bus's configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How to reach NATS and how the JetStream topology is shaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// NATS server URL(s), comma-separated.
    pub url: String,
    /// Namespace prefix of every subject, stream and bucket.
    pub prefix: String,
    /// Stream and bucket replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// Messages one worker inbox (`<p>.s.<sid>.in.<role>`) may hold before publishes to
    /// it are refused (backpressure). Delivered but unacknowledged messages count.
    pub inbox_bound: i64,
    /// The same for each session's orchestrator inbox; must exceed the tasks a session
    /// has in flight, since every one of them reports back there.
    pub orchestrator_inbox_bound: i64,
    /// Per-role inbox bounds, replacing `inbox_bound` for those roles.
    pub role_inbox_bounds: std::collections::BTreeMap<flotilla_protocol::Role, i64>,
    /// Submissions the durable submit queue may hold before publishes are refused.
    pub submit_queue_max: i64,
    /// How long session events are kept.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// How long session and task records are kept.
    #[serde(with = "humantime_serde")]
    pub records_max_age: Duration,
    /// JetStream de-duplication window; must cover ack wait x max deliver.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Largest message payload accepted from the bus, in bytes.
    pub max_payload: usize,
    /// How long to wait for one publish acknowledgement.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Publish attempts (same message id) before giving up.
    pub publish_attempts: u32,
    /// Shared memory limits and the session template's declared keys.
    pub memory: crate::memory::MemoryConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            prefix: "flotilla".to_owned(),
            replicas: 1,
            inbox_bound: 8,
            orchestrator_inbox_bound: 64,
            role_inbox_bounds: std::collections::BTreeMap::new(),
            submit_queue_max: 100_000,
            events_max_age: Duration::from_secs(24 * 3600),
            records_max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            max_payload: flotilla_protocol::DEFAULT_MAX_PAYLOAD,
            publish_timeout: Duration::from_secs(5),
            publish_attempts: 6,
            memory: crate::memory::MemoryConfig::default(),
        }
    }
}

impl BusConfig {
    /// The inbox bound of `role`.
    pub fn inbox_bound_of(&self, role: &flotilla_protocol::Role) -> i64 {
        if role.is_orchestrator() {
            self.orchestrator_inbox_bound
        } else {
            self.role_inbox_bounds
                .get(role)
                .copied()
                .unwrap_or(self.inbox_bound)
        }
    }
}

//! The control plane's configuration.

use std::time::Duration;

use flotilla_bus::PoolSettings;
use flotilla_protocol::Role;
use serde::{Deserialize, Serialize};

/// Session shape and admission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Worker roles a session may use; a session without explicit roles gets all of them.
    pub roles: Vec<Role>,
    /// Fewest worker roles a session may have.
    pub min_roles: usize,
    /// Most worker roles a session may have.
    pub max_roles: usize,
    /// Most tasks a plan may have.
    pub max_tasks: usize,
    /// Task messages in flight per session at once; the rest wait in the record.
    pub max_in_flight: usize,
    /// Attempts per task before it fails for good (a failed attempt is retried with
    /// its reason).
    pub max_task_attempts: u32,
    /// Sessions open at once across every `serve` instance.
    pub pool_size: u32,
    /// `retry_after_ms` given with a "pool full" rejection before any session has
    /// ended to measure the real rate from.
    pub retry_after_ms: u64,
    /// Model the orchestrator plans and synthesizes with (shared text: every plan and
    /// synthesis request in flight points to it).
    pub orchestrator_model: std::sync::Arc<str>,
    /// How often slots are reconciled against session records (leaks from crashes).
    #[serde(with = "humantime_serde")]
    pub reconcile_every: Duration,
    /// A slot without a live session record for this long is reclaimed.
    #[serde(with = "humantime_serde")]
    pub slot_grace: Duration,
    /// How long ending a session (cancel, deadline) waits for every live process to
    /// confirm it stopped the session's work before answering anyway.
    #[serde(with = "humantime_serde")]
    pub stop_wait: Duration,
    /// Roles whose tasks' questions go to a person in every session (a session's open
    /// request can ask for that for all its roles with `human_input`).
    pub human_roles: Vec<Role>,
    /// How long a question waits for a person before the task is told to commit to
    /// its best interpretation.
    #[serde(with = "humantime_serde")]
    pub input_wait: Duration,
    /// How long a task's result waits, at most, for the results of the session's other
    /// tasks in flight, so that results ending together share one write of the session
    /// record (0: no wait). Added to a session's latency at most once per result.
    #[serde(with = "humantime_serde")]
    pub result_linger: Duration,
    /// Bytes of task outputs (as their commits' sizes) each `serve` keeps for its
    /// sessions' synthesis, which then reads nothing. A session whose outputs did not
    /// fit reads them at synthesis, one request; so at scale memory stays bounded at
    /// the cost of about one server message a session.
    pub output_cache_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        // Invariant: these literals are valid role names (covered by a unit test).
        #[allow(clippy::expect_used)]
        let role = |r: &str| Role::parse(r).expect("literal role name is valid");
        Self {
            roles: vec![
                role("research"),
                role("analysis"),
                role("writing"),
                role("review"),
            ],
            min_roles: 3,
            max_roles: 5,
            max_tasks: 10,
            max_in_flight: 3,
            max_task_attempts: 3,
            pool_size: 600,
            retry_after_ms: 1000,
            orchestrator_model: "gpt-4o-mini".into(),
            reconcile_every: Duration::from_secs(30),
            slot_grace: Duration::from_secs(60),
            stop_wait: Duration::from_secs(2),
            human_roles: Vec::new(),
            input_wait: Duration::from_secs(600),
            result_linger: Duration::from_millis(10),
            output_cache_bytes: crate::orchestrator::DEFAULT_OUTPUT_CACHE_BYTES,
        }
    }
}

/// Everything `flotilla serve` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Sessions and admission.
    pub session: SessionConfig,
    /// The orchestrator pool's consumer settings.
    pub orchestrator: PoolSettings,
    /// The submit queue consumer's settings.
    pub submit: PoolSettings,
    /// Heartbeats and the watchdog.
    pub liveness: flotilla_agent::LivenessConfig,
    /// The fleet rate limiter (this process campaigns to lead it).
    pub limits: flotilla_agent::LimitsConfig,
    /// Token, turn and clarification budgets.
    pub budgets: flotilla_agent::BudgetConfig,
    /// The consumer settings of each worker role's pool. `serve` creates these
    /// consumers at start, so that agents can run under credentials that may not
    /// create consumers (least privilege); roles missing here create their own.
    pub worker_pools: std::collections::BTreeMap<flotilla_protocol::Role, PoolSettings>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            orchestrator: PoolSettings {
                // Orchestrator messages are never given up on: poison is terminated
                // explicitly, and backpressure naks must not exhaust a bound.
                max_deliver: -1,
                ..PoolSettings::default()
            },
            submit: PoolSettings {
                concurrency: 64,
                max_deliver: -1,
                ..PoolSettings::default()
            },
            liveness: flotilla_agent::LivenessConfig::default(),
            limits: flotilla_agent::LimitsConfig::default(),
            budgets: flotilla_agent::BudgetConfig::default(),
            worker_pools: std::collections::BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn defaults_are_valid() {
        let c = super::ControlConfig::default();
        assert_eq!(c.session.roles.len(), 4);
        assert!(
            c.session.min_roles <= c.session.roles.len()
                && c.session.roles.len() <= c.session.max_roles
        );
    }
}

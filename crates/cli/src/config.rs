//! The binary's configuration, layered with figment: built-in defaults, then
//! `config/flotilla.toml` (or `--config`), then `FLOTILLA_*` environment variables
//! (`__` separates levels: `FLOTILLA_NATS__URL`, `FLOTILLA_SESSION__POOL_SIZE`), then
//! command-line flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use std::collections::BTreeMap;

use flotilla_agent::RoleSpec;
use flotilla_bus::{BusConfig, PoolSettings};
use flotilla_control::{ControlConfig, SessionConfig};
use flotilla_llm::SimConfig;
use flotilla_protocol::Role;
use serde::{Deserialize, Serialize};

/// Which LLM provider agents call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Provider {
    /// The built-in deterministic simulator.
    #[default]
    Simulated,
    /// Any OpenAI-compatible chat completions endpoint (`[llm.openai]`).
    Openai,
}

/// LLM settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LlmConfig {
    /// Provider.
    pub(crate) provider: Provider,
    /// Model the worker roles use.
    pub(crate) worker_model: String,
    /// Simulated provider settings.
    pub(crate) simulated: SimConfig,
    /// OpenAI-compatible provider settings (base URL, key, timeouts, retries).
    pub(crate) openai: flotilla_llm::OpenAiConfig,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            provider: Provider::Simulated,
            worker_model: "gpt-4o".into(),
            simulated: SimConfig::default(),
            openai: flotilla_llm::OpenAiConfig::default(),
        }
    }
}

/// The embedded `nats-server` the demo starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EmbeddedConfig {
    /// Path of the `nats-server` binary; searched for when unset.
    pub(crate) nats_server_bin: Option<PathBuf>,
}

/// Everything the binary reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// NATS connection and topology.
    pub(crate) nats: BusConfig,
    /// Sessions and admission.
    pub(crate) session: SessionConfig,
    /// The orchestrator pool's consumer.
    pub(crate) orchestrator: PoolSettings,
    /// The submit queue's consumer.
    pub(crate) submit: PoolSettings,
    /// Worker pools' consumers.
    pub(crate) worker: PoolSettings,
    /// Heartbeats and the watchdog.
    pub(crate) liveness: flotilla_agent::LivenessConfig,
    /// The fleet rate limiter.
    pub(crate) limits: flotilla_agent::LimitsConfig,
    /// Token, turn and clarification budgets.
    pub(crate) budgets: flotilla_agent::BudgetConfig,
    /// Tools agents may call (`[tools.<name>]`): caching, idempotency, limits.
    pub(crate) tools: flotilla_agent::ToolsConfig,
    /// Roles defined here (`[roles.<role>]`): agent prompt, model, tools, limits, and
    /// changes to `[worker]` and `nats.inbox_bound`.
    pub(crate) roles: BTreeMap<Role, RoleSpec>,
    /// LLM provider.
    pub(crate) llm: LlmConfig,
    /// The embedded server.
    pub(crate) embedded: EmbeddedConfig,
    /// Log filter (`RUST_LOG` syntax) when `RUST_LOG` is unset.
    pub(crate) log: String,
    /// OpenTelemetry trace export.
    pub(crate) telemetry: crate::telemetry::TelemetryConfig,
}

impl Config {
    /// The configured worker roles, comma-separated (for messages).
    pub(crate) fn role_list(&self) -> String {
        self.session
            .roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The consumer settings of `role`'s pool: `[worker]` with `[roles.<role>]` applied.
    pub(crate) fn pool(&self, role: &Role) -> PoolSettings {
        self.roles
            .get(role)
            .map(|o| o.pool().apply(&self.worker))
            .unwrap_or_else(|| self.worker.clone())
    }

    /// The control plane's part.
    pub(crate) fn control(&self) -> ControlConfig {
        ControlConfig {
            session: self.session.clone(),
            orchestrator: self.orchestrator.clone(),
            submit: self.submit.clone(),
            liveness: self.liveness.clone(),
            limits: self.limits.clone(),
            budgets: self.budgets.clone(),
            worker_pools: self
                .session
                .roles
                .iter()
                .map(|r| (r.clone(), self.pool(r)))
                .collect(),
        }
    }
}

fn defaults() -> Config {
    let control = ControlConfig::default();
    Config {
        nats: BusConfig::default(),
        session: control.session,
        orchestrator: control.orchestrator,
        submit: control.submit,
        worker: PoolSettings::default(),
        liveness: control.liveness,
        limits: control.limits,
        budgets: control.budgets,
        tools: BTreeMap::new(),
        roles: BTreeMap::new(),
        llm: LlmConfig::default(),
        embedded: EmbeddedConfig::default(),
        log: "info".into(),
        telemetry: crate::telemetry::TelemetryConfig::default(),
    }
}

/// Loads the layered configuration. `path` overrides the default file location; a
/// missing default file is fine, a missing explicit one is an error.
pub(crate) fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut fig = Figment::from(Serialized::defaults(defaults()));
    match path {
        Some(p) => {
            anyhow::ensure!(p.is_file(), "config file {} does not exist", p.display());
            fig = fig.merge(Toml::file(p));
        }
        None => fig = fig.merge(Toml::file("config/flotilla.toml")),
    }
    fig = fig.merge(Env::prefixed("FLOTILLA_").split("__"));
    let mut config: Config = fig.extract().context("invalid configuration")?;
    config.telemetry.apply_env(|k| std::env::var(k).ok())?;
    // A role's inbox bound is a topology setting: fold it into the bus config.
    for (role, def) in &config.roles {
        if let Some(b) = def.inbox_bound {
            config.nats.role_inbox_bounds.insert(role.clone(), b);
        }
    }
    validate(&config)?;
    Ok(config)
}

/// Cross-field checks that serde cannot express.
pub(crate) fn validate(c: &Config) -> anyhow::Result<()> {
    let s = &c.session;
    anyhow::ensure!(
        s.min_roles >= 1 && s.min_roles <= s.max_roles,
        "session.min_roles must be 1..=session.max_roles"
    );
    anyhow::ensure!(
        s.roles.len() >= s.min_roles,
        "session.roles lists {} roles, fewer than session.min_roles = {}",
        s.roles.len(),
        s.min_roles
    );
    anyhow::ensure!(
        !s.roles.iter().any(|r| r.is_orchestrator()),
        "session.roles must not include the orchestrator"
    );
    anyhow::ensure!(
        s.max_in_flight >= 1,
        "session.max_in_flight must be at least 1"
    );
    anyhow::ensure!(s.pool_size >= 1, "session.pool_size must be at least 1");
    anyhow::ensure!(
        c.nats.inbox_bound >= 1,
        "nats.inbox_bound must be at least 1"
    );
    anyhow::ensure!(
        c.nats.orchestrator_inbox_bound > s.max_in_flight as i64,
        "nats.orchestrator_inbox_bound ({}) must exceed session.max_in_flight ({}): the start and a person's answer to each task in flight may wait there at once",
        c.nats.orchestrator_inbox_bound,
        s.max_in_flight
    );
    for (role, def) in &c.roles {
        for tool in &def.tools {
            anyhow::ensure!(
                c.tools.contains_key(tool),
                "[roles.{role}] names tool {tool}, which has no [tools.{tool}] section"
            );
        }
    }
    for role in c.roles.keys().chain(c.nats.role_inbox_bounds.keys()) {
        anyhow::ensure!(
            c.session.roles.contains(role),
            "[roles.{role}] configures a role that is not in session.roles"
        );
    }
    for role in &c.session.roles {
        let p = c.pool(role);
        p.validate()
            .map_err(|e| anyhow::anyhow!("pool of role {role}: {e}"))?;
        // The longest a message can keep coming back: every delivery's wait added up.
        let window_needed: std::time::Duration = (0..p.max_deliver.max(1) as usize)
            .map(|i| {
                p.backoff
                    .get(i)
                    .or(p.backoff.last())
                    .copied()
                    .unwrap_or(p.ack_wait)
            })
            .sum();
        anyhow::ensure!(
            c.nats.duplicate_window >= window_needed,
            "nats.duplicate_window ({:?}) must cover every redelivery of role {role}'s messages (ack_wait/backoff x max_deliver = {:?})",
            c.nats.duplicate_window,
            window_needed
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn defaults_validate_and_file_overrides() {
        validate(&defaults()).unwrap();
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                "[session]\npool_size = 7\n[nats]\nurl = \"nats://127.0.0.1:1\"\n",
            )?;
            jail.set_env("FLOTILLA_SESSION__POOL_SIZE", "9");
            jail.set_env("FLOTILLA_ROLES__RESEARCH__SHARE_FINDINGS", "true");
            let c = load(Some(Path::new("f.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.session.pool_size, 9, "env beats the file");
            let research = Role::parse("research").map_err(|e| e.to_string())?;
            assert_eq!(
                c.roles.get(&research).and_then(|r| r.share_findings),
                Some(true),
                "a role's setting from the environment"
            );
            assert_eq!(c.nats.url, "nats://127.0.0.1:1");
            jail.create_file("bad.toml", "[session]\npool_sise = 7\n")?;
            assert!(
                load(Some(Path::new("bad.toml"))).is_err(),
                "unknown keys are refused"
            );
            Ok(())
        });
    }

    fn leaf_keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaf_keys(&key, v, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }

    #[test]
    fn shipped_file_documents_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/flotilla.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let file: toml::Value = toml::from_str(&text).unwrap();
        let defaults_value = toml::Value::try_from(defaults()).unwrap();
        let (mut in_file, mut all) = (Vec::new(), Vec::new());
        leaf_keys("", &file, &mut in_file);
        leaf_keys("", &defaults_value, &mut all);
        in_file.sort();
        all.sort();
        assert_eq!(in_file, all, "config/flotilla.toml must list every key");
        let loaded: Config = Figment::from(Toml::file(&path)).extract().unwrap();
        assert_eq!(
            loaded,
            defaults(),
            "config/flotilla.toml must show the defaults"
        );
    }
}

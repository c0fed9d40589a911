//! Worker roles defined in configuration (`[roles.<name>]`): the built-in LLM agent's
//! prompt, model, tools, turn limit and call timeout, and the role pool's consumer and
//! inbox settings, so `flotilla agent --role <name>` runs a new kind of agent with no
//! code.

use std::sync::Arc;
use std::time::Duration;

use flotilla_bus::{Bus, PoolOverrides};
use flotilla_llm::LlmClient;
use flotilla_protocol::Role;
use serde::{Deserialize, Serialize};

use crate::budget::{BudgetConfig, SessionLedger};
use crate::history::HistoryStore;
use crate::llm_agent::LlmAgent;

/// One role's definition. Every field is optional: unset ones take the fleet-wide
/// defaults (`[worker]`, `[budgets]`, `llm.worker_model`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoleSpec {
    /// The agent's system prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// The model it calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Tools it may call (served at `<p>.tool.<name>`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Most turns per task attempt (replaces `budgets.max_turns`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    /// Most time one LLM call may take.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub call_timeout: Option<Duration>,
    /// Turns kept verbatim in the conversation history (older ones are summarized).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_turns: Option<usize>,
    /// Messages one of its inboxes may hold (replaces `nats.inbox_bound`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_bound: Option<i64>,
    /// Ack wait of its pool.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ack_wait: Option<Duration>,
    /// Deliveries before a message is dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_deliver: Option<i64>,
    /// Redelivery delays.
    #[serde(
        with = "flotilla_bus::opt_durations",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff: Option<Vec<Duration>>,
    /// Deliveries one process works on at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Whether the agent also shares each task's summary in the session's memory at
    /// `finding-<task>`, for the session's other agents and for `flotilla memory`
    /// (default: no). It costs one KV write per task; the commit already carries the
    /// whole output to the orchestrator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_findings: Option<bool>,
}

/// Turns kept verbatim when a role does not say.
pub const DEFAULT_HISTORY_TURNS: usize = 6;

impl RoleSpec {
    /// The pool's consumer changes.
    pub fn pool(&self) -> PoolOverrides {
        PoolOverrides {
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            backoff: self.backoff.clone(),
            concurrency: self.concurrency,
        }
    }

    /// The role's agent: the built-in LLM agent configured by this spec, calling `llm`
    /// (already behind the rate limiter), with budgets, the session ledger and a
    /// conversation history over `bus`, and this role's `tools` through `gateway`.
    pub fn agent(
        &self,
        role: &Role,
        default_model: &str,
        llm: Arc<dyn LlmClient>,
        budgets: &BudgetConfig,
        bus: &Bus,
        gateway: &crate::tools::ToolGateway,
    ) -> LlmAgent {
        let mut budgets = budgets.clone();
        if let Some(t) = self.max_turns {
            budgets.max_turns = t;
        }
        let model = self
            .model
            .clone()
            .unwrap_or_else(|| default_model.to_owned());
        let mut agent = LlmAgent::new(role.clone(), model, llm)
            .with_budgets(budgets, SessionLedger::new(bus.clone()))
            .with_history(HistoryStore::new(
                bus.clone(),
                self.history_turns.unwrap_or(DEFAULT_HISTORY_TURNS),
            ));
        if let Some(p) = &self.system_prompt {
            agent = agent.with_system_prompt(p.clone());
        }
        if let Some(t) = self.call_timeout {
            agent = agent.with_call_timeout(t);
        }
        agent = agent.with_shared_findings(self.share_findings.unwrap_or(false));
        agent.with_tools(gateway.clone(), self.tools.clone())
    }
}

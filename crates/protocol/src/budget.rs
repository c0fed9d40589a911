//! Budgets: what stops a runaway session, and the spend records they are checked
//! against.
//!
//! A task attempt stopped by a budget reports [`crate::TaskOutcome::Stopped`] naming
//! it; the orchestrator then ends the session, and its `done` event names the budget.
//! Token spend per session and fleet-wide is reserved before each call and settled
//! after, so it overshoots a budget by at most one call.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::version::V1;

/// A budget that can end a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// One call would need more tokens than a call may use.
    CallTokens,
    /// An agent task's tokens (all its turns).
    TaskTokens,
    /// A session's tokens (the orchestrator's and every agent's).
    SessionTokens,
    /// The fleet-wide token budget.
    GlobalTokens,
    /// An agent task's turns.
    Turns,
    /// The session's clarification exchanges (the worker kept asking after the
    /// orchestrator committed to an interpretation).
    Clarifications,
    /// The circuit breaker: an agent repeated the same call.
    CircuitBreaker,
}

impl BudgetKind {
    /// The snake_case name used on the wire and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::CallTokens => "call_tokens",
            BudgetKind::TaskTokens => "task_tokens",
            BudgetKind::SessionTokens => "session_tokens",
            BudgetKind::GlobalTokens => "global_tokens",
            BudgetKind::Turns => "turns",
            BudgetKind::Clarifications => "clarifications",
            BudgetKind::CircuitBreaker => "circuit_breaker",
        }
    }
}

impl std::fmt::Display for BudgetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// LLM spend of one task attempt, reported with its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Spend {
    /// LLM calls made.
    pub calls: u64,
    /// Tokens used (prompt + completion).
    pub tokens: u64,
    /// The largest single call, in tokens.
    pub largest_call: u64,
    /// Calls that waited for a rate-limit permit.
    pub rate_limit_waits: u64,
    /// Total time spent waiting for permits, ms.
    pub rate_limit_wait_ms: u64,
}

impl Spend {
    /// Adds one call of `tokens`.
    pub fn add_call(&mut self, tokens: u64) {
        self.calls += 1;
        self.tokens += tokens;
        self.largest_call = self.largest_call.max(tokens);
    }

    /// Adds `other`.
    pub fn add(&mut self, other: &Spend) {
        self.calls += other.calls;
        self.tokens += other.tokens;
        self.largest_call = self.largest_call.max(other.largest_call);
        self.rate_limit_waits += other.rate_limit_waits;
        self.rate_limit_wait_ms += other.rate_limit_wait_ms;
    }
}

/// A token ledger in the `<p>-limits` bucket (`spend.s.<sid>` per session): tokens
/// used by finished calls, and tokens reserved by calls in flight.
///
/// A call is admitted while `tokens + reserved` is below the budget (so at most one
/// admitted call can take the spend past it), waits while calls in flight might spend
/// the rest, and is refused once `tokens` alone has reached the budget.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ledger {
    /// Protocol version (1).
    pub v: V1,
    /// Tokens used by finished calls.
    pub tokens: u64,
    /// Tokens reserved by calls in flight.
    #[serde(default)]
    pub reserved: u64,
    /// Calls admitted.
    pub calls: u64,
    /// The largest single call, in tokens.
    pub largest_call: u64,
}

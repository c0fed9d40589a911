//! The fleet rate limiter's wire messages: `<p>.limits.acquire` and
//! `<p>.limits.settle` (endpoints of the NATS micro service `<p>-limits`, served by the
//! one leader), and the records the leader keeps in the `<p>-limits` bucket.
//!
//! A caller estimates a call's tokens (prompt + `max_tokens`), asks for a permit, makes
//! the call, then settles the permit with the tokens the provider reported (and, if the
//! provider still answered 429, how long it asked to wait).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::version::V1;

/// Request on `<p>.limits.acquire`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// Protocol version (1).
    pub v: V1,
    /// The model the call goes to (limits are per model).
    pub model: String,
    /// Tokens to reserve: the prompt estimate plus the completion ceiling.
    pub tokens: u64,
}

/// Why a permit is refused for good (waiting will not help).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AcquireRefusal {
    /// The call alone needs more tokens than the model's per-minute budget allows.
    TooLarge,
    /// The fleet-wide token budget is spent.
    GlobalBudget,
}

/// Reply to [`AcquireRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum AcquireReply {
    /// Go ahead; settle `permit` after the call.
    Granted {
        /// Protocol version (1).
        v: V1,
        /// The permit, `<term>.<n>`: settle it with this id.
        permit: String,
        /// The leader's grant time, ms since the Unix epoch (echo it when settling).
        granted_ms: u64,
    },
    /// Not now: ask again after `retry_after_ms`.
    Wait {
        /// Protocol version (1).
        v: V1,
        /// When a permit may be free.
        retry_after_ms: u64,
    },
    /// Never: see `code`.
    Refused {
        /// Protocol version (1).
        v: V1,
        /// Why.
        code: AcquireRefusal,
        /// Human-readable detail.
        message: String,
    },
    /// The request could not be read (malformed, an unknown field, another version,
    /// too large): fix the request. Also the reply to such a settlement.
    Error {
        /// Protocol version (1).
        v: V1,
        /// One of the closed set of error codes.
        code: crate::ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Request on `<p>.limits.settle` (reply: `{"v":1}`, or an [`AcquireReply::Error`]
/// for a request the leader cannot read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    /// Protocol version (1).
    pub v: V1,
    /// The model.
    pub model: String,
    /// The permit from [`AcquireReply::Granted`].
    pub permit: String,
    /// Its `granted_ms`.
    pub granted_ms: u64,
    /// Tokens reserved with it.
    pub reserved: u64,
    /// Tokens the provider reported (0 when it refused the call).
    pub used: u64,
    /// Set when the provider still answered 429: how long it asked to wait, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited_ms: Option<u64>,
}

/// The leader lease, key `leader` of `<p>-limits` (per-key TTL, renewed by the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimiterLease {
    /// Protocol version (1).
    pub v: V1,
    /// The leading process's agent id.
    pub holder: String,
    /// Its operating-system process id (on its host).
    pub pid: u32,
    /// When it took the lease, ms since the Unix epoch.
    pub since_ms: u64,
}

/// The leader's recent grants for one model, key `window.<model hex>`, written a few
/// times a second so a new leader starts from them instead of from nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowSnapshot {
    /// Protocol version (1).
    pub v: V1,
    /// When it was taken, ms since the Unix epoch.
    pub taken_ms: u64,
    /// `[slot start ms, requests, tokens]` for every slot still in the window.
    pub slots: Vec<[u64; 3]>,
    /// Grants paused until then (after a 429), ms since the Unix epoch.
    pub paused_until_ms: u64,
    /// Tokens granted so far fleet-wide (all models), for the global budget.
    pub global_tokens: u64,
}

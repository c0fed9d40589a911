//! Flotilla's control plane: admission, the orchestrator agent, and the session pool.
//! `flotilla serve` is [`Serve::run`].
//!
//! # Layout
//! - [`config`]: [`ControlConfig`] (sessions, admission, consumer settings).
//! - [`slots`]: the bounded session pool shared by every `serve` (slot keys in KV).
//! - [`admission`]: the `session.open` endpoint and the durable submit queue.
//! - [`machine`]: the session state machine, pure and unit-tested.
//! - [`orchestrator`]: the orchestrator role pool driving that machine over NATS.
//! - [`prompts`]: the orchestrator's LLM prompts.
//! - [`dlq`]: the dead-letter mover (max deliveries) and `dlq ls|show|replay`.
//! - [`limiter`]: the fleet rate limiter's leader (KV lease, `<p>.limits.acquire`).
//! - [`watchdog`]: finds dead, frozen and stuck processes and releases their work.
//! - [`serve`]: all of the above as one process.
//! - [`client`]: open sessions and wait for their answers.
//! - [`fleet`]: `serve` and a worker pool per role in one process (demo, bench, tests).

pub mod admission;
pub mod client;
pub mod config;
pub mod dlq;
pub mod ender;
pub mod fleet;
pub mod limiter;
pub mod machine;
pub mod orchestrator;
pub mod prompts;
pub mod serve;
pub mod slots;
pub mod watchdog;

pub use admission::{Admission, Rejection};
pub use client::{Client, ClientError, Finished, RunError};
pub use config::{ControlConfig, SessionConfig};
pub use ender::{EndError, Ended, Ender};
pub use fleet::{Fleet, FleetSpec};
pub use orchestrator::Orchestrator;
pub use serve::{Serve, ServeError};
pub use slots::{Reconciled, SlotError, SlotTable};

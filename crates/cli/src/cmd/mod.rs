//! One function per subcommand.

mod dlq;
pub(crate) mod flood;
pub(crate) mod limits_bench;
mod load;
pub(crate) mod memory_bench;
mod run;
mod submit;
pub(crate) mod views;

pub(crate) use dlq::dlq;
pub(crate) use load::load;
pub(crate) use run::{agent, serve, session};
pub(crate) use submit::submit;

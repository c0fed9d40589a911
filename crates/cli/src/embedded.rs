//! The embedded default: a local `nats-server` with JetStream that Flotilla starts
//! itself when no `--nats-url` is given.

use anyhow::Context;
use flotilla_testkit::{NatsServer, locate_nats_server};

use crate::config::EmbeddedConfig;

/// Starts a private server on random loopback ports with a temporary store.
pub(crate) fn start(cfg: &EmbeddedConfig) -> anyhow::Result<NatsServer> {
    let extra: Vec<_> = cfg.nats_server_bin.iter().cloned().collect();
    let bin = locate_nats_server(&extra)?;
    let server = NatsServer::builder()
        .binary(&bin)
        .start()
        .with_context(|| format!("starting {}", bin.display()))?;
    tracing::info!(url = %server.url(), pid = server.pid(), "embedded nats-server started");
    Ok(server)
}

//! The embedded default: a local `nats-server` with JetStream that Flotilla starts
//! itself when no `--nats-url` is given.

use anyhow::Context;
use flotilla_testkit::{NatsServer, locate_nats_server};

use crate::config::{Config, EmbeddedConfig};

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

/// Starts an embedded server and points `config` at it, unless an external server was
/// given. Keep the returned server alive for as long as it is needed.
pub(crate) fn unless_external(
    config: &mut Config,
    external: bool,
) -> anyhow::Result<Option<NatsServer>> {
    if external {
        return Ok(None);
    }
    let server = start(&config.embedded)?;
    config.nats.url = server.url();
    Ok(Some(server))
}

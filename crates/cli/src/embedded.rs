//! The embedded default: a local `nats-server` with JetStream that Flotilla starts
//! itself when no `--nats-url` is given, or (for `bench sessions --cluster 3`) three
//! clustered ones.

use anyhow::Context;
use flotilla_testkit::{NatsCluster, NatsServer, locate_nats_server};

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

/// The servers `bench sessions` started: one, or a 3-node cluster.
pub(crate) enum Embedded {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Embedded {
    /// Starts one server, or with `cluster` a 3-node cluster with every stream and
    /// bucket on three replicas, and points `config` at it.
    pub(crate) fn start(config: &mut Config, cluster: bool) -> anyhow::Result<Self> {
        if !cluster {
            let server = start(&config.embedded)?;
            config.nats.url = server.url();
            return Ok(Self::Single(server));
        }
        let extra: Vec<_> = config.embedded.nats_server_bin.iter().cloned().collect();
        let bin = locate_nats_server(&extra)?;
        let c = NatsCluster::start_with(bin).context("starting a 3-node nats-server cluster")?;
        tracing::info!(urls = %c.url_list(), "embedded 3-node cluster started");
        config.nats.url = c.url_list();
        config.nats.replicas = 3;
        Ok(Self::Cluster(c))
    }

    /// Monitoring ports, one per node.
    pub(crate) fn monitor_ports(&self) -> Vec<u16> {
        match self {
            Self::Single(s) => vec![s.monitor_port()],
            Self::Cluster(c) => (0..flotilla_testkit::cluster::NODES)
                .map(|i| c.monitor_port(i))
                .collect(),
        }
    }

    /// Process ids of the running nodes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        match self {
            Self::Single(s) => vec![s.pid()],
            Self::Cluster(c) => c.pids(),
        }
    }

    /// Kills node `pick % nodes` with SIGKILL (its store stays) and returns its number.
    pub(crate) fn kill(&mut self, pick: u64) -> usize {
        match self {
            Self::Single(s) => {
                s.kill();
                0
            }
            Self::Cluster(c) => {
                let i = (pick % flotilla_testkit::cluster::NODES as u64) as usize;
                c.kill9(i);
                i
            }
        }
    }

    /// Starts node `i` again on its store and waits until it serves; on a cluster, until
    /// it has caught up (every node healthy), so that the next loss is of one node of a
    /// whole cluster, never of a second node while the first still catches up. Blocking.
    pub(crate) fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        match self {
            Self::Single(s) => s.restart().context("restarting nats-server"),
            Self::Cluster(c) => {
                c.restart(i)
                    .with_context(|| format!("restarting cluster node {}", i + 1))?;
                c.wait_healthy(std::time::Duration::from_secs(120))
                    .with_context(|| format!("cluster node {} catching up", i + 1))
            }
        }
    }
}

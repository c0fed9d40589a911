//! `flotilla bench sessions --chaos ...`: the fleet as real OS processes (this same
//! binary, re-executed as `serve` and `agent --role R`), with a chaos loop that SIGKILLs
//! a random one every few seconds and starts a replacement.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use flotilla_bus::{Bus, CountersSnapshot};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// What the chaos loop kills.
// The names are the flags' values (`--chaos kill-nats`), so they share a prefix.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Chaos {
    /// Worker (agent) processes.
    KillAgents,
    /// Control-plane (`serve`) processes.
    KillServe,
    /// A node of the embedded server (one, or one of `--cluster 3`'s), restarted on
    /// its store after a pause.
    KillNats,
}

/// One child: what it runs, and the process running it now.
struct Slot {
    args: Vec<String>,
    child: Child,
    kind: Chaos,
}

/// The fleet as child processes.
pub(crate) struct ProcessFleet {
    slots: Arc<Mutex<Vec<Slot>>>,
    config_file: tempfile::NamedTempFile,
    url: String,
    /// Processes killed by the chaos loop.
    pub(crate) killed: Arc<AtomicU64>,
    stop: CancellationToken,
}

fn spawn(config: &std::path::Path, url: &str, args: &[String]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the flotilla binary")?;
    Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(["--nats-url", url])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // `BENCH_CHILD_LOGS=1`: the children's warnings on this stderr.
        .stderr(if std::env::var_os("BENCH_CHILD_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .context("starting a child process")
}

impl ProcessFleet {
    /// Starts `serve_instances` serve processes and `workers_per_role` agent processes
    /// per role, all reading `config` (written to a temporary file).
    pub(crate) async fn start(
        config: &Config,
        serve_instances: usize,
        workers_per_role: usize,
    ) -> anyhow::Result<Self> {
        let mut file = tempfile::Builder::new()
            .prefix("flotilla-bench-")
            .suffix(".toml")
            .tempfile()?;
        file.write_all(toml::to_string(config)?.as_bytes())?;
        let url = config.nats.url.clone();
        let mut slots = Vec::new();
        for _ in 0..serve_instances.max(1) {
            let args = vec!["serve".to_owned()];
            let child = spawn(file.path(), &url, &args)?;
            slots.push(Slot {
                args,
                child,
                kind: Chaos::KillServe,
            });
        }
        for role in &config.session.roles {
            for _ in 0..workers_per_role.max(1) {
                let args = vec!["agent".to_owned(), "--role".to_owned(), role.to_string()];
                let child = spawn(file.path(), &url, &args)?;
                slots.push(Slot {
                    args,
                    child,
                    kind: Chaos::KillAgents,
                });
            }
        }
        Ok(Self {
            slots: Arc::new(Mutex::new(slots)),
            config_file: file,
            url,
            killed: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        })
    }

    /// Every `every`, SIGKILLs a random process of the chosen kinds and restarts it.
    pub(crate) fn unleash(&self, kinds: Vec<Chaos>, every: Duration) {
        let (slots, killed, stop) = (self.slots.clone(), self.killed.clone(), self.stop.clone());
        let (path, url) = (self.config_file.path().to_path_buf(), self.url.clone());
        tokio::spawn(async move {
            let mut n: u64 = 0x9E37_79B9;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let mut slots = slots.lock().await;
                let victims: Vec<usize> = (0..slots.len())
                    .filter(|i| kinds.contains(&slots[*i].kind))
                    .collect();
                if victims.is_empty() {
                    return;
                }
                // xorshift: a cheap, seeded choice.
                n ^= n << 13;
                n ^= n >> 7;
                n ^= n << 17;
                let slot = &mut slots[victims[(n % victims.len() as u64) as usize]];
                let _ = slot.child.kill();
                let _ = slot.child.wait();
                killed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(args = ?slot.args, "chaos: killed");
                match spawn(&path, &url, &slot.args) {
                    Ok(c) => slot.child = c,
                    Err(e) => tracing::error!(error = %e, "chaos: restart failed"),
                }
            }
        });
    }

    /// The process ids of the `serve` processes now.
    pub(crate) async fn serve_pids(&self) -> Vec<u32> {
        self.slots
            .lock()
            .await
            .iter()
            .filter(|s| s.kind == Chaos::KillServe)
            .map(|s| s.child.id())
            .collect()
    }

    /// The process ids of the fleet now.
    pub(crate) async fn pids(&self) -> Vec<u32> {
        self.slots
            .lock()
            .await
            .iter()
            .map(|s| s.child.id())
            .collect()
    }

    /// Stops the chaos loop; the processes keep running.
    pub(crate) fn calm(&self) {
        self.stop.cancel();
    }

    /// Stops the chaos loop and every process.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let mut slots = self.slots.lock().await;
        for s in slots.iter_mut() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

/// Every `every`, kills a random node of `server` with SIGKILL, leaves it down for a
/// while (half the interval, at most 5 s) and restarts it on its store, until `stop`.
/// A restart that fails ends the loop (and is logged): the run then shows what a lost
/// node does.
pub(crate) async fn kill_nats(
    server: Arc<std::sync::Mutex<crate::embedded::Embedded>>,
    every: Duration,
    killed: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let down = (every / 2).min(Duration::from_secs(5));
    let mut n: u64 = 0x2545_F491;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        n ^= n << 13;
        n ^= n >> 7;
        n ^= n << 17;
        let node = match server.lock() {
            Ok(mut s) => s.kill(n),
            Err(_) => return,
        };
        killed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = node + 1, "chaos: killed a nats-server node");
        // Restarted even after `stop`: the run's checks need every node back.
        tokio::time::sleep(down).await;
        let s = server.clone();
        let restarted = tokio::task::spawn_blocking(move || match s.lock() {
            Ok(mut s) => s.restart(node),
            Err(_) => Err(anyhow::anyhow!("the server handle was poisoned")),
        })
        .await;
        match restarted {
            Ok(Ok(())) => tracing::info!(node = node + 1, "chaos: nats-server node back"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "chaos: nats-server restart failed");
                return;
            }
            Err(_) => return,
        }
    }
}

/// Message counters read from the server (processes keep their own counters, which
/// die with them): tasks stored, deliveries beyond the first, dead letters.
pub(crate) async fn server_counters(bus: &Bus, backlog: u64) -> anyhow::Result<CountersSnapshot> {
    let names = bus.names();
    let orchestrator = names.stream_inbox(&flotilla_protocol::Role::orchestrator());
    let mut stored = 0;
    let mut dispatched = 0;
    let mut redelivered = 0;
    let mut found: HashMap<String, u64> = HashMap::new();
    for name in bus.inbox_streams().await? {
        let s = bus.stream(&name).await?;
        let last = s.state().await?.last_sequence;
        stored += last;
        if name != orchestrator {
            dispatched += last;
        }
        redelivered += s.redeliveries().await?;
        found.insert(name, last);
    }
    let dead_lettered = bus.dead_letters().await?.state().await?.messages;
    Ok(CountersSnapshot {
        dispatched,
        acked: stored.saturating_sub(backlog).saturating_sub(dead_lettered),
        redelivered,
        dead_lettered,
        ..CountersSnapshot::default()
    })
}

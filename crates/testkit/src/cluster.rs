//! A 3-node `nats-server` cluster with JetStream on 127.0.0.1: client, route and
//! monitoring ports chosen up front, a temporary store per node, ready once every node
//! is healthy and agrees on the JetStream meta leader. Nodes can be killed with SIGKILL,
//! restarted on their store, frozen (SIGSTOP) and thawed (SIGCONT). Everything is
//! killed and removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{LaunchError, healthz, locate_nats_server, monitor_get};

/// Nodes in the cluster.
pub const NODES: usize = 3;

struct Node {
    name: String,
    client_port: u16,
    route_port: u16,
    monitor_port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running 3-node cluster.
pub struct NatsCluster {
    binary: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl std::fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCluster")
            .field("urls", &self.urls())
            .finish_non_exhaustive()
    }
}

/// `n` free loopback ports (bound then released: another process could take one in
/// between, which the start then reports).
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

impl NatsCluster {
    /// Starts three nodes and waits (up to 60 s) until the cluster is ready.
    pub fn start() -> Result<Self, LaunchError> {
        Self::start_with(locate_nats_server(&[])?)
    }

    /// [`NatsCluster::start`] with this `nats-server` binary. A node that finds one of
    /// its ports taken (another process bound it between [`free_ports`] and the
    /// node's start: another test's server, say) fails at once; the cluster is then
    /// started again on new ports, up to three times.
    pub fn start_with(binary: PathBuf) -> Result<Self, LaunchError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(binary.clone()) {
                Err(LaunchError::Io(e))
                    if tries < 3 && e.to_string().contains("address already in use") => {}
                other => return other,
            }
        }
    }

    fn start_once(binary: PathBuf) -> Result<Self, LaunchError> {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-cluster-")
            .tempdir()?;
        let ports = free_ports(3 * NODES)?;
        let nodes = (0..NODES)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                client_port: ports[i],
                route_port: ports[NODES + i],
                monitor_port: ports[2 * NODES + i],
                store: dir.path().join(format!("n{}", i + 1)),
                log: dir.path().join(format!("n{}.log", i + 1)),
                child: None,
            })
            .collect();
        let mut cluster = Self { binary, dir, nodes };
        for i in 0..NODES {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(None, Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), LaunchError> {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.route_port))
            .collect();
        let n = &self.nodes[i];
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-js", "--server_name", &n.name])
            .args(["-p", &n.client_port.to_string()])
            .args(["-m", &n.monitor_port.to_string()])
            .arg("-sd")
            .arg(&n.store)
            .args(["--cluster_name", "flotilla-test"])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", n.route_port)])
            .args(["--routes", &routes.join(",")])
            .arg("-l")
            .arg(&n.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// Waits until every running node but `except` is healthy and they all name the
    /// same meta leader, a running node.
    fn wait_ready(&mut self, except: Option<usize>, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            for (i, n) in self.nodes.iter_mut().enumerate() {
                if let Some(c) = n.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    return Err(LaunchError::Io(std::io::Error::other(format!(
                        "node {} exited with {status}: {}",
                        i + 1,
                        tail(&n.log, 20)
                    ))));
                }
            }
            let live: Vec<usize> = (0..NODES).filter(|i| Some(*i) != except).collect();
            let leaders: Vec<Option<String>> = live
                .iter()
                .map(|i| {
                    let n = &self.nodes[*i];
                    healthz(n.monitor_port)
                        .then(|| meta_leader(n.monitor_port))
                        .flatten()
                })
                .collect();
            if let Some(Some(first)) = leaders.first()
                && leaders.iter().all(|l| l.as_ref() == Some(first))
                && let Some(leader) = live.iter().find(|i| &self.nodes[**i].name == first)
                // The whole cluster: the leader also sees both followers current, so
                // losing it at once leaves two nodes that know each other to elect
                // the next (a leader killed right after its election could leave them
                // without a meta leader for good).
                && (except.is_some()
                    || meta_followers_current(self.nodes[*leader].monitor_port) == NODES - 1)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let tails: Vec<String> = self.nodes.iter().map(|n| tail(&n.log, 8)).collect();
        Err(LaunchError::NotReady(timeout, tails.join("\n---\n")))
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// The client URLs as one comma-separated string (as `FLOTILLA_NATS__URL` takes).
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// The client URL of node `i` (0-based).
    pub fn url(&self, i: usize) -> String {
        self.urls()[i].clone()
    }

    /// The monitoring port of node `i`.
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].monitor_port
    }

    /// The process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        (0..NODES).filter_map(|i| self.pid(i)).collect()
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// The server name of node `i` (what stream info names as a group's leader).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node (0-based) that is the JetStream meta leader, as node `asking` sees it.
    pub fn meta_leader(&self, asking: usize) -> Option<usize> {
        let name = meta_leader(self.nodes[asking].monitor_port)?;
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The temporary directory (a store and a log per node).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills node `i` with SIGKILL (its store stays, for [`NatsCluster::restart`]).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its store and waits until the cluster is whole.
    pub fn restart(&mut self, i: usize) -> Result<(), LaunchError> {
        self.kill9(i);
        self.spawn(i)?;
        self.wait_ready(None, Duration::from_secs(60))
    }

    /// Whether every running node reports itself healthy (`/healthz`: JetStream
    /// enabled and every stream and consumer it hosts current with its group).
    pub fn healthy(&self) -> bool {
        (0..NODES)
            .filter(|i| self.nodes[*i].child.is_some())
            .all(|i| {
                monitor_get(self.nodes[i].monitor_port, "/healthz")
                    .is_some_and(|body| body.contains("\"ok\""))
            })
    }

    /// Waits until [`NatsCluster::healthy`]: a restarted node has caught up. Losing
    /// another node before then may leave a stream group without a quorum.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let tails: Vec<String> = self.nodes.iter().map(|n| tail(&n.log, 8)).collect();
        Err(LaunchError::NotReady(timeout, tails.join("\n---\n")))
    }

    /// Waits until the other nodes agree on a meta leader without node `i` (after it
    /// was killed or frozen).
    pub fn wait_ready_without(&mut self, i: usize) -> Result<(), LaunchError> {
        self.wait_ready(Some(i), Duration::from_secs(60))
    }

    /// Freezes node `i` (SIGSTOP): its connections stay open, it answers nothing.
    pub fn freeze(&self, i: usize) -> std::io::Result<()> {
        self.signal(i, "-STOP")
    }

    /// Thaws node `i` (SIGCONT).
    pub fn thaw(&self, i: usize) -> std::io::Result<()> {
        self.signal(i, "-CONT")
    }

    fn signal(&self, i: usize, sig: &str) -> std::io::Result<()> {
        let Some(pid) = self.pid(i) else {
            return Err(std::io::Error::other(format!("node {i} is not running")));
        };
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("kill {sig} {pid}: {status}")))
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            // A frozen process cannot die until it is thawed.
            let _ = self.thaw(i);
            self.kill9(i);
        }
    }
}

/// The meta leader's server name, as the node at `port` reports it.
fn meta_leader(port: u16) -> Option<String> {
    let body = monitor_get(port, "/jsz")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["meta_cluster"]["leader"]
        .as_str()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
}

/// How many meta group followers the node (the meta leader) sees as current and online
/// (a peer it has not heard the statistics of yet is offline to stream placement:
/// "no suitable peers for placement").
fn meta_followers_current(port: u16) -> usize {
    let Some(body) = monitor_get(port, "/jsz") else {
        return 0;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return 0;
    };
    v["meta_cluster"]["replicas"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter(|p| {
                    p["current"].as_bool() == Some(true) && p["offline"].as_bool() != Some(true)
                })
                .count()
        })
        .unwrap_or(0)
}

fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forms, loses its meta leader to SIGKILL and elects another, takes the node back,
    /// survives a frozen node, and leaves nothing behind.
    #[test]
    fn a_cluster_forms_loses_a_node_and_takes_it_back() {
        let mut c = NatsCluster::start().unwrap();
        assert_eq!(c.url_list().split(',').count(), 3);
        let leader = c.meta_leader(0).unwrap();
        c.kill9(leader);
        c.wait_ready_without(leader).unwrap();
        let other = (leader + 1) % NODES;
        let new_leader = c.meta_leader(other).unwrap();
        assert_ne!(new_leader, leader, "a new meta leader among the two left");
        c.restart(leader).unwrap();
        assert_eq!(
            c.meta_leader(leader),
            Some(new_leader),
            "the restarted node rejoined"
        );
        let frozen = (new_leader + 1) % NODES;
        c.freeze(frozen).unwrap();
        c.wait_ready_without(frozen).unwrap();
        c.thaw(frozen).unwrap();
        let dir = c.dir().to_path_buf();
        drop(c);
        assert!(!dir.exists(), "stores removed on drop");
    }
}

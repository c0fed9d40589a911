//! `flotilla`: run the control plane, agent pools, submit tasks, demo and bench.
//!
//! A thin binary: parse arguments, load the layered configuration, install tracing
//! and signal handling, and call into the libraries.

mod chaos;
mod cmd;
mod config;
mod embedded;
mod load;
mod procstat;
mod telemetry;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use flotilla_protocol::{Role, SessionId};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: a session's path allocates many small,
/// short-lived buffers (messages, records, futures) across threads, where glibc's
/// malloc spent about a sixth of the fleet's CPU in scenario A and kept freed memory
/// in per-thread arenas (BENCHMARKS.md, 2026-12-03).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc settings for the fleet's long-running processes (`serve`, `agent`): give
/// freed pages back to the system at once and commit arena memory as it is used. By
/// default mimalloc keeps freed pages for reuse, which a process holding thousands of
/// sessions through their model calls pays for in resident memory (about a third of
/// the fleet's peak at 2,000 sessions in flight, at the same CPU: BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
const FLEET_ALLOCATOR_SETTINGS: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "0"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
];

/// Applies [`FLEET_ALLOCATOR_SETTINGS`]. mimalloc reads them from the environment
/// only, once, before the first allocation, so the process starts itself again
/// (`exec`: the same pid, arguments and environment) with those of them that are not
/// set. Anything an operator set, to any value, is kept; with all of them set nothing
/// happens. If the restart fails, the process goes on with mimalloc's defaults.
#[cfg(feature = "mimalloc")]
fn fleet_allocator_settings() {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let missing: Vec<_> = FLEET_ALLOCATOR_SETTINGS
            .iter()
            .filter(|(k, _)| std::env::var_os(k).is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut again = std::process::Command::new(exe);
        again.args(std::env::args_os().skip(1));
        for (k, v) in missing {
            again.env(k, v);
        }
        let err = again.exec();
        eprintln!(
            "flotilla: could not restart with the allocator settings ({err}); going on with mimalloc's defaults"
        );
    }
}

/// Flotilla: coordinates fleets of LLM agents over NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    /// Configuration file (default: config/flotilla.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// NATS URL; overrides `nats.url`. For demo and bench: use this server instead
    /// of starting an embedded one.
    #[arg(long, global = true)]
    nats_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: admission, the submit queue and the orchestrator.
    Serve {
        /// Serve Prometheus metrics at http://<addr>/metrics (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Run a worker pool process for one role.
    Agent {
        /// The role to serve.
        #[arg(long)]
        role: Role,
        /// Tasks handled at once by this process (overrides `worker.concurrency`).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Serve Prometheus metrics at http://<addr>/metrics.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Submit a task; prints the session id (and, with --wait, the answer).
    Submit(SubmitArgs),
    /// Start a private NATS, serve and a pool per role, and run sessions with a progress bar.
    Demo(LoadArgs),
    /// Load generators.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Dead letters: list, show, replay.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Print a session record as JSON.
    Session {
        /// The session id.
        session_id: SessionId,
    },
    /// Sessions, newest first: status, age, tokens, roles, and why a failed one failed.
    Sessions {
        /// Only sessions in this status (planning, running, synthesizing, completed,
        /// failed, cancelled, deadline_exceeded).
        #[arg(long)]
        status: Option<String>,
        /// Only sessions opened within this long (e.g. 10m, 2h).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A session's timeline, live until `done` (or replayed once it has ended).
    Watch {
        /// The session id.
        session_id: SessionId,
        /// One event per line as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The fleet's processes from their presence, pinged: role, work in flight, last
    /// heartbeat; a process whose presence outlived it is marked GHOST.
    Agents {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a session: its work in flight stops, nothing more is dispatched, its slot
    /// is freed and `done` says `cancelled`. Cancelling an ended session says how it
    /// ended.
    Cancel {
        /// The session id.
        session_id: SessionId,
        /// Why (kept in the record and the `done` event).
        #[arg(long)]
        reason: Option<String>,
        /// The reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Answer the question a session's task waits on (see `input_requested` in
    /// `flotilla watch`); the task goes on with the answer.
    Answer {
        /// The session id.
        session_id: SessionId,
        /// The answer.
        answer: String,
        /// The task whose question it answers (needed only while several wait).
        #[arg(long)]
        task: Option<flotilla_protocol::TaskId>,
        /// The reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A session's shared memory: keys, revisions and values (one key in full).
    Memory {
        /// The session id.
        session_id: SessionId,
        /// One key, printed in full.
        key: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// The task, in natural language.
    task: String,
    /// Wait for the answer and print it.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Worker roles for the session (comma-separated; default: every configured role).
    #[arg(long, value_delimiter = ',')]
    roles: Vec<Role>,
    /// Submit through the durable `<p>.submit` queue instead of the request/reply endpoint.
    #[arg(long)]
    queue: bool,
    /// Send the tasks' questions to a person (answer with `flotilla answer`).
    #[arg(long)]
    human_input: bool,
    /// End the session (outcome `deadline_exceeded`, finished tasks kept) if it runs
    /// longer than this, e.g. 90s or 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List the newest dead letters.
    Ls {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter, payload included.
    Show {
        /// Its sequence in the dead-letter stream (from `ls`).
        seq: u64,
    },
    /// Publish a dead letter back to its subject and remove it from the dead-letter stream.
    Replay {
        /// Its sequence in the dead-letter stream (from `ls`).
        seq: u64,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Run sessions end to end and report latency and throughput.
    Sessions(LoadArgs),
    /// Concurrent appends to one shared-memory list: no lost updates, conflict rate,
    /// and the wrapper's cost against raw KV calls.
    Memory(MemoryBenchArgs),
    /// (internal) one process of `bench memory --processes P`.
    #[command(hide = true)]
    MemoryWorker(MemoryWorkerArgs),
    /// P processes call a fake OpenAI-compatible server enforcing RPM and TPM through
    /// the fleet rate limiter: 429s, quota used, permit rate, added delay.
    Limits(LimitsBenchArgs),
    /// One client opens sessions at many times what the pool admits: `pool_full`
    /// answers with `retry_after_ms`, `serve`'s memory, and the latency of the
    /// sessions already running, against a phase without the flood.
    Flood(cmd::flood::FloodArgs),
    /// (internal) one process of `bench limits --processes P`.
    #[command(hide = true)]
    LimitsWorker(LimitsWorkerArgs),
}

#[derive(Debug, Clone, Args)]
struct LimitsBenchArgs {
    /// Requests per window the fake provider allows.
    #[arg(long, default_value_t = 600)]
    rpm: u64,
    /// Tokens per window the fake provider allows.
    #[arg(long, default_value_t = 40_000)]
    tpm: u64,
    /// Caller processes.
    #[arg(long, default_value_t = 4)]
    processes: usize,
    /// Concurrent callers per process.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to run, seconds.
    #[arg(long, default_value_t = 120.0)]
    duration_s: f64,
    /// The provider's accounting window, seconds (RPM/TPM: 60).
    #[arg(long, default_value_t = 60.0)]
    window_s: f64,
    /// The fake provider's latency per call, ms.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct LimitsWorkerArgs {
    /// The fake provider's base URL.
    #[arg(long)]
    base_url: String,
    /// Requests per window.
    #[arg(long)]
    rpm: u64,
    /// Tokens per window.
    #[arg(long)]
    tpm: u64,
    /// Window, seconds.
    #[arg(long)]
    window_s: f64,
    /// Seconds to run.
    #[arg(long)]
    duration_s: f64,
    /// Concurrent callers.
    #[arg(long)]
    concurrency: usize,
}

#[derive(Debug, Clone, Args)]
struct MemoryBenchArgs {
    /// Writers in total.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Appends per writer.
    #[arg(long, default_value_t = 100)]
    appends: usize,
    /// Processes the writers are spread over.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct MemoryWorkerArgs {
    /// The session whose memory is written.
    #[arg(long)]
    session: SessionId,
    /// First writer number.
    #[arg(long)]
    first: usize,
    /// Writers in this process.
    #[arg(long)]
    writers: usize,
    /// Appends per writer.
    #[arg(long)]
    appends: usize,
}

#[derive(Debug, Clone, Args)]
struct LoadArgs {
    /// Sessions to run.
    #[arg(long, default_value_t = 24)]
    sessions: u64,
    /// Sessions in flight at once (default: all of them, up to 64).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Mean simulated LLM latency per call, ms (overrides `llm.simulated.latency_ms`).
    #[arg(long)]
    llm_latency_ms: Option<u64>,
    /// Worker processes per role.
    #[arg(long, default_value_t = 2)]
    workers_per_role: usize,
    /// `serve` instances.
    #[arg(long, default_value_t = 1)]
    serve_instances: usize,
    /// Give up on a session after this many seconds.
    #[arg(long, default_value_t = 600)]
    session_timeout_s: u64,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Run the fleet as OS processes and SIGKILL a random one of these kinds every
    /// --chaos-every-ms, restarting it (repeat the flag for several kinds; `kill-nats`
    /// kills a node of the embedded server on its own timer).
    #[arg(long, value_enum)]
    chaos: Vec<chaos::Chaos>,
    /// Interval between chaos kills.
    #[arg(long, default_value_t = 3000)]
    chaos_every_ms: u64,
    /// Sessions open at once across the fleet (overrides `session.pool_size`).
    #[arg(long)]
    pool_size: Option<u32>,
    /// Run on an embedded 3-node cluster with every stream and bucket on three
    /// replicas (`--cluster 3`) instead of one embedded server.
    #[arg(long)]
    cluster: Option<usize>,
    /// Run the fleet as OS processes (`serve` and `agent --role R`, as `--chaos` does)
    /// so its memory and CPU are measured apart from the load generator's.
    #[arg(long)]
    processes: bool,
    /// Monitoring port (on 127.0.0.1) of an external server given with `--nats-url`,
    /// for the server-side figures (messages, CPU and memory need the embedded server).
    #[arg(long)]
    nats_monitor_port: Option<u16>,
    /// Serve the in-process fleet's Prometheus metrics at http://<addr>/metrics.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Cancels the token on Ctrl-C or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    #[cfg(feature = "mimalloc")]
    if matches!(cli.command, Command::Serve { .. } | Command::Agent { .. }) {
        fleet_allocator_settings();
    }
    let mut config = config::load(cli.config.as_deref())?;
    if let Some(url) = &cli.nats_url {
        config.nats.url = url.clone();
    }
    let quiet = !matches!(cli.command, Command::Serve { .. } | Command::Agent { .. });
    let service = match &cli.command {
        Command::Serve { .. } => "flotilla-serve".to_owned(),
        Command::Agent { role, .. } => format!("flotilla-agent-{role}"),
        Command::Demo(_) => "flotilla-demo".to_owned(),
        Command::Bench(_) => "flotilla-bench".to_owned(),
        _ => "flotilla".to_owned(),
    };
    let _telemetry = telemetry::init(
        if quiet { "warn" } else { &config.log },
        &config.telemetry,
        &service,
    )?;
    match cli.command {
        Command::Serve { metrics_addr } => {
            cmd::serve_metrics(metrics_addr)?;
            cmd::serve(config, shutdown_on_signal()).await
        }
        Command::Agent {
            role,
            concurrency,
            metrics_addr,
        } => {
            cmd::serve_metrics(metrics_addr)?;
            cmd::agent(config, role, concurrency, shutdown_on_signal()).await
        }
        Command::Submit(a) => cmd::submit(config, a).await,
        Command::Demo(a) => {
            cmd::serve_metrics(a.metrics_addr)?;
            cmd::load(config, a, cli.nats_url.is_some(), true).await
        }
        Command::Bench(BenchCommand::Sessions(a)) => {
            cmd::serve_metrics(a.metrics_addr)?;
            cmd::load(config, a, cli.nats_url.is_some(), false).await
        }
        Command::Bench(BenchCommand::Memory(a)) => {
            cmd::memory_bench::bench(config, a, cli.nats_url.is_some()).await
        }
        Command::Bench(BenchCommand::MemoryWorker(a)) => cmd::memory_bench::worker(config, a).await,
        Command::Bench(BenchCommand::Limits(a)) => {
            cmd::limits_bench::run(config, a, cli.nats_url.is_some()).await
        }
        Command::Bench(BenchCommand::LimitsWorker(a)) => cmd::limits_bench::worker(config, a).await,
        Command::Bench(BenchCommand::Flood(a)) => {
            cmd::flood::run(config, a, cli.nats_url.is_some()).await
        }
        Command::Session { session_id } => cmd::session(config, session_id).await,
        Command::Dlq(c) => cmd::dlq(config, c).await,
        Command::Sessions {
            status,
            since,
            limit,
            json,
        } => cmd::views::sessions(config, status, since, limit, json).await,
        Command::Watch { session_id, json } => cmd::views::watch(config, session_id, json).await,
        Command::Agents { json } => cmd::views::agents(config, json).await,
        Command::Cancel {
            session_id,
            reason,
            json,
        } => cmd::cancel(config, session_id, reason, json).await,
        Command::Answer {
            session_id,
            answer,
            task,
            json,
        } => cmd::answer(config, session_id, task, answer, json).await,
        Command::Memory {
            session_id,
            key,
            json,
        } => cmd::views::memory(config, session_id, key, json).await,
    }
}

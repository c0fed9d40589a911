//! The session load generator behind `flotilla demo` and `flotilla bench sessions`:
//! runs N sessions with C in flight through the real admission endpoint, and summarizes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_bus::{Bus, CountersSnapshot};
use flotilla_control::{Client, Finished, RunError};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How each session ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Completed with an answer, after `rejections` "pool full" answers.
    Completed(Finished, u32),
    /// Ended without an answer, or refused.
    Failed(String),
    /// Admitted, but no `done` event in time.
    Lost(String),
}

/// Live progress, read by the progress bar.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Sessions completed.
    pub(crate) completed: AtomicU64,
    /// Sessions failed.
    pub(crate) failed: AtomicU64,
    /// Sessions lost.
    pub(crate) lost: AtomicU64,
}

impl Progress {
    /// Sessions ended so far.
    pub(crate) fn ended(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.lost.load(Ordering::Relaxed)
    }
}

/// The end-of-run summary (`--json` prints it as one line).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    /// Sessions attempted.
    pub(crate) sessions: u64,
    /// Completed with an answer.
    pub(crate) completed: u64,
    /// Ended without an answer or refused.
    pub(crate) failed: u64,
    /// Lost sessions plus lost messages: must be 0.
    pub(crate) lost: u64,
    /// Admitted but never finished.
    pub(crate) lost_sessions: u64,
    /// Median session latency (first open request to `done` event), ms.
    pub p50_ms: u64,
    /// 99th percentile session latency, ms.
    pub p99_ms: u64,
    /// Slowest session, ms.
    pub(crate) max_ms: u64,
    /// Completed sessions per second of wall time.
    pub(crate) sessions_per_s: f64,
    /// Wall time of the run, ms.
    pub(crate) elapsed_ms: u64,
    /// Concurrency (sessions in flight).
    pub(crate) concurrency: usize,
    /// "Pool full" rejections answered (and retried) during the run.
    pub(crate) rejections: u64,
    /// Task messages published to worker inboxes.
    pub(crate) dispatched: u64,
    /// Inbox messages acknowledged.
    pub(crate) acked: u64,
    /// Redeliveries.
    pub(crate) redelivered: u64,
    /// Messages dead-lettered.
    pub(crate) dead_lettered: u64,
    /// Publishes the server de-duplicated by message id (harmless repeats).
    pub(crate) deduplicated: u64,
    /// Tasks with more than one accepted result (must be 0).
    pub(crate) duplicates: u64,
    /// Processes killed by `--chaos` (`serve` and agents).
    pub(crate) killed: u64,
    /// Server nodes killed and restarted by `--chaos kill-nats`.
    pub(crate) nats_killed: u64,
    /// Server nodes (1, or 3 with `--cluster 3`).
    pub(crate) nats_nodes: usize,
    /// Tasks the watchdog took from dead, frozen or stuck holders.
    pub(crate) reassigned: u64,
    /// Median delay from a holder's last sign of life to the release of its task, ms.
    pub(crate) reassign_p50_ms: u64,
    /// 99th percentile of that delay, ms.
    pub(crate) reassign_p99_ms: u64,
    /// `heartbeat_missed` events (a dead or frozen process held a session's work).
    pub(crate) heartbeat_missed: u64,
    /// Agent task attempts that waited for rate-limit permits (`rate_limit_wait`).
    pub(crate) rate_limit_waits: u64,
    /// Their total wait, ms.
    pub(crate) rate_limit_wait_ms: u64,
    /// Sessions ended by a budget (`budget_exhausted`).
    pub(crate) budget_exhausted: u64,
    /// Sessions ended by the circuit breaker (`circuit_open`).
    pub(crate) circuit_open: u64,
    /// Clarification exchanges answered.
    pub(crate) clarifications: u64,
    /// Shared-memory traffic: compare-and-set attempts, conflicts, retries, lock waits
    /// and expiries.
    pub(crate) memory: flotilla_bus::MemoryStats,
    /// Inbox messages neither acknowledged nor dead-lettered once the run was quiet.
    pub(crate) lost_messages: u64,
    /// What the run cost: server messages, LLM calls, CPU and memory.
    #[serde(flatten)]
    pub(crate) costs: Costs,
    /// Example answer summary (first completed session).
    #[serde(skip)]
    pub(crate) sample: Option<Finished>,
}

/// What a run cost, measured from outside the fleet: the server's own counters
/// (`/varz`), the processes' CPU time and peak memory (`/proc`), and the LLM calls made.
/// `None` where it could not be measured (an external server without `--nats-monitor-port`,
/// a fleet in the bench's own process).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Costs {
    /// Messages the server received (`in_msgs`) per completed session. On a cluster,
    /// the sum over its nodes: route and replication traffic included. Not measured
    /// when `--chaos kill-nats` restarts servers (their counters start again at 0).
    pub(crate) server_msgs_per_session: Option<f64>,
    /// Messages the server sent (`out_msgs`) per completed session.
    pub(crate) server_out_msgs_per_session: Option<f64>,
    /// Everything the server received during the run (`in_msgs` delta).
    pub(crate) all_publishes: Option<u64>,
    /// Publishes beyond the sessions' own: repeats the server de-duplicated, publish
    /// retries, redeliveries and re-sent starts. Healthy runs have 0.
    pub(crate) extra_publishes: u64,
    /// LLM calls started per completed session (plan + one per task + synthesis in a
    /// run without faults).
    pub(crate) llm_calls_per_session: Option<f64>,
    /// CPU time (user + system) of every process (fleet, load generator, server) per
    /// completed session, ms.
    pub(crate) cpu_ms_per_session: Option<f64>,
    /// CPU time of the bench process (the load generator, and the fleet unless it runs
    /// as its own processes), ms.
    pub(crate) bench_cpu_ms: Option<u64>,
    /// CPU time of the fleet's processes (with `--processes` or `--chaos`), ms.
    pub(crate) fleet_cpu_ms: Option<u64>,
    /// CPU time of the embedded nats-server, ms.
    pub(crate) server_cpu_ms: Option<u64>,
    /// Peak RSS of the bench process, KiB.
    pub(crate) bench_peak_rss_kb: Option<u64>,
    /// Peak RSS of the fleet's processes, added up, KiB.
    pub(crate) fleet_peak_rss_kb: Option<u64>,
    /// Of `fleet_peak_rss_kb`, the `serve` processes' (the rest is the agents'), KiB.
    pub(crate) serve_peak_rss_kb: Option<u64>,
    /// Peak RSS of the embedded nats-server, KiB.
    pub(crate) server_peak_rss_kb: Option<u64>,
}

impl Costs {
    fn per_in_flight(kb: Option<u64>, in_flight: usize) -> Option<f64> {
        kb.map(|k| k as f64 / in_flight.max(1) as f64)
    }

    fn print(&self, in_flight: usize) {
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let k =
            |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{:.1} MB", v as f64 / 1024.0));
        println!(
            "  cost          server msgs/session in {} out {}   llm calls/session {}   extra publishes {} of {}",
            f(self.server_msgs_per_session),
            f(self.server_out_msgs_per_session),
            f(self.llm_calls_per_session),
            self.extra_publishes,
            self.all_publishes.map_or("-".to_owned(), |v| v.to_string()),
        );
        println!(
            "  cpu           {} ms/session (bench {} ms, fleet {} ms, server {} ms)",
            f(self.cpu_ms_per_session),
            self.bench_cpu_ms.map_or("-".to_owned(), |v| v.to_string()),
            self.fleet_cpu_ms.map_or("-".to_owned(), |v| v.to_string()),
            self.server_cpu_ms.map_or("-".to_owned(), |v| v.to_string()),
        );
        println!(
            "  peak rss      bench {} ({} KB/session)   fleet {} ({} KB/session)   server {} ({} KB/session), {in_flight} in flight",
            k(self.bench_peak_rss_kb),
            f(Self::per_in_flight(self.bench_peak_rss_kb, in_flight)),
            k(self.fleet_peak_rss_kb),
            f(Self::per_in_flight(self.fleet_peak_rss_kb, in_flight)),
            k(self.server_peak_rss_kb),
            f(Self::per_in_flight(self.server_peak_rss_kb, in_flight)),
        );
        if let (Some(fleet), Some(serve)) = (self.fleet_peak_rss_kb, self.serve_peak_rss_kb) {
            println!(
                "  of the fleet  serve {} ({} KB/session)   agents {} ({} KB/session)",
                k(Some(serve)),
                f(Self::per_in_flight(Some(serve), in_flight)),
                k(Some(fleet.saturating_sub(serve))),
                f(Self::per_in_flight(
                    Some(fleet.saturating_sub(serve)),
                    in_flight
                )),
            );
        }
    }
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Runs `sessions` sessions, `concurrency` at a time.
pub(crate) async fn run(
    client: &Client,
    sessions: u64,
    concurrency: usize,
    timeout: Duration,
    progress: Arc<Progress>,
    task_text: impl Fn(u64) -> String,
) -> (Vec<(Outcome, Duration)>, Duration) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let start = Instant::now();
    for i in 0..sessions {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let client = client.clone();
        let text = task_text(i);
        let progress = progress.clone();
        set.spawn(async move {
            let t0 = Instant::now();
            let outcome = match client.run(&text, timeout).await {
                Ok((f, rej)) if f.completed() => {
                    progress.completed.fetch_add(1, Ordering::Relaxed);
                    Outcome::Completed(f, rej)
                }
                Ok((f, _)) => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    Outcome::Failed(format!("{:?}", f.event.body))
                }
                Err(RunError::Lost(s)) => {
                    progress.lost.fetch_add(1, Ordering::Relaxed);
                    Outcome::Lost(s.to_string())
                }
                Err(e) => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    Outcome::Failed(e.to_string())
                }
            };
            drop(permit);
            (outcome, t0.elapsed())
        });
    }
    let mut out = Vec::with_capacity(sessions as usize);
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    (out, start.elapsed())
}

/// Waits (up to `wait`) until the inbox stream is empty, and returns what is left.
pub(crate) async fn quiet_inbox(bus: &Bus, wait: Duration) -> u64 {
    let deadline = Instant::now() + wait;
    loop {
        let left = bus.inbox_backlog().await.unwrap_or(u64::MAX);
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Builds the summary.
pub(crate) fn summarize(
    results: Vec<(Outcome, Duration)>,
    elapsed: Duration,
    concurrency: usize,
    counters: CountersSnapshot,
    lost_messages: u64,
) -> Summary {
    let mut lat: Vec<u64> = Vec::new();
    let (mut completed, mut failed, mut lost, mut rejections) = (0, 0, 0, 0);
    let mut sample = None;
    let sessions = results.len() as u64;
    for (o, d) in results {
        match o {
            Outcome::Completed(f, rej) => {
                completed += 1;
                rejections += u64::from(rej);
                lat.push(d.as_millis() as u64);
                sample.get_or_insert(f);
            }
            Outcome::Failed(why) => {
                failed += 1;
                tracing::warn!(reason = %why, "session failed");
            }
            Outcome::Lost(s) => {
                lost += 1;
                tracing::warn!(session = %s, "session lost");
            }
        }
    }
    lat.sort_unstable();
    Summary {
        sessions,
        completed,
        failed,
        lost: lost + lost_messages,
        lost_sessions: lost,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0),
        sessions_per_s: completed as f64 / elapsed.as_secs_f64().max(1e-9),
        elapsed_ms: elapsed.as_millis() as u64,
        concurrency,
        rejections,
        dispatched: counters.dispatched,
        acked: counters.acked,
        redelivered: counters.redelivered,
        dead_lettered: counters.dead_lettered,
        deduplicated: counters.duplicates,
        duplicates: 0,
        killed: 0,
        nats_killed: 0,
        nats_nodes: 1,
        memory: counters.memory,
        reassigned: 0,
        reassign_p50_ms: 0,
        reassign_p99_ms: 0,
        heartbeat_missed: 0,
        rate_limit_waits: 0,
        rate_limit_wait_ms: 0,
        budget_exhausted: 0,
        circuit_open: 0,
        clarifications: 0,
        lost_messages,
        costs: Costs {
            extra_publishes: counters.duplicates + counters.publish_retries + counters.redelivered,
            ..Costs::default()
        },
        sample,
    }
}

impl Summary {
    /// The human-readable table.
    pub(crate) fn print_table(&self) {
        println!();
        println!(
            "  sessions      {:>8}   completed {:>8}   failed {:>6}   lost {:>6}",
            self.sessions, self.completed, self.failed, self.lost_sessions
        );
        println!(
            "  latency p50   {:>6} ms   p99 {:>8} ms   max {:>8} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        );
        println!(
            "  throughput    {:>8.1} sessions/s over {:.1} s at concurrency {}",
            self.sessions_per_s,
            self.elapsed_ms as f64 / 1000.0,
            self.concurrency
        );
        println!(
            "  admission     {:>8} pool-full rejections retried",
            self.rejections
        );
        println!(
            "  messages      dispatched {} / acked {} / redelivered {} / dead-lettered {} / de-duplicated {} / lost {}",
            self.dispatched,
            self.acked,
            self.redelivered,
            self.dead_lettered,
            self.deduplicated,
            self.lost_messages
        );
        println!(
            "  guarantees    duplicate results {}   processes killed {}   server nodes killed {} of {}   tasks reassigned {} (p50 {} ms, p99 {} ms after the holder's last sign of life)",
            self.duplicates,
            self.killed,
            self.nats_killed,
            self.nats_nodes,
            self.reassigned,
            self.reassign_p50_ms,
            self.reassign_p99_ms
        );
        println!(
            "  liveness      heartbeats missed {}   budgets  exhausted {} / circuits opened {} / clarifications {}   rate-limit waits {} ({} ms)",
            self.heartbeat_missed,
            self.budget_exhausted,
            self.circuit_open,
            self.clarifications,
            self.rate_limit_waits,
            self.rate_limit_wait_ms
        );
        let m = &self.memory;
        println!(
            "  memory        compare-and-set {} / conflicts {} / retries {} / lock waits {} / lock expiries {}",
            m.cas_attempts, m.conflicts, m.retries, m.lock_waits, m.lock_expiries
        );
        self.costs.print(self.concurrency);
    }
}

/// Tasks with more than one accepted result, from the session records of `results`.
pub(crate) async fn duplicate_results(bus: &Bus, results: &[(Outcome, Duration)]) -> u64 {
    let mut dup = 0;
    for (o, _) in results {
        if let Outcome::Completed(f, _) = o
            && let Ok(Some((rec, _))) = bus
                .sessions()
                .get::<flotilla_protocol::SessionRecord>(
                    &flotilla_protocol::subject::keys::session(&f.session_id),
                )
                .await
        {
            dup += u64::from(rec.counters.accepted).saturating_sub(rec.tasks.len() as u64);
        }
    }
    dup
}

/// Logs, for every lost session, where the server's state has it: the session record's
/// status and task table, each task record's run state and holder, and whether a `done`
/// event is stored (then the session ended and only its client did not hear it).
pub(crate) async fn autopsy(bus: &Bus, results: &[(Outcome, Duration)]) {
    use flotilla_protocol::subject::keys;
    use flotilla_protocol::{SessionRecord, TaskRecord};
    let names = bus.names();
    let events = bus.stream(&names.stream_events()).await.ok();
    for (o, _) in results {
        let Outcome::Lost(sid) = o else { continue };
        let Ok(session) = sid.parse::<flotilla_protocol::SessionId>() else {
            continue;
        };
        let done = match &events {
            Some(stream) => matches!(
                stream
                    .last_message(&names.event(&session, flotilla_protocol::EventKindName::Done))
                    .await,
                Ok(Some(_))
            ),
            None => false,
        };
        let record = bus
            .sessions()
            .get::<SessionRecord>(&keys::session(&session))
            .await;
        let Ok(Some((rec, _))) = record else {
            tracing::warn!(session = %session, done_stored = done, record = ?record.map(|r| r.is_some()), "lost session: no session record");
            continue;
        };
        let mut tasks = Vec::new();
        for t in &rec.tasks {
            let mut run = Vec::new();
            for key in [
                keys::claim(&session, &t.role, &t.task_id),
                keys::task(&session, &t.role, &t.task_id),
            ] {
                run.push(
                    bus.sessions()
                        .get::<TaskRecord>(&key)
                        .await
                        .ok()
                        .flatten()
                        .map(|(r, _)| format!("{:?}/{:?}#{}", r.state, r.holder, r.attempt)),
                );
            }
            tasks.push(format!(
                "{}:{:?}#{} claim,commit={run:?}",
                t.task_id, t.state, t.attempt
            ));
        }
        tracing::warn!(session = %session, done_stored = done, status = ?rec.status, tasks = ?tasks, "lost session");
    }
}

/// Reads the liveness, rate-limit and budget events of the run from the event log
/// into `summary`: counts, and the reassignment delays' percentiles.
pub(crate) async fn tally_events(bus: &Bus, summary: &mut Summary) {
    use flotilla_protocol::{Event, EventBody};
    let names = bus.names();
    let subjects = [
        "reassigned",
        "heartbeat_missed",
        "rate_limit_wait",
        "budget_exhausted",
        "circuit_open",
        "clarification",
    ]
    .map(|k| format!("{}.s.*.ev.{k}", names.prefix()))
    .to_vec();
    let Ok(stream) = bus.stream(&names.stream_events()).await else {
        return;
    };
    let Ok(mut msgs) = stream.replay(&subjects).await else {
        return;
    };
    let mut delays = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        let Ok(Event { body, .. }) = serde_json::from_slice::<Event>(&m.payload) else {
            continue;
        };
        match body {
            EventBody::Reassigned { after_ms, .. } => delays.push(after_ms),
            EventBody::HeartbeatMissed { .. } => summary.heartbeat_missed += 1,
            EventBody::RateLimitWait {
                calls, waited_ms, ..
            } => {
                summary.rate_limit_waits += calls;
                summary.rate_limit_wait_ms += waited_ms;
            }
            EventBody::BudgetExhausted { .. } => summary.budget_exhausted += 1,
            EventBody::CircuitOpen { .. } => summary.circuit_open += 1,
            EventBody::Clarification { closed: false, .. } => summary.clarifications += 1,
            _ => {}
        }
    }
    delays.sort_unstable();
    summary.reassigned = delays.len() as u64;
    summary.reassign_p50_ms = percentile(&delays, 0.50);
    summary.reassign_p99_ms = percentile(&delays, 0.99);
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}

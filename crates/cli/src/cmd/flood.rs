//! `bench flood`: overload without amplification, measured from outside.
//!
//! The fleet runs as OS processes on the embedded server (or `--nats-url`). Phase one
//! runs `--sessions` sessions alone: the usual latency. Phase two runs as many again
//! and, once they are admitted, one client opens sessions at `--multiplier` times the
//! rate the pool admits (pool size over phase one's median latency) for `--flood-s`
//! seconds, never retrying. Reported: what the flood was told (`pool_full` with
//! `retry_after_ms`, accepted, anything else), `serve`'s resident memory before and
//! during the flood, and phase two's latency against phase one's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla_bus::{Bus, Counters};
use flotilla_control::Client;
use flotilla_protocol::{ErrorCode, OpenReply, OpenSession};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::chaos::ProcessFleet;
use crate::config::Config;
use crate::load::{self, Outcome, Progress, percentile};

/// `bench flood` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct FloodArgs {
    /// Session slots (`session.pool_size`).
    #[arg(long, default_value_t = 40)]
    pool_size: u32,
    /// Sessions per phase (the flood's victims in phase two); fewer than the pool.
    #[arg(long, default_value_t = 20)]
    sessions: u64,
    /// Mean simulated LLM latency, ms.
    #[arg(long, default_value_t = 1000)]
    llm_latency_ms: u64,
    /// Open requests per second, as a multiple of the rate the pool admits.
    #[arg(long, default_value_t = 10.0)]
    multiplier: f64,
    /// How long the flood lasts, seconds.
    #[arg(long, default_value_t = 30)]
    flood_s: u64,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Latency of one phase's sessions.
#[derive(Debug, Default, Serialize)]
struct Phase {
    completed: u64,
    failed: u64,
    p50_ms: u64,
    p99_ms: u64,
}

/// What the flood was answered.
#[derive(Debug, Default, Serialize)]
struct Flood {
    rate_per_s: f64,
    seconds: u64,
    requests: u64,
    accepted: u64,
    pool_full: u64,
    /// `pool_full` answers that carried a positive `retry_after_ms`.
    pool_full_with_retry_after: u64,
    retry_after_p50_ms: u64,
    other_rejections: u64,
    /// Timeouts and transport errors (no answer at all).
    unanswered: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    pool_size: u32,
    llm_latency_ms: u64,
    alone: Phase,
    flooded: Phase,
    p50_ratio: f64,
    p99_ratio: f64,
    flood: Flood,
    serve_rss_before_kb: u64,
    serve_rss_peak_kb: u64,
}

fn phase(results: &[(Outcome, Duration)]) -> Phase {
    let mut ms: Vec<u64> = results
        .iter()
        .filter(|(o, _)| matches!(o, Outcome::Completed(..)))
        .map(|(_, d)| d.as_millis() as u64)
        .collect();
    ms.sort_unstable();
    Phase {
        completed: ms.len() as u64,
        failed: results.len() as u64 - ms.len() as u64,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
    }
}

pub(crate) async fn run(mut config: Config, a: FloodArgs, external: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.sessions >= 1 && a.sessions < u64::from(a.pool_size),
        "--sessions must be at least 1 and below --pool-size"
    );
    config.session.pool_size = a.pool_size;
    config.llm.simulated.latency_ms = a.llm_latency_ms;
    let _server = crate::embedded::unless_external(&mut config, external)?;
    let fleet = ProcessFleet::start(&config, 1, 2).await?;
    let bus = Bus::connect(
        &config.nats,
        "flotilla-flood",
        Arc::new(Counters::default()),
    )
    .await
    .context("connecting to NATS")?;
    let client = Client::new(bus.shared_connection(), bus.names().clone()).await?;
    let timeout = Duration::from_secs(300);
    let text = |i| format!("flood bench: explain JetStream (session #{i})");

    // A few sessions first, so that phase one does not pay for the fleet's start.
    load::run(
        &client,
        a.sessions.min(5),
        a.sessions.min(5) as usize,
        timeout,
        Arc::new(Progress::default()),
        text,
    )
    .await;
    // Phase one: the sessions alone.
    let (alone, _) = load::run(
        &client,
        a.sessions,
        a.sessions as usize,
        timeout,
        Arc::new(Progress::default()),
        text,
    )
    .await;
    let alone = phase(&alone);
    anyhow::ensure!(
        alone.completed > 0,
        "no session completed without the flood"
    );
    let admitted_per_s = f64::from(a.pool_size) / (alone.p50_ms.max(1) as f64 / 1000.0);
    let rate = (admitted_per_s * a.multiplier).max(1.0);

    let serve = fleet.serve_pids().await.first().copied();
    let rss = move || serve.and_then(crate::procstat::rss_kb).unwrap_or(0);
    let serve_rss_before_kb = rss();

    // Phase two: as many sessions again, then the flood once they are in.
    let victims = {
        let client = client.clone();
        let n = a.sessions;
        tokio::spawn(async move {
            load::run(
                &client,
                n,
                n as usize,
                timeout,
                Arc::new(Progress::default()),
                text,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = Arc::new(AtomicU64::new(serve_rss_before_kb));
    let sampling = tokio_util::sync::CancellationToken::new();
    {
        let (peak, stop) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let flood = flood(&client, rate, Duration::from_secs(a.flood_s)).await;
    let (flooded, _) = victims.await.context("phase two")?;
    sampling.cancel();
    let flooded = phase(&flooded);
    fleet.stop().await;

    let ratio = |b: u64, f: u64| f as f64 / b.max(1) as f64;
    let report = Report {
        pool_size: a.pool_size,
        llm_latency_ms: a.llm_latency_ms,
        p50_ratio: ratio(alone.p50_ms, flooded.p50_ms),
        p99_ratio: ratio(alone.p99_ms, flooded.p99_ms),
        alone,
        flooded,
        flood,
        serve_rss_before_kb,
        serve_rss_peak_kb: peak.load(Ordering::Relaxed),
    };
    println!(
        "alone:   {} completed, p50 {} ms, p99 {} ms",
        report.alone.completed, report.alone.p50_ms, report.alone.p99_ms
    );
    println!(
        "flooded: {} completed, p50 {} ms, p99 {} ms  (x{:.2} / x{:.2})",
        report.flooded.completed,
        report.flooded.p50_ms,
        report.flooded.p99_ms,
        report.p50_ratio,
        report.p99_ratio
    );
    println!(
        "flood:   {:.0}/s for {} s: {} requests, {} accepted, {} pool_full ({} with retry_after_ms, p50 {} ms), {} other, {} unanswered",
        report.flood.rate_per_s,
        report.flood.seconds,
        report.flood.requests,
        report.flood.accepted,
        report.flood.pool_full,
        report.flood.pool_full_with_retry_after,
        report.flood.retry_after_p50_ms,
        report.flood.other_rejections,
        report.flood.unanswered
    );
    println!(
        "serve:   {} KiB resident before, {} KiB peak during the flood",
        report.serve_rss_before_kb, report.serve_rss_peak_kb
    );
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// Opens sessions at `rate` per second for `duration`, never retrying, and tallies
/// the answers. At most 4096 requests wait for an answer at once.
async fn flood(client: &Client, rate: f64, duration: Duration) -> Flood {
    let in_flight = Arc::new(Semaphore::new(4096));
    let tally = Arc::new(std::sync::Mutex::new((Flood::default(), Vec::<u64>::new())));
    let every = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    while start.elapsed() < duration {
        let due = start + every.mul_f64(n as f64);
        tokio::time::sleep_until(due.into()).await;
        n += 1;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (client, tally) = (client.clone(), tally.clone());
        tasks.spawn(async move {
            let req = OpenSession::new(format!("flood #{n}"));
            let reply = client.open(&req, Duration::from_secs(10)).await;
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            t.0.requests += 1;
            match reply {
                Ok(OpenReply::Accepted { .. }) => t.0.accepted += 1,
                Ok(OpenReply::Rejected {
                    code: ErrorCode::PoolFull,
                    retry_after_ms,
                    ..
                }) => {
                    t.0.pool_full += 1;
                    if let Some(ms) = retry_after_ms.filter(|ms| *ms > 0) {
                        t.0.pool_full_with_retry_after += 1;
                        t.1.push(ms);
                    }
                }
                Ok(OpenReply::Rejected { .. }) => t.0.other_rejections += 1,
                Err(_) => t.0.unanswered += 1,
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let mut retry = std::mem::take(&mut t.1);
    retry.sort_unstable();
    let mut f = std::mem::take(&mut t.0);
    f.rate_per_s = rate;
    f.seconds = duration.as_secs();
    f.retry_after_p50_ms = percentile(&retry, 0.5);
    f
}

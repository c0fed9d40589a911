//! `flotilla bench memory`: N writers append to one shared list with `update_with`
//! (in this process, or spread over P processes), then the same update pattern through
//! raw async-nats KV calls, and the wrapper's cost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::kv;
use bytes::Bytes;
use flotilla_bus::{Bus, Counters, MemKey, MemoryStats};
use flotilla_protocol::{SessionId, subject::keys};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::{MemoryBenchArgs, MemoryWorkerArgs};

const KEY: &str = "list";

#[derive(Debug, Serialize)]
struct Report {
    writers: usize,
    processes: usize,
    appends: u64,
    final_len: u64,
    lost_updates: u64,
    duplicates: u64,
    cas_attempts: u64,
    conflicts: u64,
    retries: u64,
    conflict_rate: f64,
    ops_per_s: f64,
    raw_ops_per_s: f64,
    wrapper_overhead_pct: f64,
}

async fn connect(config: &Config, name: &str) -> anyhow::Result<Bus> {
    Bus::connect(&config.nats, name, Arc::new(Counters::default()))
        .await
        .context("connecting to NATS")
}

/// What one process of writers did: its counters and when it wrote (ms since the
/// epoch), connection set-up excluded.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub(crate) struct Phase {
    stats: MemoryStats,
    start_ms: u64,
    end_ms: u64,
}

/// Appends `appends` items as writers `first..first+writers`, each on its own
/// connection (connected before the clock starts); returns the summed counters.
async fn write(
    config: &Config,
    session: &SessionId,
    first: usize,
    writers: usize,
    appends: usize,
) -> anyhow::Result<Phase> {
    let mut buses = Vec::new();
    for w in first..first + writers {
        buses.push((w, connect(config, &format!("bench-memory-{w}")).await?));
    }
    let start_ms = flotilla_protocol::epoch_ms(std::time::SystemTime::now());
    let mut set = JoinSet::new();
    for (w, bus) in buses {
        let session = session.clone();
        set.spawn(async move {
            let mem = bus.memory().session(&session);
            let key = MemKey::parse(KEY)?;
            for i in 0..appends {
                let item = format!("w{w}-{i}");
                mem.update_with(&key, |l: Option<Vec<String>>| {
                    let mut l = l.unwrap_or_default();
                    l.push(item.clone());
                    l
                })
                .await?;
            }
            anyhow::Ok(bus.memory().stats())
        });
    }
    let mut stats = MemoryStats::default();
    while let Some(r) = set.join_next().await {
        let s = r??;
        stats.cas_attempts += s.cas_attempts;
        stats.conflicts += s.conflicts;
        stats.retries += s.retries;
    }
    Ok(Phase {
        stats,
        start_ms,
        end_ms: flotilla_protocol::epoch_ms(std::time::SystemTime::now()),
    })
}

/// The same read-merge-compare-and-set loop with raw async-nats calls, for comparison.
async fn write_raw(
    config: &Config,
    key: String,
    writers: usize,
    appends: usize,
) -> anyhow::Result<Duration> {
    let mut stores = Vec::new();
    for _ in 0..writers {
        let client = flotilla_bus::connect_client(&config.nats, "flotilla-memory-bench").await?;
        stores.push(
            async_nats::jetstream::new(client)
                .get_key_value("flotilla-memory")
                .await?,
        );
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (w, store) in stores.into_iter().enumerate() {
        let key = key.clone();
        set.spawn(async move {
            for i in 0..appends {
                let item = format!("w{w}-{i}");
                let mut attempt = 0u32;
                loop {
                    if attempt > 0 {
                        let ceiling = 1u64 << attempt.min(6);
                        let ms = flotilla_bus::trace::random_u64() % (ceiling + 1);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    attempt += 1;
                    let entry = store.entry(&key).await?;
                    let (mut list, rev): (Vec<String>, Option<u64>) = match entry {
                        Some(e) if e.operation == kv::Operation::Put => {
                            (serde_json::from_slice(&e.value)?, Some(e.revision))
                        }
                        _ => (Vec::new(), None),
                    };
                    list.push(item.clone());
                    let bytes = Bytes::from(serde_json::to_vec(&list)?);
                    let ok = match rev {
                        Some(r) => store.update(&key, bytes, r).await.is_ok(),
                        None => store.create(&key, bytes).await.is_ok(),
                    };
                    if ok {
                        break;
                    }
                    anyhow::ensure!(attempt < 16, "raw writer gave up");
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(start.elapsed())
}

pub(crate) async fn bench(
    mut config: Config,
    a: MemoryBenchArgs,
    external_nats: bool,
) -> anyhow::Result<()> {
    let _server = crate::embedded::unless_external(&mut config, external_nats)?;
    let (writers, processes) = (a.writers.max(1), a.processes.max(1));
    let expected = (writers * a.appends) as u64;
    let session = SessionId::generate();
    let bus = connect(&config, "bench-memory").await?;

    let (stats, elapsed) = if processes == 1 {
        let p = write(&config, &session, 0, writers, a.appends).await?;
        (p.stats, Duration::from_millis(p.end_ms - p.start_ms))
    } else {
        // Spread the writers over child processes of this binary.
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let per = writers.div_ceil(processes);
        for p in 0..processes {
            let first = p * per;
            let n = per.min(writers.saturating_sub(first));
            if n == 0 {
                continue;
            }
            let child = tokio::process::Command::new(&exe)
                .args([
                    "bench",
                    "memory-worker",
                    "--nats-url",
                    &config.nats.url,
                    "--session",
                    session.as_str(),
                ])
                .args([
                    "--first",
                    &first.to_string(),
                    "--writers",
                    &n.to_string(),
                    "--appends",
                    &a.appends.to_string(),
                ])
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            children.push(child);
        }
        let mut total = MemoryStats::default();
        let (mut first_start, mut last_end) = (u64::MAX, 0);
        for c in children {
            let out = c.wait_with_output().await?;
            anyhow::ensure!(out.status.success(), "a memory-worker process failed");
            let p: Phase = serde_json::from_slice(out.stdout.trim_ascii())?;
            total.cas_attempts += p.stats.cas_attempts;
            total.conflicts += p.stats.conflicts;
            total.retries += p.stats.retries;
            first_start = first_start.min(p.start_ms);
            last_end = last_end.max(p.end_ms);
        }
        (
            total,
            Duration::from_millis(last_end.saturating_sub(first_start)),
        )
    };
    let list: Vec<String> = bus
        .memory()
        .session(&session)
        .get(&MemKey::parse(KEY)?)
        .await?
        .map(|v| v.value)
        .unwrap_or_default();
    let unique: HashSet<&String> = list.iter().collect();

    let raw_key = keys::memory(&SessionId::generate(), "rawlist");
    let raw_elapsed = write_raw(&config, raw_key, writers, a.appends).await?;

    let ops = expected as f64 / elapsed.as_secs_f64().max(1e-9);
    let raw_ops = expected as f64 / raw_elapsed.as_secs_f64().max(1e-9);
    let report = Report {
        writers,
        processes,
        appends: expected,
        final_len: list.len() as u64,
        lost_updates: expected.saturating_sub(unique.len() as u64),
        duplicates: (list.len() - unique.len()) as u64,
        cas_attempts: stats.cas_attempts,
        conflicts: stats.conflicts,
        retries: stats.retries,
        conflict_rate: stats.conflicts as f64 / (stats.cas_attempts.max(1)) as f64,
        ops_per_s: ops,
        raw_ops_per_s: raw_ops,
        wrapper_overhead_pct: (raw_ops - ops) / raw_ops.max(1e-9) * 100.0,
    };
    println!(
        "  appends {} by {} writers in {} process(es): final length {}, lost {}, duplicates {}",
        report.appends,
        writers,
        processes,
        report.final_len,
        report.lost_updates,
        report.duplicates
    );
    println!(
        "  compare-and-set {} attempts, {} conflicts ({:.0}%), {} retries",
        report.cas_attempts,
        report.conflicts,
        report.conflict_rate * 100.0,
        report.retries
    );
    println!(
        "  throughput {:.0} appends/s with update_with, {:.0}/s with raw async-nats calls (wrapper cost {:.1}%)",
        report.ops_per_s, report.raw_ops_per_s, report.wrapper_overhead_pct
    );
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    anyhow::ensure!(
        report.lost_updates == 0 && report.duplicates == 0,
        "lost or duplicated updates"
    );
    Ok(())
}

/// The child process side of `bench memory --processes P`.
pub(crate) async fn worker(config: Config, a: MemoryWorkerArgs) -> anyhow::Result<()> {
    let phase = write(&config, &a.session, a.first, a.writers, a.appends).await?;
    println!("{}", serde_json::to_string(&phase)?);
    Ok(())
}

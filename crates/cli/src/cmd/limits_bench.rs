//! `flotilla bench limits`: P agent processes call a fake OpenAI-compatible server that
//! enforces R requests and T tokens per window, each call going through the fleet rate
//! limiter (leader in this process). Reports the 429s that still happened, the share of
//! the quota used, the permit rate and the delay the limiter added.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_agent::{LimitedLlm, LimiterClient, LimitsConfig, ModelLimits};
use flotilla_bus::{Bus, Counters};
use flotilla_llm::{ChatMessage, CompletionRequest, LlmClient, OpenAiClient, OpenAiConfig};
use flotilla_testkit::{FakeConfig, FakeOpenAi};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{LimitsBenchArgs, LimitsWorkerArgs};

const MODEL: &str = "bench-model";

#[derive(Debug, Serialize)]
struct Report {
    rpm: u64,
    tpm: u64,
    window_s: f64,
    processes: usize,
    concurrency: usize,
    duration_s: f64,
    offered_per_s: f64,
    quota_requests_per_s: f64,
    requests: u64,
    ok: u64,
    http_429: u64,
    tokens: u64,
    errors: u64,
    quota_used_pct: f64,
    request_quota_used_pct: f64,
    token_quota_used_pct: f64,
    max_requests_in_window: u64,
    max_tokens_in_window: u64,
    permits_per_s: f64,
    added_p50_ms: f64,
    added_p99_ms: f64,
}

/// What one worker process did.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct WorkerReport {
    calls: u64,
    errors: u64,
    waits_us: Vec<u64>,
}

fn limits(config: &Config, rpm: u64, tpm: u64, window: Duration) -> LimitsConfig {
    LimitsConfig {
        enabled: true,
        window,
        models: BTreeMap::from([(MODEL.to_owned(), ModelLimits { rpm, tpm })]),
        ..config.limits.clone()
    }
}

fn request(worker: usize, i: u64) -> CompletionRequest {
    CompletionRequest {
        model: MODEL.into(),
        messages: vec![
            ChatMessage::system("You are one agent of a load test."),
            ChatMessage::user(format!(
                "worker {worker:03} call {i:08}: summarize the news"
            )),
        ],
        response_format: None,
        max_tokens: Some(50),
    }
}

/// One process of callers (hidden subcommand).
pub(crate) async fn worker(config: Config, a: LimitsWorkerArgs) -> anyhow::Result<()> {
    let window = Duration::from_secs_f64(a.window_s);
    let bus = Bus::connect(
        &config.nats,
        &format!("flotilla-bench-limits-{}", std::process::id()),
        Arc::new(Counters::default()),
    )
    .await
    .context("connecting to NATS")?;
    let openai: Arc<dyn LlmClient> = Arc::new(OpenAiClient::new(OpenAiConfig {
        base_url: a.base_url.clone(),
        ..OpenAiConfig::default()
    })?);
    let limiter = LimiterClient::new(bus, limits(&config, a.rpm, a.tpm, window));
    let stats = limiter.stats();
    let llm = Arc::new(LimitedLlm::new(openai, limiter));
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(a.duration_s);
    let mut set = tokio::task::JoinSet::new();
    for c in 0..a.concurrency.max(1) {
        let llm = llm.clone();
        set.spawn(async move {
            let (mut calls, mut errors) = (0u64, 0u64);
            while tokio::time::Instant::now() < deadline {
                match llm.complete(&request(c, calls)).await {
                    Ok(_) => calls += 1,
                    Err(e) => {
                        errors += 1;
                        tracing::warn!(error = %e, "call failed");
                    }
                }
            }
            (calls, errors)
        });
    }
    let mut report = WorkerReport::default();
    while let Some(r) = set.join_next().await {
        let (c, e) = r?;
        report.calls += c;
        report.errors += e;
    }
    report.waits_us = stats.waits_us();
    let _ = stats.granted.get();
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// `bench limits`.
pub(crate) async fn run(
    mut config: Config,
    a: LimitsBenchArgs,
    external_nats: bool,
) -> anyhow::Result<()> {
    let _server = crate::embedded::unless_external(&mut config, external_nats)?;
    let window = Duration::from_secs_f64(a.window_s);
    let fake = FakeOpenAi::start(FakeConfig {
        rpm: Some(a.rpm),
        tpm: Some(a.tpm),
        window,
        completion_tokens: 50,
        latency: Duration::from_millis(a.latency_ms),
        ..FakeConfig::default()
    })
    .await?;
    let shutdown = CancellationToken::new();
    let leader_bus = Bus::connect(
        &config.nats,
        "flotilla-bench-limiter",
        Arc::new(Counters::default()),
    )
    .await?;
    let limiter = flotilla_control::limiter::Limiter::new(
        leader_bus,
        limits(&config, a.rpm, a.tpm, window),
        "bench-limiter",
    );
    tokio::spawn(limiter.run(shutdown.child_token()));

    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut children = Vec::new();
    for _ in 0..a.processes.max(1) {
        let child = tokio::process::Command::new(&exe)
            .args(["bench", "limits-worker", "--nats-url", &config.nats.url])
            .args(["--base-url", &fake.base_url()])
            .args(["--rpm", &a.rpm.to_string(), "--tpm", &a.tpm.to_string()])
            .args(["--window-s", &a.window_s.to_string()])
            .args(["--duration-s", &a.duration_s.to_string()])
            .args(["--concurrency", &a.concurrency.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        children.push(child);
    }
    let mut waits = Vec::new();
    let (mut calls, mut errors) = (0, 0);
    for c in children {
        let out = c.wait_with_output().await?;
        anyhow::ensure!(out.status.success(), "a limits-worker process failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default();
        let w: WorkerReport = serde_json::from_str(last).context("reading a worker report")?;
        calls += w.calls;
        errors += w.errors;
        waits.extend(w.waits_us);
    }
    let elapsed = started.elapsed().as_secs_f64().max(a.duration_s);
    shutdown.cancel();
    waits.sort_unstable();
    let s = fake.stats();
    let windows = elapsed / a.window_s;
    let request_quota = s.ok as f64 / (a.rpm as f64 * windows);
    let token_quota = s.tokens as f64 / (a.tpm as f64 * windows);
    let report = Report {
        rpm: a.rpm,
        tpm: a.tpm,
        window_s: a.window_s,
        processes: a.processes,
        concurrency: a.concurrency,
        duration_s: elapsed,
        // Callers in a closed loop against the provider's latency, unthrottled.
        offered_per_s: (a.processes * a.concurrency) as f64 * 1000.0 / a.latency_ms.max(1) as f64,
        quota_requests_per_s: a.rpm as f64 / a.window_s,
        requests: s.requests,
        ok: s.ok,
        http_429: s.http_429,
        tokens: s.tokens,
        errors,
        quota_used_pct: 100.0 * request_quota.max(token_quota),
        request_quota_used_pct: 100.0 * request_quota,
        token_quota_used_pct: 100.0 * token_quota,
        max_requests_in_window: s.max_requests_in_window,
        max_tokens_in_window: s.max_tokens_in_window,
        permits_per_s: waits.len() as f64 / elapsed,
        added_p50_ms: pct(&waits, 0.5),
        added_p99_ms: pct(&waits, 0.99),
    };
    let _ = calls;
    if !a.json {
        println!(
            "bench limits: {} requests in {:.1}s, {} answered 429, quota used {:.1}% \
             (requests {:.1}%, tokens {:.1}%), {:.1} permits/s, added delay p50 {:.0} ms, p99 {:.0} ms",
            report.requests,
            report.duration_s,
            report.http_429,
            report.quota_used_pct,
            report.request_quota_used_pct,
            report.token_quota_used_pct,
            report.permits_per_s,
            report.added_p50_ms,
            report.added_p99_ms
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

//! `flotilla demo` and `flotilla bench sessions`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_bus::{Bus, Counters};
use flotilla_control::{Client, Fleet, FleetSpec};
use indicatif::{ProgressBar, ProgressStyle};

use crate::LoadArgs;
use crate::chaos::{Chaos, ProcessFleet};
use crate::config::Config;
use crate::embedded::Embedded;
use crate::load::{self, Progress};

const TOPICS: &[&str] = &[
    "compare three open-source vector databases for a 50M-document search product",
    "plan a zero-downtime migration of a payments service to a new region",
    "assess the risks of adopting a four-day work week in a 200-person company",
    "design an onboarding curriculum for new site-reliability engineers",
    "evaluate battery chemistries for a municipal electric bus fleet",
    "summarize the trade-offs of event sourcing for an order-management system",
];

pub(crate) async fn load(
    mut config: Config,
    a: LoadArgs,
    external_nats: bool,
    demo: bool,
) -> anyhow::Result<()> {
    if let Some(ms) = a.llm_latency_ms {
        config.llm.simulated.latency_ms = ms;
    }
    if let Some(n) = a.pool_size {
        config.session.pool_size = n;
    }
    let concurrency = a
        .concurrency
        .unwrap_or_else(|| (a.sessions as usize).clamp(1, 64));
    let nodes = a.cluster.unwrap_or(1);
    anyhow::ensure!(
        nodes == 1 || nodes == 3,
        "--cluster takes 3 (or 1, the default)"
    );
    anyhow::ensure!(
        !(external_nats && (nodes == 3 || a.chaos.contains(&Chaos::KillNats))),
        "--cluster and --chaos kill-nats start their own servers: leave out --nats-url"
    );
    let server = if external_nats {
        None
    } else {
        Some(Embedded::start(&mut config, nodes == 3)?)
    };
    let kill_nats = a.chaos.contains(&Chaos::KillNats);
    // Restarted servers count from 0 again: their figures would be wrong, not small.
    let monitor_ports = match &server {
        Some(_) if kill_nats => vec![],
        Some(s) => s.monitor_ports(),
        None => a.nats_monitor_port.into_iter().collect(),
    };
    let server_pids = match &server {
        Some(s) if !kill_nats => s.pids(),
        _ => vec![],
    };
    let server = server.map(|s| Arc::new(std::sync::Mutex::new(s)));
    // Counts the LLM calls of an in-process fleet (one count across its components).
    let mut llm_calls = None;
    if demo {
        println!(
            "flotilla demo: {} sessions, {} at a time",
            a.sessions, concurrency
        );
        println!(
            "  nats          {} ({})",
            config.nats.url,
            if external_nats {
                "external"
            } else if nodes == 3 {
                "embedded 3-node cluster, JetStream, replicas 3, temporary stores"
            } else {
                "embedded, JetStream, temporary store"
            }
        );
        println!(
            "  fleet         {} serve + {} workers for each of {} roles, each on its own NATS connection: {}",
            a.serve_instances,
            a.workers_per_role,
            config.session.roles.len(),
            config.role_list()
        );
        match config.llm.provider {
            crate::config::Provider::Simulated => println!(
                "  llm           simulated, {} ms mean latency, seed {}",
                config.llm.simulated.latency_ms, config.llm.simulated.seed
            ),
            crate::config::Provider::Openai => println!(
                "  llm           {} (workers {}, orchestrator {})",
                config.llm.openai.base_url,
                config.llm.worker_model,
                config.session.orchestrator_model
            ),
        }
    }
    let fleet = if a.chaos.is_empty() && !a.processes {
        let spec = FleetSpec {
            bus: config.nats.clone(),
            control: config.control(),
            serve_instances: a.serve_instances,
            workers_per_role: a.workers_per_role,
            worker: config.worker.clone(),
            roles: config.roles.clone(),
            tools: config.tools.clone(),
            worker_model: config.llm.worker_model.clone(),
            component_bus: Default::default(),
        };
        let counted = flotilla_llm::InFlightLimit::counting(super::run::llm(&config)?);
        llm_calls = Some(counted.counter());
        let fleet = Fleet::start(spec, Arc::new(counted))
            .await
            .context("starting the fleet")?;
        Running::InProcess(fleet)
    } else {
        let serves = if a.chaos.contains(&Chaos::KillServe) {
            a.serve_instances.max(2)
        } else {
            a.serve_instances
        };
        let fleet = ProcessFleet::start(&config, serves, a.workers_per_role.max(2)).await?;
        Running::Processes(fleet)
    };
    let bus = Bus::connect_patiently(
        &config.nats,
        "flotilla-load-client",
        Arc::new(Counters::default()),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await?
    .context("connecting to NATS")?;
    let client = Client::new(bus.shared_connection(), bus.names().clone()).await?;
    if let Running::Processes(f) = &fleet {
        // Chaos starts on a fleet that is up: `serve` answers its admission service.
        let ping = format!("$SRV.PING.{}", bus.names().service_name());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while bus
            .request(
                ping.clone(),
                None,
                Default::default(),
                Duration::from_secs(10),
            )
            .await
            .is_err()
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the fleet's serve process did not come up within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        f.unleash(a.chaos.clone(), Duration::from_millis(a.chaos_every_ms));
    }
    let calm = tokio_util::sync::CancellationToken::new();
    let nats_killed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if kill_nats && let Some(server) = &server {
        tokio::spawn(crate::chaos::kill_nats(
            server.clone(),
            Duration::from_millis(a.chaos_every_ms),
            nats_killed.clone(),
            calm.clone(),
        ));
    }

    let varz0 = varz_all(&monitor_ports);
    let bench0 = crate::procstat::own();
    let server0 = usage_all(&server_pids);
    let progress = Arc::new(Progress::default());
    let bar = if demo {
        let bar = ProgressBar::new(a.sessions);
        bar.set_style(
            ProgressStyle::with_template(
                "  {bar:40.cyan/blue} {pos}/{len} sessions  {msg}  [{elapsed_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let (b, p) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                b.set_position(p.ended());
                b.set_message(format!(
                    "completed {} failed {} lost {}",
                    p.completed.load(std::sync::atomic::Ordering::Relaxed),
                    p.failed.load(std::sync::atomic::Ordering::Relaxed),
                    p.lost.load(std::sync::atomic::Ordering::Relaxed)
                ));
                if b.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Some(bar)
    } else {
        None
    };
    let (results, elapsed) = load::run(
        &client,
        a.sessions,
        concurrency,
        Duration::from_secs(a.session_timeout_s),
        progress.clone(),
        |i| format!("{} (request #{i})", TOPICS[i as usize % TOPICS.len()]),
    )
    .await;
    if let Some(bar) = bar {
        bar.set_position(progress.ended());
        bar.finish();
    }
    let killed = match &fleet {
        Running::Processes(f) => f.killed.load(std::sync::atomic::Ordering::Relaxed),
        Running::InProcess(_) => 0,
    };
    if let Running::Processes(f) = &fleet {
        f.calm();
    }
    calm.cancel();
    let nats_killed = nats_killed.load(std::sync::atomic::Ordering::Relaxed);
    let killed = killed + nats_killed;
    // Quiet: every inbox drained (killed holders' messages come back after the ack wait).
    let quiet_wait = Duration::from_secs(if killed > 0 { 60 } else { 10 });
    let lost_messages = load::quiet_inbox(&bus, quiet_wait).await;
    let counters = match &fleet {
        Running::InProcess(f) => f.counters.snapshot(),
        Running::Processes(_) => crate::chaos::server_counters(&bus, lost_messages).await?,
    };
    let varz1 = varz_all(&monitor_ports);
    let bench1 = crate::procstat::own();
    let server1 = usage_all(&server_pids);
    let (fleet_usage, serve_usage) = match &fleet {
        Running::Processes(f) => (usage_all(&f.pids().await), usage_all(&f.serve_pids().await)),
        Running::InProcess(_) => (None, None),
    };
    let duplicates = load::duplicate_results(&bus, &results).await;
    load::autopsy(&bus, &results).await;
    let mut summary = load::summarize(results, elapsed, concurrency, counters, lost_messages);
    {
        let done = summary.completed.max(1) as f64;
        let c = &mut summary.costs;
        if let (Some(v0), Some(v1)) = (varz0, varz1) {
            let (inm, outm) = (v1.0.saturating_sub(v0.0), v1.1.saturating_sub(v0.1));
            c.all_publishes = Some(inm);
            c.server_msgs_per_session = Some(inm as f64 / done);
            c.server_out_msgs_per_session = Some(outm as f64 / done);
        }
        c.llm_calls_per_session = llm_calls.map(|n| n.started() as f64 / done);
        let delta = |a: Option<crate::procstat::Usage>, b: Option<crate::procstat::Usage>| {
            a.zip(b).map(|(a, b)| b.cpu_ms.saturating_sub(a.cpu_ms))
        };
        c.bench_cpu_ms = delta(bench0, bench1);
        c.server_cpu_ms = delta(server0, server1);
        c.fleet_cpu_ms = fleet_usage.map(|u| u.cpu_ms);
        c.bench_peak_rss_kb = bench1.map(|u| u.peak_rss_kb);
        c.server_peak_rss_kb = server1.map(|u| u.peak_rss_kb);
        c.fleet_peak_rss_kb = fleet_usage.map(|u| u.peak_rss_kb);
        c.serve_peak_rss_kb = serve_usage.map(|u| u.peak_rss_kb);
        let cpu = [c.bench_cpu_ms, c.fleet_cpu_ms, c.server_cpu_ms];
        if c.bench_cpu_ms.is_some() {
            c.cpu_ms_per_session = Some(cpu.iter().flatten().sum::<u64>() as f64 / done);
        }
    }
    summary.duplicates = duplicates;
    summary.killed = killed - nats_killed;
    summary.nats_killed = nats_killed;
    summary.nats_nodes = nodes;
    load::tally_events(&bus, &mut summary).await;
    match fleet {
        Running::InProcess(f) => f.stop().await,
        Running::Processes(f) => f.stop().await,
    }
    summary.print_table();
    if demo
        && let Some(f) = &summary.sample
        && let flotilla_protocol::EventBody::Done {
            answer: Some(answer),
            ..
        } = &f.event.body
    {
        println!(
            "\n  sample answer (session {}):\n    {}",
            f.session_id, answer.summary
        );
        for s in &answer.sections {
            println!(
                "    - {} / {}: {} artifact(s)",
                s.task_id,
                s.role,
                s.output.artifacts.len()
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    anyhow::ensure!(
        summary.failed == 0 && summary.lost == 0 && summary.duplicates == 0,
        "{} sessions failed, {} lost, {} duplicate results",
        summary.failed,
        summary.lost,
        summary.duplicates
    );
    Ok(())
}

/// The servers' `in_msgs` and `out_msgs` counters, added up over the nodes (`None`
/// without any, or if one does not answer).
fn varz_all(ports: &[u16]) -> Option<(u64, u64)> {
    if ports.is_empty() {
        return None;
    }
    ports.iter().try_fold((0, 0), |(i, o), port| {
        let body = flotilla_testkit::monitor_get(*port, "/varz")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some((i + v["in_msgs"].as_u64()?, o + v["out_msgs"].as_u64()?))
    })
}

/// CPU time and peak RSS of these processes, added up (`None` without any).
fn usage_all(pids: &[u32]) -> Option<crate::procstat::Usage> {
    if pids.is_empty() {
        return None;
    }
    let mut total = crate::procstat::Usage::default();
    for u in pids.iter().filter_map(|p| crate::procstat::usage(*p)) {
        total.cpu_ms += u.cpu_ms;
        total.peak_rss_kb += u.peak_rss_kb;
    }
    Some(total)
}

/// The fleet under load: in this process, or as child processes (chaos).
enum Running {
    InProcess(Fleet),
    Processes(ProcessFleet),
}

//! A custom agent in Rust: implement [`Agent`], hand it to a [`Worker`], and it serves
//! a role's inbox with every guarantee of the built-in agent (claims, fencing, acks,
//! presence, dead letters). This one needs no LLM: it reviews what the session's other
//! agents recorded in shared memory.
//!
//! ```text
//! flotilla serve &                                   # or ./scripts/demo.sh's server
//! cargo run -p flotilla-agent --example custom_agent -- nats://127.0.0.1:4222 review
//! flotilla submit "Plan a product launch" --wait
//! ```

use std::sync::Arc;

use flotilla_agent::{Agent, AgentFuture, FINDING_PREFIX, Finding, TaskContext, Worker};
use flotilla_bus::{Bus, BusConfig, Counters, PoolSettings};
use flotilla_protocol::{Artifact, Role, TaskMessage, TaskOutput};
use tokio_util::sync::CancellationToken;

/// Reviews the findings other agents shared, without calling a model.
struct FindingsReviewer;

impl Agent for FindingsReviewer {
    fn run<'a>(&'a self, ctx: &'a TaskContext, task: &'a TaskMessage) -> AgentFuture<'a> {
        Box::pin(async move {
            // Each agent wrote its own `finding-<task>` key: read them all at once.
            let findings: Vec<Finding> = ctx
                .memory
                .scan::<Finding>(FINDING_PREFIX)
                .await?
                .into_iter()
                .map(|(_, v)| v.value)
                .collect();
            let review: Vec<String> = findings
                .iter()
                .map(|f| {
                    format!(
                        "- {} ({}): {} words",
                        f.role,
                        f.task_id,
                        f.summary.split_whitespace().count()
                    )
                })
                .collect();
            ctx.progress.report().await;
            Ok(TaskOutput {
                summary: format!(
                    "Reviewed {} finding(s) for: {}",
                    findings.len(),
                    task.instruction
                ),
                artifacts: vec![Artifact {
                    name: format!("review-{}", task.task_id),
                    kind: "note".into(),
                    content: if review.is_empty() {
                        "No findings shared yet; nothing to review.".into()
                    } else {
                        review.join("\n")
                    },
                }],
            })
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let role = Role::parse(args.next().unwrap_or_else(|| "review".into()))?;
    let config = BusConfig {
        url,
        ..BusConfig::default()
    };
    let bus = Bus::connect(
        &config,
        "flotilla-example-reviewer",
        Arc::new(Counters::default()),
    )
    .await?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    println!("serving role {role} with a custom agent; Ctrl-C to stop");
    Worker::new(
        bus,
        role,
        Arc::new(FindingsReviewer),
        PoolSettings::default(),
    )
    .run(shutdown)
    .await?;
    Ok(())
}

//! `flotilla dlq ls|show|replay`.

use std::sync::Arc;

use anyhow::Context;
use flotilla_bus::{Bus, Counters};
use flotilla_control::dlq;

use crate::DlqCommand;
use crate::config::Config;

pub(crate) async fn dlq(config: Config, c: DlqCommand) -> anyhow::Result<()> {
    let bus = Bus::connect(
        &config.nats,
        &format!("flotilla-dlq-{}", std::process::id()),
        Arc::new(Counters::default()),
    )
    .await
    .context("connecting to NATS")?;
    match c {
        DlqCommand::Ls { limit, json } => {
            let entries = dlq::list(&bus, limit).await?;
            if json {
                for e in &entries {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else if entries.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>6}  {:<25}  {:<18}  {:>4}  {:<40}  detail",
                    "seq", "time", "reason", "dlv", "subject"
                );
                for e in &entries {
                    println!(
                        "{:>6}  {:<25}  {:<18}  {:>4}  {:<40}  {}",
                        e.seq, e.time, e.reason, e.deliveries, e.subject, e.detail
                    );
                }
            }
        }
        DlqCommand::Show { seq } => {
            let e = dlq::show(&bus, seq).await?;
            println!("{}", serde_json::to_string_pretty(&e)?);
        }
        DlqCommand::Replay { seq } => {
            let subject = dlq::replay(&bus, seq).await?;
            println!("replayed dead letter {seq} to {subject}");
        }
    }
    Ok(())
}

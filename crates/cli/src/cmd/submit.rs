//! `flotilla submit`.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use flotilla_control::Client;
use flotilla_protocol::{
    EventBody, MessageId, Namespace, OpenReply, OpenSession, SessionId, SessionOutcome, headers,
};

use crate::SubmitArgs;
use crate::config::Config;

pub(crate) async fn submit(config: Config, a: SubmitArgs) -> anyhow::Result<()> {
    let names = Namespace::new(&config.nats.prefix)?;
    let nats = flotilla_bus::connect_client(
        &config.nats,
        &format!("flotilla-submit-{}", std::process::id()),
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", config.nats.url))?;
    let client = Client::new(nats.clone(), names.clone()).await?;
    let session = SessionId::generate();
    let mut req = OpenSession::new(a.task);
    req.session_id = Some(session.clone());
    req.roles = a.roles;
    req.deadline_ms = a.deadline.map(|d| (d.as_millis() as u64).max(1));
    req.human_input = a.human_input;
    let done = client.watch(&session);
    if a.queue {
        let js = async_nats::jetstream::new(nats);
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, MessageId::submit(&session).as_str());
        js.publish_with_headers(names.submit(), h, Bytes::from(serde_json::to_vec(&req)?))
            .await?
            .await
            .context("the submit queue refused the task (full, or no stream: is `flotilla serve` running?)")?;
    } else {
        match client.open(&req, Duration::from_secs(30)).await? {
            OpenReply::Accepted { .. } => {}
            OpenReply::Rejected {
                code,
                message,
                retry_after_ms,
                ..
            } => {
                let retry = retry_after_ms
                    .map(|ms| format!(" (retry after {ms} ms)"))
                    .unwrap_or_default();
                anyhow::bail!("rejected: {code}: {message}{retry}");
            }
        }
    }
    println!("{session}");
    if !a.wait {
        return Ok(());
    }
    let event = tokio::time::timeout(Duration::from_secs(a.timeout_s), done)
        .await
        .context("timed out waiting for the answer")?
        .context("lost the event subscription")?;
    match event.body {
        EventBody::Done {
            outcome: SessionOutcome::Completed,
            answer: Some(answer),
            duration_ms,
            ..
        } => {
            println!("\n{}\n", answer.summary);
            for s in &answer.sections {
                println!("## {} ({})\n{}", s.role, s.task_id, s.output.summary);
                for art in &s.output.artifacts {
                    println!("  - [{}] {}: {}", art.kind, art.name, art.content);
                }
            }
            eprintln!("\ncompleted in {duration_ms} ms");
            Ok(())
        }
        EventBody::Done {
            outcome,
            failure,
            answer,
            ..
        } => {
            if let Some(answer) = answer {
                println!("\n{}\n", answer.summary);
                for s in &answer.sections {
                    println!("## {} ({})\n{}", s.role, s.task_id, s.output.summary);
                }
            }
            let how = match outcome {
                SessionOutcome::Cancelled => "cancelled",
                SessionOutcome::DeadlineExceeded => "past its deadline",
                _ => "failed",
            };
            anyhow::bail!("session {how}: {}", failure.unwrap_or_default())
        }
        other => anyhow::bail!("unexpected event {other:?}"),
    }
}

/// `flotilla cancel <sid>`.
pub(crate) async fn cancel(
    config: Config,
    session: SessionId,
    reason: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    use flotilla_protocol::CancelReply;
    let names = Namespace::new(&config.nats.prefix)?;
    let nats = flotilla_bus::connect_client(
        &config.nats,
        &format!("flotilla-cancel-{}", std::process::id()),
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", config.nats.url))?;
    let client = Client::new(nats, names).await?;
    let reply = client
        .cancel(&session, reason, Duration::from_secs(30))
        .await?;
    if json {
        println!("{}", serde_json::to_string(&reply)?);
    }
    match reply {
        CancelReply::Cancelled {
            confirmed,
            expected,
            ..
        } => {
            if !json {
                println!("{session} cancelled ({confirmed} of {expected} processes confirmed)");
            }
            Ok(())
        }
        CancelReply::AlreadyEnded { outcome, .. } => {
            if !json {
                let outcome = serde_json::to_value(outcome)?;
                println!(
                    "{session} had already ended: {}",
                    outcome.as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        CancelReply::Rejected { code, message, .. } => anyhow::bail!("{code}: {message}"),
    }
}

/// `flotilla answer <sid> "<text>"`.
pub(crate) async fn answer(
    config: Config,
    session: SessionId,
    task: Option<flotilla_protocol::TaskId>,
    text: String,
    json: bool,
) -> anyhow::Result<()> {
    use flotilla_protocol::AnswerReply;
    let names = Namespace::new(&config.nats.prefix)?;
    let nats = flotilla_bus::connect_client(
        &config.nats,
        &format!("flotilla-answer-{}", std::process::id()),
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", config.nats.url))?;
    let client = Client::new(nats, names).await?;
    let reply = client
        .answer(&session, task, &text, Duration::from_secs(30))
        .await?;
    if json {
        println!("{}", serde_json::to_string(&reply)?);
    }
    match reply {
        AnswerReply::Accepted { task_id, .. } => {
            if !json {
                println!("{session} {task_id}: answer taken; the task goes on with it");
            }
            Ok(())
        }
        AnswerReply::Rejected { code, message, .. } => anyhow::bail!("{code}: {message}"),
    }
}

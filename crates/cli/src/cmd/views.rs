//! Live views against any NATS URL: `sessions`, `watch`, `agents`, `memory`. Each
//! reads only what a `client` user may (records, presence, memory, the event stream),
//! prints lines that fit 80 columns, or JSON with `--json`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use async_nats::jetstream::kv;
use flotilla_bus::{Bus, Counters};
use flotilla_protocol::{
    Event, EventBody, Presence, SessionId, SessionRecord, SessionStatus, TaskRecord, epoch_ms,
    subject::keys,
};
use futures::StreamExt;

use crate::config::Config;

async fn connect(config: &Config) -> anyhow::Result<Bus> {
    Bus::connect(
        &config.nats,
        &format!("flotilla-cli-{}", std::process::id()),
        Arc::new(Counters::default()),
    )
    .await
    .context("connecting to NATS")
}

/// The latest value of every key matching `filter` (one ordered consumer, last value
/// per subject), deletions left out.
async fn latest(store: &kv::Store, filter: &str) -> anyhow::Result<Vec<kv::Entry>> {
    let info = store.stream.get_info().await?;
    if info.state.messages == 0 {
        return Ok(Vec::new());
    }
    let mut watch = store.watch_with_history(filter).await?;
    let mut out = Vec::new();
    loop {
        // Nothing matching sends nothing: a short wait then means "no keys".
        match tokio::time::timeout(Duration::from_secs(2), watch.next()).await {
            Ok(Some(Ok(e))) => {
                let last = e.delta == 0;
                if e.operation == kv::Operation::Put {
                    out.push(e);
                }
                if last {
                    break;
                }
            }
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(out)
}

fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

/// `1h02m`, `3m05s`, `12s`, `850ms`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Cuts `s` to `n` characters, marking the cut.
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn status_name(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Planning => "planning",
        SessionStatus::Running => "running",
        SessionStatus::AwaitingInput => "awaiting_input",
        SessionStatus::Synthesizing => "synthesizing",
        SessionStatus::Completed => "completed",
        SessionStatus::Failed => "failed",
        SessionStatus::Cancelled => "cancelled",
        SessionStatus::DeadlineExceeded => "deadline_exceeded",
    }
}

#[derive(serde::Serialize)]
struct SessionRow {
    session_id: SessionId,
    status: &'static str,
    opened_ms: u64,
    age_ms: u64,
    roles: Vec<String>,
    tokens: u64,
    outcome: Option<String>,
}

/// `flotilla sessions`: newest first.
pub(crate) async fn sessions(
    config: Config,
    status: Option<String>,
    since: Option<Duration>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let bus = connect(&config).await?;
    // Session records are the one-token keys; task records and conversations have more.
    let entries = latest(bus.sessions().store(), "*").await?;
    let now = now_ms();
    let mut rows: Vec<SessionRow> = entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<SessionRecord>(&e.value).ok())
        .filter(|r| status.as_deref().is_none_or(|s| s == status_name(r.status)))
        .filter(|r| since.is_none_or(|d| now.saturating_sub(r.opened_ms) <= d.as_millis() as u64))
        .map(|r| SessionRow {
            status: status_name(r.status),
            opened_ms: r.opened_ms,
            age_ms: now.saturating_sub(r.opened_ms),
            roles: r.roles.iter().map(|x| x.to_string()).collect(),
            tokens: r.counters.spend.tokens,
            outcome: match r.status {
                SessionStatus::Completed => Some("completed".into()),
                SessionStatus::Failed => Some(r.failure.clone().unwrap_or_else(|| "failed".into())),
                SessionStatus::Cancelled => Some(format!(
                    "cancelled: {}",
                    r.failure.clone().unwrap_or_default()
                )),
                SessionStatus::DeadlineExceeded => Some(format!(
                    "deadline exceeded: {}",
                    r.failure.clone().unwrap_or_default()
                )),
                _ => None,
            },
            session_id: r.session_id,
        })
        .collect();
    // Newest first: by opening time, then by id (UUIDv7 ids sort by creation).
    rows.sort_by(|a, b| {
        (b.opened_ms, b.session_id.as_str()).cmp(&(a.opened_ms, a.session_id.as_str()))
    });
    rows.truncate(limit);
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{:<36} {:<12} {:>7} {:>7} ROLES",
        "SESSION", "STATUS", "AGE", "TOKENS"
    );
    for r in &rows {
        let roles: Vec<String> = r.roles.iter().map(|x| cut(x, 4)).collect();
        let line = format!(
            "{:<36} {:<12} {:>7} {:>7} {}",
            r.session_id.as_str(),
            r.status,
            age(r.age_ms),
            r.tokens,
            roles.join(",")
        );
        println!("{}", cut(&line, 80));
        if let Some(o) = r.outcome.as_deref().filter(|o| *o != "completed") {
            println!("  {}", cut(o, 78));
        }
    }
    if rows.is_empty() {
        println!("(no sessions)");
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct AgentRow {
    agent_id: String,
    role: String,
    in_flight: usize,
    last_heartbeat_ms_ago: u64,
    /// Its presence is still there but its ping has no responders: the process is gone
    /// (the watchdog will release its work).
    ghost: bool,
}

/// `flotilla agents`: processes from presence, each pinged.
pub(crate) async fn agents(config: Config, json: bool) -> anyhow::Result<()> {
    let bus = connect(&config).await?;
    let store = bus
        .open_bucket(&bus.names().bucket_agents())
        .await
        .context("opening the agents bucket")?;
    let now = now_ms();
    let mut rows = Vec::new();
    for e in latest(&store, ">").await? {
        let Ok(p) = serde_json::from_slice::<Presence>(&e.value) else {
            continue;
        };
        let ping = bus
            .request(
                p.ping_subject.clone(),
                None,
                bytes::Bytes::new(),
                Duration::from_secs(2),
            )
            .await;
        rows.push(AgentRow {
            agent_id: p.agent_id.to_string(),
            role: p.role.to_string(),
            in_flight: p.in_flight.len(),
            last_heartbeat_ms_ago: now.saturating_sub(p.renewed_ms),
            ghost: ping.is_err(),
        });
    }
    rows.sort_by(|a, b| {
        (a.role.as_str(), a.agent_id.as_str()).cmp(&(b.role.as_str(), b.agent_id.as_str()))
    });
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{:<36} {:<14} {:>9} {:>10}",
        "AGENT", "ROLE", "IN FLIGHT", "HEARTBEAT"
    );
    for r in &rows {
        let line = format!(
            "{:<36} {:<14} {:>9} {:>10}{}",
            cut(&r.agent_id, 36),
            cut(&r.role, 14),
            r.in_flight,
            format!("{} ago", age(r.last_heartbeat_ms_ago)),
            if r.ghost { "  GHOST" } else { "" }
        );
        println!("{}", cut(&line, 80));
    }
    if rows.is_empty() {
        println!("(no agents)");
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct MemoryRow {
    key: String,
    revision: u64,
    value: serde_json::Value,
}

/// `flotilla memory <sid> [key]`: a session's shared memory, with revisions.
pub(crate) async fn memory(
    config: Config,
    session: SessionId,
    key: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let bus = connect(&config).await?;
    let store = bus
        .open_bucket(&bus.names().bucket_memory())
        .await
        .context("opening the memory bucket")?;
    let filter = match &key {
        Some(k) => keys::memory(&session, k),
        None => format!("{session}.*"),
    };
    let prefix = format!("{session}.");
    let rows: Vec<MemoryRow> = latest(&store, &filter)
        .await?
        .into_iter()
        .map(|e| MemoryRow {
            key: e.key.strip_prefix(&prefix).unwrap_or(&e.key).to_owned(),
            revision: e.revision,
            value: serde_json::from_slice(&e.value)
                .unwrap_or_else(|_| String::from_utf8_lossy(&e.value).into_owned().into()),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    if let (Some(k), Some(r)) = (&key, rows.first()) {
        println!("{k} (revision {})", r.revision);
        println!("{}", serde_json::to_string_pretty(&r.value)?);
        return Ok(());
    }
    println!("{:<24} {:>8}  VALUE", "KEY", "REVISION");
    for r in &rows {
        let line = format!("{:<24} {:>8}  {}", cut(&r.key, 24), r.revision, r.value);
        println!("{}", cut(&line, 80));
    }
    if rows.is_empty() {
        match key {
            Some(k) => anyhow::bail!("session {session} has no memory key {k}"),
            None => println!("(no memory for session {session})"),
        }
    }
    Ok(())
}

/// `flotilla watch <sid>`: the session's timeline from its first event, live until
/// `done` (or replayed, for a session that has ended).
pub(crate) async fn watch(config: Config, session: SessionId, json: bool) -> anyhow::Result<()> {
    let bus = connect(&config).await?;
    let stream = bus
        .stream(&bus.names().stream_events())
        .await
        .context("opening the event stream")?;
    let mut msgs = stream.replay(&[bus.names().events_of(&session)]).await?;
    let mut t0: Option<u64> = None;
    // When each task attempt was dispatched, for its duration.
    let mut started = std::collections::HashMap::new();
    while let Some(m) = msgs.next().await {
        let m = m?;
        let Ok(ev) = serde_json::from_slice::<Event>(&m.payload) else {
            continue;
        };
        if json {
            println!("{}", serde_json::to_string(&ev)?);
        } else {
            let t = ev.at_ms.saturating_sub(*t0.get_or_insert(ev.at_ms));
            let at = format!("+{:.1}s", t as f64 / 1000.0);
            let line = describe(&bus, &session, &ev.body, ev.at_ms, &mut started).await;
            println!("{}", cut(&format!("{at:>8}  {line}"), 80));
            // The attempts dispatched in the same step, just before this event.
            for d in &ev.dispatched {
                let body = EventBody::Dispatched {
                    task_id: d.task_id.clone(),
                    role: d.role.clone(),
                    attempt: d.attempt,
                };
                let line = describe(&bus, &session, &body, ev.at_ms, &mut started).await;
                println!("{}", cut(&format!("{at:>8}  {line}"), 80));
            }
        }
        if matches!(ev.body, EventBody::Done { .. }) {
            break;
        }
    }
    Ok(())
}

async fn describe(
    bus: &Bus,
    session: &SessionId,
    body: &EventBody,
    at_ms: u64,
    started: &mut std::collections::HashMap<(String, u32), u64>,
) -> String {
    match body {
        EventBody::Opened { task, roles } => {
            format!("opened     {} roles: {}", roles.len(), cut(task, 50))
        }
        EventBody::Planned { tasks } => {
            let plan: Vec<String> = tasks
                .iter()
                .map(|t| format!("{} {}", t.task_id, t.role))
                .collect();
            format!("planned    {}", plan.join(", "))
        }
        EventBody::Dispatched {
            task_id,
            role,
            attempt,
        } => {
            started.insert((task_id.to_string(), *attempt), at_ms);
            format!("dispatched {task_id} {role} attempt {attempt}")
        }
        EventBody::Backpressure {
            task_id, attempt, ..
        } => {
            format!("backpressure {task_id} attempt {attempt}: inbox full, waiting")
        }
        EventBody::Result {
            task_id,
            role,
            attempt,
            accepted,
            reason,
            tokens,
        } => {
            let took = started
                .get(&(task_id.to_string(), *attempt))
                .map(|s| format!(" in {}", age(at_ms.saturating_sub(*s))))
                .unwrap_or_default();
            // The holder, from the task record (only the last attempt's is kept).
            let holder = bus
                .sessions()
                .get::<TaskRecord>(&keys::task(session, role, task_id))
                .await
                .ok()
                .flatten()
                .filter(|(r, _)| r.attempt == *attempt)
                .and_then(|(r, _)| r.holder)
                .map(|h| format!(" by {h}"))
                .unwrap_or_default();
            let tokens = tokens.map(|t| format!(", {t} tok")).unwrap_or_default();
            if *accepted {
                format!("result     {task_id} {role} #{attempt} ok{took}{tokens}{holder}")
            } else {
                format!(
                    "result     {task_id} {role} #{attempt} REJECTED{took}{tokens}: {}",
                    reason.as_deref().unwrap_or("")
                )
            }
        }
        EventBody::Reassigned {
            task_id,
            attempt,
            from,
            reason,
            ..
        } => format!("reassigned {task_id} attempt {attempt} from {from}: {reason}"),
        EventBody::HeartbeatMissed {
            agent_id, reason, ..
        } => {
            format!("heartbeat  {agent_id} missed: {reason}")
        }
        EventBody::Clarification {
            task_id,
            n,
            question,
            closed,
            by,
            ..
        } => format!(
            "clarify #{n} {task_id}{}{}: {question}",
            by.as_deref()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default(),
            if *closed { " (closed)" } else { "" }
        ),
        EventBody::InputRequested {
            task_id,
            question,
            deadline_ms,
            ..
        } => format!(
            "ASK        {task_id} waits for a person (flotilla answer; {} left): {question}",
            age(deadline_ms.saturating_sub(now_ms()))
        ),
        EventBody::RateLimitWait {
            task_id,
            calls,
            waited_ms,
        } => format!(
            "rate limit {task_id}: {calls} call(s) waited {}",
            age(*waited_ms)
        ),
        EventBody::BudgetExhausted { budget, reason, .. } => {
            format!("BUDGET     {budget} exhausted: {reason}")
        }
        EventBody::CircuitOpen {
            task_id, reason, ..
        } => {
            format!("CIRCUIT    open on {task_id}: {reason}")
        }
        EventBody::Done {
            outcome,
            failure,
            duration_ms,
            ..
        } => {
            let tokens = bus
                .sessions()
                .get::<SessionRecord>(&keys::session(session))
                .await
                .ok()
                .flatten()
                .map(|(r, _)| format!(", {} tokens", r.counters.spend.tokens))
                .unwrap_or_default();
            format!(
                "done       {} after {}{tokens}{}",
                serde_json::to_value(outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                age(*duration_ms),
                failure
                    .as_deref()
                    .map(|f| format!(": {f}"))
                    .unwrap_or_default()
            )
        }
    }
}

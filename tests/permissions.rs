//! Least privilege, enforced by nats-server: the server runs on `nats/accounts.conf`,
//! every component of a fleet connects as its own user and a session completes; then,
//! with a worker's credentials, everything a worker must not do is refused by the
//! server with a permissions violation, and what it must do still works.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use flotilla_bus::{Bus, BusConfig, ConnectError, Counters, NatsAuth};
use flotilla_control::{Client, Fleet};
use flotilla_protocol::{SessionRecord, SessionStatus, subject::keys};
use flotilla_testkit::NatsServer;
use flotilla_tests::{sim, spec};
use tokio::sync::mpsc;

fn users_conf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nats/accounts.conf")
}

/// A server on `nats/accounts.conf` (the test's own port and store).
fn users_server() -> NatsServer {
    NatsServer::builder()
        .arg("-c")
        .arg(users_conf().to_string_lossy())
        .start()
        .unwrap()
}

/// The settings of `user` from `nats/accounts.conf`.
fn as_user(url: &str, user: &str) -> BusConfig {
    BusConfig {
        url: url.to_owned(),
        auth: NatsAuth {
            user: Some(user.to_owned()),
            password: Some(format!("change-me-{user}")),
            ..NatsAuth::default()
        },
        inbox_prefix: format!("_INBOX_{user}"),
        ..BusConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_component_runs_on_its_own_user_and_a_worker_may_do_nothing_else() {
    let server = users_server();
    let url = server.url();

    // A wrong password is a clear error, not a hang.
    let mut wrong = as_user(&url, "research");
    wrong.auth.password = Some("guess".into());
    let err = Bus::connect(&wrong, "intruder", Arc::new(Counters::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Auth { .. }) && err.to_string().contains("nats.auth"),
        "{err}"
    );

    // The whole fleet, each component on its own user.
    let mut s = spec(&url);
    s.bus = as_user(&url, "serve");
    for role in s.control.session.roles.clone() {
        s.component_bus
            .insert(role.to_string(), as_user(&url, role.as_str()));
    }
    let fleet = Fleet::start(s, sim(20)).await.unwrap();
    let client_bus = Bus::connect(
        &as_user(&url, "client"),
        "client",
        Arc::new(Counters::default()),
    )
    .await
    .unwrap();
    let client = Client::new(client_bus.shared_connection(), client_bus.names().clone())
        .await
        .unwrap();
    let (done, _) = match client
        .run("least privilege, end to end", Duration::from_secs(120))
        .await
    {
        Ok(d) => d,
        Err(e) => panic!(
            "{e}; server errors: {}",
            fleet.counters.snapshot().server_errors
        ),
    };
    assert!(done.completed(), "{done:?}");
    // ... without a single refusal on the way: each user had what its component needs.
    assert_eq!(fleet.counters.snapshot().server_errors, 0);
    assert_eq!(client_bus.counters.snapshot().server_errors, 0);
    let sid = done.session_id.clone();
    let (before, before_rev) = client_bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&sid))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.status, SessionStatus::Completed);
    let analysis_task = before
        .tasks
        .iter()
        .find(|t| t.role.as_str() == "analysis")
        .unwrap()
        .task_id
        .clone();

    // Every process answers its ping on its own user (the watchdog's liveness check),
    // with the documented body.
    let serve_js = jetstream::new(
        async_nats::ConnectOptions::with_user_and_password(
            "serve".into(),
            "change-me-serve".into(),
        )
        .custom_inbox_prefix("_INBOX_serve")
        .connect(&url)
        .await
        .unwrap(),
    );
    let agents = serve_js.get_key_value("flotilla-agents").await.unwrap();
    // Every key, listed again if a listing ends in an error (its ordered consumer can
    // be reset under load): an error is not the end of the keys.
    let mut listed = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let mut keys = agents.keys().await.unwrap();
        let mut complete = true;
        while let Some(key) = futures::StreamExt::next(&mut keys).await {
            match key {
                Ok(key) => {
                    listed.insert(key);
                }
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            break;
        }
    }
    let mut pinged = 0;
    let mut serve_presence = String::new();
    let found: Vec<String> = listed.iter().cloned().collect();
    for key in listed {
        let Some(raw) = agents.get(&key).await.unwrap() else {
            continue;
        };
        let p: flotilla_protocol::Presence = serde_json::from_slice(&raw).unwrap();
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            serve_js
                .client()
                .request(p.ping_subject.clone(), Bytes::new()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(&reply.payload[..], b"pong", "{key}");
        if p.role.is_orchestrator() {
            serve_presence = key.clone();
        }
        pinged += 1;
    }
    assert!(
        pinged >= 5,
        "serve and four roles answer pings ({pinged} of the presences {found:?})"
    );

    // A research worker's credentials, on a connection that reports server errors.
    let (tx, mut errors) = mpsc::unbounded_channel::<String>();
    let nc = async_nats::ConnectOptions::with_user_and_password(
        "research".into(),
        "change-me-research".into(),
    )
    .custom_inbox_prefix("_INBOX_research")
    .event_callback(move |e| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = e {
                let _ = tx.send(e.to_string());
            }
        }
    })
    .connect(&url)
    .await
    .unwrap();
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(nc.clone());

    // What it must be able to do: read a session record, write its own role's task
    // records (here of a session that does not exist).
    assert!(
        js.get_key_value("flotilla-sessions")
            .await
            .unwrap()
            .get(keys::session(&sid))
            .await
            .unwrap()
            .is_some()
    );
    // ...and from the stream leader, which a worker asks when no replica answers.
    let leader_read = js
        .get_stream("KV_flotilla-sessions")
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&format!("$KV.flotilla-sessions.{}", keys::session(&sid)))
        .await;
    assert!(leader_read.is_ok(), "{leader_read:?}");
    // ...and its own inbox's messages by sequence (a handler reads back the payload it
    // released, for a dead-letter copy): the inbox is empty by now, so the answer is
    // "no message", not a refusal.
    let own_inbox = js
        .get_stream("FLOTILLA_INBOX_research")
        .await
        .unwrap()
        .get_raw_message(1)
        .await;
    assert!(
        own_inbox.as_ref().is_ok()
            || own_inbox.as_ref().is_err_and(|e| e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound),
        "{own_inbox:?}"
    );
    // ...and another process's presence (a claim is taken over only once it is gone).
    let presence = js
        .get_key_value("flotilla-agents")
        .await
        .unwrap()
        .get(&serve_presence)
        .await;
    assert!(
        matches!(&presence, Ok(Some(_))),
        "a worker reads {serve_presence}: {presence:?}"
    );
    js.publish(
        "$KV.flotilla-sessions.nosuch.t.research.t1",
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap()
    .await
    .expect("a worker writes its own role's task commits");
    js.publish(
        "$KV.flotilla-sessions.nosuch.c.research.t1",
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap()
    .await
    .expect("a worker writes its own role's task claims");

    // Everything else is refused by the server, naming the subject.
    let sess = keys::session(&sid);
    let forbidden: Vec<(&str, String)> = vec![
        (
            "delete a stream",
            "$JS.API.STREAM.DELETE.FLOTILLA_INBOX_research".into(),
        ),
        (
            "purge a stream",
            "$JS.API.STREAM.PURGE.FLOTILLA_INBOX_analysis".into(),
        ),
        ("create a stream", "$JS.API.STREAM.CREATE.EVIL".into()),
        ("create a bucket", "$JS.API.STREAM.CREATE.KV_evil".into()),
        (
            "delete a bucket",
            "$JS.API.STREAM.DELETE.KV_flotilla-slots".into(),
        ),
        (
            "create a consumer",
            "$JS.API.CONSUMER.CREATE.FLOTILLA_INBOX_research.evil".into(),
        ),
        (
            "create a durable consumer",
            "$JS.API.CONSUMER.DURABLE.CREATE.FLOTILLA_INBOX_research.evil".into(),
        ),
        (
            "delete a consumer",
            "$JS.API.CONSUMER.DELETE.FLOTILLA_INBOX_analysis.role-analysis".into(),
        ),
        (
            "pull from another role's inbox",
            "$JS.API.CONSUMER.MSG.NEXT.FLOTILLA_INBOX_analysis.role-analysis".into(),
        ),
        (
            "read another role's inbox by sequence",
            "$JS.API.STREAM.MSG.GET.FLOTILLA_INBOX_analysis".into(),
        ),
        (
            "write a session record",
            format!("$KV.flotilla-sessions.{sess}"),
        ),
        (
            "write another role's task record",
            format!(
                "$KV.flotilla-sessions.{}",
                keys::task(&sid, &"analysis".parse().unwrap(), &analysis_task)
            ),
        ),
        (
            "write another role's task claim",
            format!(
                "$KV.flotilla-sessions.{}",
                keys::claim(&sid, &"analysis".parse().unwrap(), &analysis_task)
            ),
        ),
        ("write a slot", "$KV.flotilla-slots.slot.0".into()),
        ("write limiter state", "$KV.flotilla-limits.leader".into()),
        (
            "publish a task to another role",
            format!("flotilla.s.{sid}.in.analysis"),
        ),
        (
            "publish a result to the orchestrator (a commit is the result)",
            format!("flotilla.s.{sid}.in.orchestrator"),
        ),
    ];
    for (what, subject) in &forbidden {
        // A request, so a JetStream API call would answer if it were allowed.
        let answered = tokio::time::timeout(
            Duration::from_secs(1),
            nc.request(subject.clone(), Bytes::from_static(b"{}")),
        )
        .await;
        assert!(
            !matches!(answered, Ok(Ok(_))),
            "{what}: the server answered {subject}"
        );
        expect_violation(&mut errors, "Publish", subject, what).await;
    }
    for (what, subject) in [
        ("read another role's inbox", "flotilla.s.*.in.analysis"),
        ("read other users' replies", "_INBOX.>"),
        ("read serve's replies", "_INBOX_serve.>"),
    ] {
        let _sub = nc.subscribe(subject).await.unwrap();
        nc.flush().await.unwrap();
        expect_violation(&mut errors, "Subscription", subject, what).await;
    }

    // A Bus counts the refusals it is told of (the zero counts above are not blind).
    let probe = Bus::connect(
        &as_user(&url, "research"),
        "research-probe",
        Arc::new(Counters::default()),
    )
    .await
    .unwrap();
    probe
        .raw_client()
        .publish(format!("$KV.flotilla-sessions.{sess}"), Bytes::new())
        .await
        .unwrap();
    probe.raw_client().flush().await.unwrap();
    assert!(
        flotilla_tests::eventually(Duration::from_secs(10), || async {
            (probe.counters.snapshot().server_errors > 0).then_some(())
        })
        .await
        .is_some()
    );

    // Nothing was changed: the streams, buckets and consumers are there, and the
    // session record is as it was.
    let inspector = &serve_js;
    for stream in ["FLOTILLA_INBOX_research", "KV_flotilla-slots"] {
        inspector.get_stream(stream).await.unwrap();
    }
    let mut analysis = inspector
        .get_stream("FLOTILLA_INBOX_analysis")
        .await
        .unwrap();
    assert!(analysis.info().await.unwrap().state.consumer_count >= 1);
    analysis
        .get_consumer::<jetstream::consumer::pull::Config>("role-analysis")
        .await
        .unwrap();
    let (after, after_rev) = client_bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&sid))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((after, after_rev), (before, before_rev));
    fleet.stop().await;
}

/// Waits for the server's permissions violation for `kind` (`Publish` or
/// `Subscription`) on `subject`.
async fn expect_violation(
    errors: &mut mpsc::UnboundedReceiver<String>,
    kind: &str,
    subject: &str,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, errors.recv()).await {
            Ok(Some(e)) => {
                let e_lower = e.to_lowercase();
                if e_lower.contains("permissions violation")
                    && e_lower.contains(&kind.to_lowercase())
                    && e.contains(subject)
                {
                    return;
                }
            }
            _ => panic!("{what}: no permissions violation for {kind} to {subject}"),
        }
    }
}

/// A worker that never gets to run a task here: the test only watches it bind.
struct Idle;

impl flotilla_agent::Agent for Idle {
    fn run<'a>(
        &'a self,
        _ctx: &'a flotilla_agent::TaskContext,
        _task: &'a flotilla_protocol::TaskMessage,
    ) -> flotilla_agent::AgentFuture<'a> {
        Box::pin(async { Err(flotilla_agent::AgentError::Unusable("idle".into())) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_serve_waits_for_its_consumer() {
    let server = users_server();
    let url = server.url();
    let research: flotilla_protocol::Role = "research".parse().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let early = research.clone();
    let early_url = url.clone();
    let running = tokio::spawn(async move {
        // As `flotilla agent` does: it may not create the topology, so it waits for it.
        let bus = Bus::connect_patiently(
            &as_user(&early_url, "research"),
            "early-research",
            Arc::new(Counters::default()),
            &stop,
        )
        .await?;
        let Some(bus) = bus else { return Ok(()) };
        flotilla_agent::Worker::new(bus, early, Arc::new(Idle), Default::default())
            .run(stop)
            .await
            .map_err(|e| flotilla_bus::ConnectError::Bucket {
                bucket: "inbox".into(),
                detail: e.to_string(),
            })
    });
    // It may not create its inbox: it waits instead of failing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !running.is_finished(),
        "the agent gave up: {:?}",
        running.await
    );

    // serve creates the inbox and the pool's consumer; the agent binds and pulls.
    let mut s = spec(&url);
    s.bus = as_user(&url, "serve");
    let serve_bus = Bus::connect(&s.bus, "serve", Arc::new(Counters::default()))
        .await
        .unwrap();
    let mut control = s.control.clone();
    control
        .worker_pools
        .insert(research.clone(), flotilla_bus::PoolSettings::default());
    let serve = flotilla_control::Serve::new(serve_bus.clone(), sim(10), control);
    let serve_stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(serve.run(serve_stop.child_token()));
    let pulling = flotilla_tests::eventually(Duration::from_secs(30), || async {
        let mut c = serve_bus
            .raw_js()
            .get_stream("FLOTILLA_INBOX_research")
            .await
            .ok()?
            .get_consumer::<jetstream::consumer::pull::Config>("role-research")
            .await
            .ok()?;
        (c.info().await.ok()?.num_waiting > 0).then_some(())
    })
    .await;
    assert!(
        pulling.is_some(),
        "the agent never pulled from its consumer"
    );
    shutdown.cancel();
    running.await.unwrap().unwrap();
    serve_stop.cancel();
    let _ = serving.await;
}

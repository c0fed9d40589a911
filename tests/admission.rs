//! Admission: the bounded pool, typed rejections of bad input, the submit queue, and
//! the topology bootstrap.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::time::Duration;

use bytes::Bytes;
use flotilla_bus::{Bus, BusConfig, Counters, TopologyError};
use flotilla_control::Client;
use flotilla_protocol::{ErrorCode, MessageId, OpenReply, OpenSession, Role, SessionId, headers};
use flotilla_testkit::NatsServer;
use flotilla_tests::{TestFleet, eventually, inbox_is_empty, sim, spec};
use std::sync::Arc;

fn rejected(reply: &OpenReply) -> (ErrorCode, Option<u64>) {
    match reply {
        OpenReply::Rejected {
            code,
            retry_after_ms,
            ..
        } => (*code, *retry_after_ms),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_is_an_explicit_rejection_with_retry_after() {
    let mut s = spec("unused");
    s.control.session.pool_size = 2;
    // Slow LLM: the first two sessions hold their slots for a while.
    let t = TestFleet::start(s, sim(2_000)).await;
    let timeout = Duration::from_secs(10);
    let mut accepted = Vec::new();
    for i in 0..2 {
        match t
            .client
            .open(&OpenSession::new(format!("hold {i}")), timeout)
            .await
            .unwrap()
        {
            OpenReply::Accepted { session_id, .. } => accepted.push(session_id),
            other => panic!("{other:?}"),
        }
    }
    let started = tokio::time::Instant::now();
    let reply = t
        .client
        .open(&OpenSession::new("one too many"), timeout)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered promptly, not by timing out"
    );
    let (code, retry) = rejected(&reply);
    assert_eq!(code, ErrorCode::PoolFull);
    let retry = retry.expect("retry_after_ms is given");
    assert!((100..=30_000).contains(&retry), "{retry}");
    // After a session ends, its slot is free again and the retry succeeds.
    let (finished, rejections) = t
        .client
        .run("patient", Duration::from_secs(120))
        .await
        .unwrap();
    assert!(finished.completed());
    assert!(rejections >= 1, "it was told to wait at least once");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_open_requests_get_typed_errors_and_nothing_crashes() {
    let t = TestFleet::start(spec("unused"), sim(10)).await;
    let timeout = Duration::from_secs(10);
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "not json",
            b"{this is not json".to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "wrong type",
            br#"{"v":1,"task":42}"#.to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "unknown field",
            br#"{"v":1,"task":"x","priority":"high"}"#.to_vec(),
            ErrorCode::UnknownField,
        ),
        (
            "wrong version",
            br#"{"v":2,"task":"x"}"#.to_vec(),
            ErrorCode::UnsupportedVersion,
        ),
        (
            "no version",
            br#"{"task":"x"}"#.to_vec(),
            ErrorCode::UnsupportedVersion,
        ),
        (
            "empty task",
            br#"{"v":1,"task":"   "}"#.to_vec(),
            ErrorCode::Invalid,
        ),
        (
            "unknown role",
            br#"{"v":1,"task":"x","roles":["research","analysis","astrology"]}"#.to_vec(),
            ErrorCode::UnknownRole,
        ),
        (
            "too few roles",
            br#"{"v":1,"task":"x","roles":["research"]}"#.to_vec(),
            ErrorCode::Invalid,
        ),
        (
            "bad session id",
            br#"{"v":1,"task":"x","session_id":"a.b"}"#.to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "oversized",
            {
                let mut v = br#"{"v":1,"task":""#.to_vec();
                v.extend(std::iter::repeat_n(b'x', 300 * 1024));
                v.extend(br#""}"#);
                v
            },
            ErrorCode::Oversized,
        ),
    ];
    for (name, body, want) in cases {
        let reply = t
            .client
            .open_raw(Bytes::from(body), timeout)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (code, _) = rejected(&reply);
        assert_eq!(code, want, "{name}");
    }
    // The same session id for another task is refused; for the same task it is idempotent.
    let sid = SessionId::generate();
    let mut req = OpenSession::new("idempotent");
    req.session_id = Some(sid.clone());
    let done = t.client.watch(&sid);
    for _ in 0..2 {
        match t.client.open(&req, timeout).await.unwrap() {
            OpenReply::Accepted { session_id, .. } => assert_eq!(session_id, sid),
            other => panic!("{other:?}"),
        }
    }
    req.task = "something else".into();
    assert_eq!(
        rejected(&t.client.open(&req, timeout).await.unwrap()).0,
        ErrorCode::Invalid
    );
    tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .unwrap()
        .unwrap();
    // A good session still completes with a subset of roles.
    let mut req = OpenSession::new("still serving");
    req.roles = ["research", "analysis", "writing"]
        .iter()
        .map(|r| Role::parse(*r).unwrap())
        .collect();
    let sid = SessionId::generate();
    req.session_id = Some(sid.clone());
    let done = t.client.watch(&sid);
    assert!(matches!(
        t.client.open(&req, timeout).await.unwrap(),
        OpenReply::Accepted { .. }
    ));
    let event = tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .unwrap()
        .unwrap();
    let flotilla_protocol::EventBody::Done {
        answer: Some(a), ..
    } = event.body
    else {
        panic!()
    };
    assert_eq!(a.sections.len(), 3);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_queue_admits_and_dead_letters_poison() {
    let t = TestFleet::start(spec("unused"), sim(10)).await;
    let names = t.bus.names().clone();
    // A good durable submission completes.
    let sid = SessionId::generate();
    let mut req = OpenSession::new("queued task");
    req.session_id = Some(sid.clone());
    let done = t.client.watch(&sid);
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, MessageId::submit(&sid).as_str());
    t.bus
        .raw_js()
        .publish_with_headers(
            names.submit(),
            h,
            Bytes::from(serde_json::to_vec(&req).unwrap()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        ev.body,
        flotilla_protocol::EventBody::Done {
            outcome: flotilla_protocol::SessionOutcome::Completed,
            ..
        }
    ));
    // Poison submissions go to the dead-letter stream with their reason.
    for (body, reason) in [
        (&b"\x00\xffgarbage"[..], "malformed"),
        (&br#"{"v":1,"task":"no id"}"#[..], "invalid"),
        (
            &br#"{"v":1,"task":"x","extra":1,"session_id":"abc"}"#[..],
            "unknown_field",
        ),
    ] {
        t.bus
            .raw_js()
            .publish(names.submit(), Bytes::copy_from_slice(body))
            .await
            .unwrap()
            .await
            .unwrap();
        let dlq = eventually(Duration::from_secs(20), || async {
            let mut s = t.bus.raw_js().get_stream(names.stream_dlq()).await.ok()?;
            let messages = s.info().await.ok()?.state.messages;
            let last = s
                .get_last_raw_message_by_subject(&format!(
                    "{}.dlq.{}.{reason}",
                    names.prefix(),
                    names.stream_submit()
                ))
                .await
                .ok()?;
            Some((messages, last))
        })
        .await
        .unwrap_or_else(|| panic!("{reason} reached the DLQ"));
        let msg = dlq.1;
        let h = msg.headers;
        assert_eq!(h.get(headers::REASON).map(|v| v.as_str()), Some(reason));
        assert_eq!(
            h.get(headers::ORIGIN_STREAM).map(|v| v.as_str()),
            Some(names.stream_submit().as_str())
        );
        assert!(h.get(headers::ORIGIN_SEQUENCE).is_some());
        assert_eq!(h.get(headers::DELIVERIES).map(|v| v.as_str()), Some("1"));
        assert_eq!(&msg.payload[..], body);
    }
    // Poison left the work queue.
    let left = eventually(Duration::from_secs(10), || async {
        let mut s = t
            .bus
            .raw_js()
            .get_stream(names.stream_submit())
            .await
            .ok()?;
        let n = s.info().await.ok()?.state.messages;
        (n == 0).then_some(n)
    })
    .await;
    assert_eq!(left, Some(0));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_idempotent_and_refuses_conflicts() {
    let server = NatsServer::start().unwrap();
    let config = BusConfig {
        url: server.url(),
        ..BusConfig::default()
    };
    let research = Role::parse("research").unwrap();
    // Twice, concurrently: both succeed.
    let (a, b) = tokio::join!(
        Bus::connect(&config, "a", Arc::new(Counters::default())),
        Bus::connect(&config, "b", Arc::new(Counters::default()))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (x, y) = tokio::join!(a.ensure_inbox(&research), b.ensure_inbox(&research));
    x.unwrap();
    y.unwrap();
    // Another deployment's idea of the role's inbox bound conflicts, with a clear error.
    let mut other = config.clone();
    other.role_inbox_bounds.insert(research.clone(), 64);
    let c = Bus::connect(&other, "c", Arc::new(Counters::default()))
        .await
        .unwrap();
    let err = c.ensure_inbox(&research).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            TopologyError::Conflict {
                field: "max_messages_per_subject",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("FLOTILLA_INBOX_research") && msg.contains("64") && msg.contains('8'),
        "{msg}"
    );
    // Other roles are unaffected, and each role's bound is its own.
    let analysis = Role::parse("analysis").unwrap();
    c.ensure_inbox(&analysis).await.unwrap();
    // A process configured for a cluster (replicas = 3) against streams of one
    // replica is refused, naming the stream and the field, before it touches anything.
    let r3 = BusConfig {
        replicas: 3,
        ..config.clone()
    };
    let err = Bus::connect(&r3, "r3", Arc::new(Counters::default()))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            flotilla_bus::ConnectError::Topology(TopologyError::Conflict {
                field: "num_replicas",
                ..
            })
        ),
        "{msg}"
    );
    assert!(
        msg.contains("FLOTILLA_") && msg.contains('3') && msg.contains('1'),
        "{msg}"
    );
    // A different prefix lives side by side.
    let side = BusConfig {
        prefix: "other".into(),
        inbox_bound: 64,
        ..config
    };
    let bus = Bus::connect(&side, "d", Arc::new(Counters::default()))
        .await
        .unwrap();
    bus.ensure_inbox(&research).await.unwrap();
    let mut s = bus
        .raw_js()
        .get_stream("OTHER_INBOX_research")
        .await
        .unwrap();
    assert_eq!(s.info().await.unwrap().config.max_messages_per_subject, 64);
    // A pool's consumer carries its settings; a process configured differently is
    // refused with a clear error instead of silently running with other settings.
    let five = flotilla_bus::PoolSettings {
        ack_wait: Duration::from_secs(5),
        ..Default::default()
    };
    flotilla_bus::PoolConsumer::for_role(&a, &research, five.clone())
        .await
        .unwrap();
    flotilla_bus::PoolConsumer::for_role(&b, &research, five)
        .await
        .unwrap();
    let seven = flotilla_bus::PoolSettings {
        ack_wait: Duration::from_secs(7),
        ..Default::default()
    };
    let err = flotilla_bus::PoolConsumer::for_role(&b, &research, seven)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("ack_wait 5s") && err.to_string().contains("7s"),
        "{err}"
    );
    let backoff = flotilla_bus::PoolSettings {
        backoff: vec![Duration::from_secs(1), Duration::from_secs(4)],
        max_deliver: 4,
        ..Default::default()
    };
    flotilla_bus::PoolConsumer::for_role(&a, &analysis, backoff)
        .await
        .unwrap();
    let stream = a
        .raw_js()
        .get_stream("FLOTILLA_INBOX_analysis")
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("role-analysis").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.config.backoff,
        vec![Duration::from_secs(1), Duration::from_secs(4)]
    );
    assert_eq!(info.config.max_deliver, 4);
    let too_many = flotilla_bus::PoolSettings {
        backoff: vec![Duration::from_secs(1); 5],
        max_deliver: 3,
        ..Default::default()
    };
    let err = flotilla_bus::PoolConsumer::for_role(&a, &Role::parse("writing").unwrap(), too_many)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must exceed"), "{err}");
    // The advisories stream captures every role's max-deliveries advisories.
    let mut adv = a.raw_js().get_stream("FLOTILLA_ADVISORIES").await.unwrap();
    let subjects = adv.info().await.unwrap().config.subjects.clone();
    for role in ["research", "analysis"] {
        assert!(
            subjects
                .iter()
                .any(|s| s.contains(&format!("FLOTILLA_INBOX_{role}"))),
            "{subjects:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_is_a_clear_error() {
    let server = NatsServer::start().unwrap();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let client = Client::new(nats, flotilla_protocol::Namespace::default())
        .await
        .unwrap();
    let err = client
        .open(&OpenSession::new("anyone?"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("flotilla serve"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_poison_is_dead_lettered_with_its_reason() {
    let t = TestFleet::start(spec("unused"), sim(10)).await;
    let names = t.bus.names().clone();
    let research = Role::parse("research").unwrap();
    let (done, _) = t
        .client
        .run("a real session", Duration::from_secs(60))
        .await
        .unwrap();
    let real = done.session_id.clone();
    let ghost = SessionId::parse("no-such-session").unwrap();
    let task = |sid: &SessionId, extra: &str| {
        format!(
            r#"{{"kind":"task","v":1,"session_id":"{sid}","task_id":"t1","role":"research","attempt":1,"instruction":"i","context":"c"{extra}}}"#
        )
        .into_bytes()
    };
    let orchestrator = Role::orchestrator();
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        ("garbage", names.inbox(&ghost, &research), b"\x00\x01not json".to_vec(), "malformed"),
        ("unknown field", names.inbox(&ghost, &research), task(&ghost, r#","urgent":true"#), "unknown_field"),
        ("v2", names.inbox(&ghost, &research), v2(task(&ghost, "")), "unsupported_version"),
        ("oversized", names.inbox(&ghost, &research), vec![b' '; 300 * 1024], "oversized"),
        ("unknown session", names.inbox(&ghost, &research), task(&ghost, ""), "unknown_session"),
        ("body names another session", names.inbox(&real, &research), task(&ghost, ""), "wrong_session"),
        ("start on a worker inbox", names.inbox(&ghost, &research), format!(r#"{{"kind":"start","v":1,"session_id":"{ghost}"}}"#).into_bytes(), "unknown_role"),
        ("task on the orchestrator inbox", names.inbox(&ghost, &orchestrator), task(&ghost, ""), "unknown_role"),
        ("task for research on the analysis inbox", names.inbox(&ghost, &Role::parse("analysis").unwrap()), task(&ghost, ""), "unknown_role"),
        (
            "forged result for a task the session lacks",
            names.inbox(&real, &orchestrator),
            format!(r#"{{"kind":"result","v":1,"session_id":"{real}","task_id":"t9","role":"research","attempt":1,"outcome":{{"status":"completed"}}}}"#).into_bytes(),
            "forged",
        ),
    ];
    let mut dlq = t.bus.raw_js().get_stream(names.stream_dlq()).await.unwrap();
    for (name, subject, body, reason) in cases {
        let before = dlq.info().await.unwrap().state.last_sequence;
        t.bus
            .raw_js()
            .publish(subject.clone(), Bytes::from(body.clone()))
            .await
            .unwrap()
            .await
            .unwrap();
        let entry = flotilla_tests::dead_letter_after(&t.bus, before)
            .await
            .unwrap_or_else(|| panic!("{name}: no dead letter"));
        assert_eq!(
            entry.headers.get(headers::REASON).map(|v| v.as_str()),
            Some(reason),
            "{name}"
        );
        assert_eq!(
            entry
                .headers
                .get(headers::ORIGIN_SUBJECT)
                .map(|v| v.as_str()),
            Some(subject.as_str()),
            "{name}"
        );
        assert_eq!(
            entry
                .headers
                .get(headers::ORIGIN_STREAM)
                .map(|v| v.as_str()),
            Some(names.stream_inbox(&inbox_role(&names, &subject)).as_str()),
            "{name}"
        );
        let detail = entry
            .headers
            .get(headers::DETAIL)
            .map(|d| d.as_str().to_owned())
            .unwrap_or_default();
        assert!(!detail.is_empty(), "{name}");
        if name == "task for research on the analysis inbox" {
            assert!(
                detail.contains("a task for role research arrived on the analysis inbox"),
                "{detail}"
            );
        }
        // One subject form for dead letters: <p>.dlq.<stream>.<code>.
        let origin = names.stream_inbox(&inbox_role(&names, &subject));
        assert_eq!(entry.subject.as_str(), names.dlq(&origin, reason), "{name}");
        assert_eq!(
            &entry.payload[..],
            &body[..],
            "{name}: the payload is kept as it was"
        );
    }
    // An inbox of a role nobody configured has no stream: the publisher is told at once
    // and nothing is stored anywhere.
    let astrology = Role::parse("astrology").unwrap();
    let refused = t
        .bus
        .publish(&flotilla_bus::Outgoing {
            subject: names.inbox(&real, &astrology),
            msg_id: flotilla_protocol::MessageId::start(&real),
            session: Some(real.clone()),
            attempt: None,
            trace: None,
            payload: Bytes::from(task(&real, "")),
        })
        .await;
    assert!(
        matches!(refused, Err(flotilla_bus::PublishError::NoStream { .. })),
        "{refused:?}"
    );
    // Nothing is left behind in the work queue, and the fleet still serves sessions.
    assert!(inbox_is_empty(&t.bus).await);
    let (after, _) = t
        .client
        .run("still fine", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(after.completed());
    t.stop().await;
}

/// The same message claiming protocol version 2.
fn v2(body: Vec<u8>) -> Vec<u8> {
    String::from_utf8_lossy(&body)
        .replacen(r#""v":1"#, r#""v":2"#, 1)
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leaks_are_reconciled() {
    use flotilla_control::{Admission, SlotTable, slots::SlotValue};
    use flotilla_protocol::{SessionRecord, V1, subject::keys};
    let t = TestFleet::start(spec("unused"), sim(10)).await;
    let slots = SlotTable::new(t.bus.clone(), 600, 1000);
    slots
        .watch(tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let long_ago = flotilla_protocol::epoch_ms(std::time::SystemTime::now()) - 600_000;
    // 1. A slot taken by an instance that died before writing the session record.
    let ghost = SessionId::generate();
    let leaked = SlotValue {
        v: V1,
        session_id: ghost.clone(),
        taken_ms: long_ago,
    };
    t.bus.slots().create(&keys::slot(5), &leaked).await.unwrap();
    // 2. A session whose instance died after writing the record, before sending `start`.
    let stuck = SessionId::generate();
    t.bus
        .slots()
        .create(
            &keys::slot(6),
            &SlotValue {
                v: V1,
                session_id: stuck.clone(),
                taken_ms: long_ago,
            },
        )
        .await
        .unwrap();
    let record = SessionRecord::planning(
        stuck.clone(),
        "stuck before start".into(),
        ["research", "analysis", "writing"]
            .iter()
            .map(|r| Role::parse(*r).unwrap())
            .collect(),
        6,
        0,
        flotilla_bus::trace::new_root().to_string(),
        long_ago,
    );
    t.bus
        .sessions()
        .create(&keys::session(&stuck), &record)
        .await
        .unwrap();
    let done = t.client.watch(&stuck);
    // The view catches up with the two slots.
    eventually(Duration::from_secs(5), || async {
        (slots.taken() >= 2).then_some(())
    })
    .await
    .unwrap();

    let found = slots.reconcile(Duration::from_secs(1)).await.unwrap();
    assert_eq!(found.reclaimed, 1, "the slot without a record is reclaimed");
    assert_eq!(found.stuck_planning, vec![stuck.clone()]);
    assert!(
        t.bus
            .slots()
            .get::<SlotValue>(&keys::slot(5))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        t.bus
            .slots()
            .get::<SlotValue>(&keys::slot(6))
            .await
            .unwrap()
            .is_some()
    );

    let admission = Admission::new(
        t.bus.clone(),
        flotilla_control::SessionConfig::default(),
        slots.clone(),
    );
    admission.restart_if_planning(&stuck).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        event.body,
        flotilla_protocol::EventBody::Done {
            outcome: flotilla_protocol::SessionOutcome::Completed,
            ..
        }
    ));
    // Its slot is released when it ends.
    let freed = eventually(Duration::from_secs(10), || async {
        t.bus
            .slots()
            .get::<SlotValue>(&keys::slot(6))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(freed.is_some());
    t.stop().await;
}

fn inbox_role(names: &flotilla_protocol::Namespace, subject: &str) -> Role {
    match names.parse(subject).unwrap() {
        flotilla_protocol::ParsedSubject::Inbox { role, .. } => role,
        other => panic!("{other:?}"),
    }
}

/// The server's count of messages received so far.
fn in_msgs(server: &NatsServer) -> u64 {
    let body = flotilla_testkit::monitor_get(server.monitor_port(), "/varz").unwrap();
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["in_msgs"]
        .as_u64()
        .unwrap()
}

/// A server with nothing but a bus on it (no fleet: the server's message count moves
/// only with what the test does), and a token that stops the test's watchers.
async fn bare_bus() -> (NatsServer, Bus, tokio_util::sync::CancellationToken) {
    let server = NatsServer::start().unwrap();
    let config = BusConfig {
        url: server.url(),
        ..BusConfig::default()
    };
    let bus = Bus::connect(&config, "slots", Arc::new(Counters::default()))
        .await
        .unwrap();
    (server, bus, tokio_util::sync::CancellationToken::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_slot_is_taken_again_with_one_message() {
    let (server, bus, shutdown) = bare_bus().await;
    // One slot: every session after the first takes it over its predecessor's delete
    // marker.
    let table = flotilla_control::slots::SlotTable::new(bus.clone(), 1, 500);
    table.watch(shutdown.clone()).await.unwrap();
    for round in 0..4 {
        let session = SessionId::generate();
        // The watcher has seen the last release (the view says free).
        assert!(
            eventually(Duration::from_secs(10), || async {
                (table.taken() == 0).then_some(())
            })
            .await
            .is_some(),
            "round {round}: the release was never seen"
        );
        let before = in_msgs(&server);
        let (n, rev) = table.acquire(&session).await.unwrap();
        let after = in_msgs(&server);
        assert_eq!(n, 0);
        assert_eq!(
            after - before,
            1,
            "round {round}: taking the slot cost one message"
        );
        // Taken: a second session is refused until it is released.
        let other = table.acquire(&SessionId::generate()).await;
        assert!(
            matches!(other, Err(flotilla_control::slots::SlotError::Full { .. })),
            "{other:?}"
        );
        flotilla_control::slots::release_taken(&bus, n, rev)
            .await
            .unwrap();
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_reads_only_the_records_of_old_slots() {
    let (server, bus, shutdown) = bare_bus().await;
    let table = flotilla_control::slots::SlotTable::new(bus.clone(), 8, 500);
    table.watch(shutdown.clone()).await.unwrap();
    // Three slots taken by sessions that never got a record (a crash leak each).
    for _ in 0..3 {
        table.acquire(&SessionId::generate()).await.unwrap();
    }
    // The watcher has seen who holds them.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let found = table.reconcile(Duration::from_secs(3600)).await.unwrap();
            (found == flotilla_control::slots::Reconciled::default()).then_some(())
        })
        .await
        .is_some()
    );
    // Young slots: a pass sends nothing at all.
    let before = in_msgs(&server);
    let found = table.reconcile(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(found.reclaimed, 0);
    assert_eq!(in_msgs(&server) - before, 0, "no slot and no record read");
    // Old slots: their records are read (a missing one is asked of the stream leader
    // again before it counts as missing), and each leaked slot is deleted.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = in_msgs(&server);
    let found = table.reconcile(Duration::from_millis(1)).await.unwrap();
    assert_eq!(found.reclaimed, 3);
    assert_eq!(in_msgs(&server) - before, 3 * (2 + 1));
    assert!(
        eventually(Duration::from_secs(10), || async {
            (table.taken() == 0).then_some(())
        })
        .await
        .is_some(),
        "the reclaimed slots are free again"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_behind_the_bucket_still_takes_a_free_slot() {
    let (_server, bus, shutdown) = bare_bus().await;
    // Another instance takes the only slot and gives it back ...
    let other = flotilla_control::slots::SlotTable::new(bus.clone(), 1, 500);
    other.watch(shutdown.clone()).await.unwrap();
    let (n, rev) = other.acquire(&SessionId::generate()).await.unwrap();
    flotilla_control::slots::release_taken(&bus, n, rev)
        .await
        .unwrap();
    // ... while this one's view never saw the key (its watcher lags): its write on the
    // revision it knows is refused, and it takes the slot on the delete marker's.
    let behind = flotilla_control::slots::SlotTable::new(bus.clone(), 1, 500);
    let (n, rev) = behind.acquire(&SessionId::generate()).await.unwrap();
    assert_eq!(n, 0);
    assert!(rev > 2, "written over the release's delete marker: {rev}");
    // Taken now: it does not hand it out again.
    assert!(behind.acquire(&SessionId::generate()).await.is_err());
    shutdown.cancel();
}

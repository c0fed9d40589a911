//! Delivery guarantees in one process: fencing of a late holder, idempotent handling of
//! duplicate deliveries, validation tied to the ack, dead letters after max deliveries,
//! and backpressure from bounded inboxes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_llm::{LlmClient, LlmError, schema};
use flotilla_protocol::{
    Event, EventBody, InboxMessage, Role, SessionOutcome, SessionRecord, SessionStatus, TaskRecord,
    headers, subject::keys,
};
use flotilla_tests::{Action, Scripted, TestFleet, events, eventually, inbox_is_empty, spec};
use futures::StreamExt;

fn accepted_results(evs: &[Event], task: &str) -> usize {
    evs.iter()
        .filter(|e| matches!(&e.body, EventBody::Result { task_id, accepted: true, .. } if task_id.as_str() == task))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_holder_is_fenced_off() {
    // The first attempt at the research task sleeps well past the ack wait, then answers
    // with a tagged output; any later call answers at once.
    let llm = Scripted::new(10, |c| {
        if c.schema.as_deref() == Some(schema::TASK_OUTPUT)
            && c.field("role") == "research"
            && c.nth == 0
        {
            Action::Late(Duration::from_secs(4), " LATE".into())
        } else {
            Action::Pass
        }
    });
    let mut s = spec("unused");
    s.workers_per_role = 2;
    s.worker.ack_wait = Duration::from_secs(1);
    // The slow holder keeps its delivery alive (a long LLM call is not a failure), so
    // what takes the task from it is the watchdog's stuck timeout: no progress for 1 s.
    s.control.liveness.stuck_timeout = Duration::from_secs(1);
    s.control.liveness.probe_every = Duration::from_millis(200);
    let t = TestFleet::start(s, llm.clone() as Arc<dyn LlmClient>).await;
    let (done, _) = t
        .client
        .run("fencing drill", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(done.completed());
    let EventBody::Done {
        answer: Some(answer),
        ..
    } = &done.event.body
    else {
        panic!()
    };
    let research = answer
        .sections
        .iter()
        .find(|s| s.role.as_str() == "research")
        .unwrap();
    assert!(
        research
            .output
            .artifacts
            .iter()
            .all(|a| !a.content.contains("LATE")),
        "the answer holds the current holder's result only"
    );
    // The late holder wakes up, fails to commit, and says so in the event log.
    let fenced = eventually(Duration::from_secs(15), || async {
        let evs = events(&t, &done.session_id).await;
        evs.iter()
            .any(|e| matches!(&e.body, EventBody::Result { accepted: false, reason: Some(r), .. } if r.starts_with("fenced")))
            .then_some(evs)
    })
    .await
    .expect("a fenced result is logged");
    assert_eq!(
        accepted_results(&fenced, "t1"),
        1,
        "exactly one accepted result for the task"
    );
    let (rec, _) = t
        .bus
        .sessions()
        .get::<TaskRecord>(&keys::task(
            &done.session_id,
            &research.role,
            &research.task_id,
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(
        rec.output
            .unwrap()
            .artifacts
            .iter()
            .all(|a| !a.content.contains("LATE")),
        "the late write was rejected"
    );
    assert!(inbox_is_empty(&t.bus).await);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_delivery_has_one_effect() {
    duplicate_delivery_has_one_effect(2).await;
}

/// The copy reaches the process that is running the attempt (the only one of its role),
/// as a consumer leader elected on a cluster may redeliver it: the process does not run
/// it a second time beside the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_delivered_to_the_process_running_it_has_one_effect() {
    duplicate_delivery_has_one_effect(1).await;
}

async fn duplicate_delivery_has_one_effect(workers: usize) {
    let llm = Scripted::new(400, |_| Action::Pass);
    let mut s = spec("unused");
    s.workers_per_role = workers;
    s.worker.ack_wait = Duration::from_secs(2);
    let t = TestFleet::start(s, llm.clone() as Arc<dyn LlmClient>).await;
    // Catch the research task as it is dispatched and deliver a second copy of it
    // (another message id, so the server stores it as a new message).
    let mut sub = t
        .bus
        .raw_client()
        .subscribe("flotilla.s.*.in.research")
        .await
        .unwrap();
    t.bus.raw_client().flush().await.unwrap();
    let client = t.client.clone();
    let run =
        tokio::spawn(async move { client.run("say it twice", Duration::from_secs(60)).await });
    let original = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .unwrap()
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "a-different-id");
    t.bus
        .raw_js()
        .publish_with_headers(original.subject.clone(), h, original.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let (done, _) = run.await.unwrap().unwrap();
    assert!(done.completed());
    // The copy may still wait out the original's claim (nak with delay) when the
    // session ends; it is then acked as belonging to an ended session.
    assert!(
        eventually(Duration::from_secs(15), || async {
            inbox_is_empty(&t.bus).await.then_some(())
        })
        .await
        .is_some(),
        "the duplicate was handled and acked"
    );
    let InboxMessage::Task(task) = serde_json::from_slice(&original.payload).unwrap() else {
        panic!()
    };
    assert_eq!(
        llm.count(schema::TASK_OUTPUT, task.task_id.as_str()),
        1,
        "the agent ran once"
    );
    let evs = events(&t, &done.session_id).await;
    assert_eq!(accepted_results(&evs, task.task_id.as_str()), 1);
    let (rec, _) = t
        .bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&done.session_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.counters.accepted, 4);
    t.stop().await;
}

/// Another process holds the research task's claim, ten times older than the claim's
/// time to live (the 1 s ack wait), and that process is alive: its presence is there
/// and it answers pings. The worker does not take the claim over by its age (a live
/// holder may be in a model call longer than the ack wait, its delivery redelivered by
/// a new consumer leader); it waits. Once the holder is gone (presence deleted, pings
/// unanswered), the task is taken over and the session completes, the model called
/// once for the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_taken_over_only_once_its_holder_is_gone() {
    use flotilla_protocol::{
        AgentId, OpenReply, OpenSession, Presence, SessionId, TaskId, TaskRunState, V1, epoch_ms,
    };
    let llm = Scripted::new(10, |_| Action::Pass);
    let mut s = spec("unused");
    s.worker.ack_wait = Duration::from_secs(1);
    let t = TestFleet::start(s, llm.clone() as Arc<dyn LlmClient>).await;
    let research: Role = "research".parse().unwrap();
    let holder = AgentId::generate(&research);
    let ping = t.bus.names().agent_ping(&holder);
    let mut pings = t.bus.raw_client().subscribe(ping.clone()).await.unwrap();
    let nc = t.bus.raw_client().clone();
    let answering = tokio::spawn(async move {
        while let Some(m) = pings.next().await {
            if let Some(reply) = m.reply {
                let _ = nc.publish(reply, Bytes::from_static(b"pong")).await;
            }
        }
    });
    let now = epoch_ms(std::time::SystemTime::now());
    let presence = Presence {
        v: V1,
        agent_id: holder.clone(),
        role: research.clone(),
        ping_subject: ping,
        started_ms: now,
        renewed_ms: now,
        in_flight: Vec::new(),
    };
    t.bus
        .agents()
        .put(holder.as_ref(), &presence)
        .await
        .unwrap();
    // The claim, written before the session is even opened (the plan gives research t1).
    let session = SessionId::generate();
    let claim = TaskRecord {
        v: V1,
        session_id: session.clone(),
        task_id: TaskId::nth(1),
        role: research.clone(),
        attempt: 1,
        state: TaskRunState::Running,
        holder: Some(holder.clone()),
        holders: 1,
        ack_subject: Some("flotilla.test.no-such-ack".into()),
        output: None,
        error: None,
        outcome: None,
        spend: None,
        memory: None,
        attempt_tokens: None,
        updated_ms: now - 10_000,
    };
    t.bus
        .sessions()
        .put(&keys::claim(&session, &research, &TaskId::nth(1)), &claim)
        .await
        .unwrap();
    let done = t.client.watch(&session);
    let mut req = OpenSession::new("hold on");
    req.session_id = Some(session.clone());
    let reply = t.client.open(&req, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(reply, OpenReply::Accepted { .. }), "{reply:?}");
    // Four claim lifetimes after the session's other tasks ran, the held one has not.
    assert!(
        eventually(Duration::from_secs(30), || async {
            (llm.count(schema::TASK_OUTPUT, "t2") > 0).then_some(())
        })
        .await
        .is_some(),
        "the session's other tasks run"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        llm.count(schema::TASK_OUTPUT, "t1"),
        0,
        "a live holder's claim was taken over"
    );
    // The holder goes away.
    answering.abort();
    t.bus.agents().delete(holder.as_ref(), None).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .expect("the session ends once the holder is gone")
        .unwrap();
    assert!(
        matches!(
            &event.body,
            EventBody::Done {
                outcome: SessionOutcome::Completed,
                ..
            }
        ),
        "{:?}",
        event.body
    );
    assert_eq!(llm.count(schema::TASK_OUTPUT, "t1"), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_results_are_retried_with_the_reason_then_fail_visibly() {
    let no_artifacts = r#"{"summary":"I looked into it","artifacts":[]}"#;
    // review: the first two attempts produce no artifacts, the third is fine.
    // writing (in a second session): never anything but "done".
    let llm = Scripted::new(10, move |c| match (c.schema.as_deref(), c.field("role")) {
        (Some(schema::TASK_OUTPUT), "review") if c.input["attempt"].as_u64() < Some(3) => {
            Action::Replace(no_artifacts.into())
        }
        (Some(schema::TASK_OUTPUT), "writing") if c.field("context").contains("hopeless") => {
            Action::Replace(
                r#"{"summary":"done","artifacts":[{"name":"x","kind":"note","content":"y"}]}"#
                    .into(),
            )
        }
        _ => Action::Pass,
    });
    let t = TestFleet::start(spec("unused"), llm.clone() as Arc<dyn LlmClient>).await;
    let (done, _) = t
        .client
        .run("retry until right", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(done.completed());
    let evs = events(&t, &done.session_id).await;
    let rejected: Vec<_> = evs
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Result {
                task_id,
                accepted: false,
                reason,
                attempt,
                ..
            } if task_id.as_str() == "t4" => Some((*attempt, reason.clone().unwrap_or_default())),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(
        rejected.iter().all(|(_, r)| r.contains("no artifacts")),
        "{rejected:?}"
    );
    // The retry told the agent why the previous attempt failed.
    let calls = llm.calls.lock().unwrap().clone();
    let third = calls
        .iter()
        .find(|c| c.field("role") == "review" && c.input["attempt"] == 3)
        .expect("a third attempt");
    assert!(
        third
            .field("previous_attempt_rejected_because")
            .contains("no artifacts")
    );

    // A task that never produces a valid result fails the session, naming it and why.
    let (failed, _) = t
        .client
        .run("a hopeless request", Duration::from_secs(60))
        .await
        .unwrap();
    let EventBody::Done {
        outcome, failure, ..
    } = &failed.event.body
    else {
        panic!()
    };
    assert_eq!(*outcome, SessionOutcome::Failed);
    let failure = failure.clone().unwrap();
    assert!(
        failure.contains("t3") && failure.contains("writing") && failure.contains("says nothing"),
        "{failure}"
    );
    let (rec, _) = t
        .bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&failed.session_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, SessionStatus::Failed);
    assert_eq!(rec.failure.as_deref(), Some(failure.as_str()));
    assert!(inbox_is_empty(&t.bus).await);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_deliveries_are_dead_lettered_and_the_session_fails_visibly() {
    // The analysis provider is down for good: every attempt is a transient failure.
    let llm = Scripted::new(10, |c| {
        if c.schema.as_deref() == Some(schema::TASK_OUTPUT) && c.field("role") == "analysis" {
            Action::Fail(LlmError::Unavailable("provider down".into()))
        } else {
            Action::Pass
        }
    });
    let mut s = spec("unused");
    s.worker.ack_wait = Duration::from_secs(1);
    s.worker.max_deliver = 2;
    s.control.session.max_task_attempts = 2;
    let t = TestFleet::start(s, llm.clone() as Arc<dyn LlmClient>).await;
    let (done, _) = t
        .client
        .run("analysis is down", Duration::from_secs(90))
        .await
        .unwrap();
    let EventBody::Done {
        outcome, failure, ..
    } = &done.event.body
    else {
        panic!()
    };
    assert_eq!(*outcome, SessionOutcome::Failed);
    let failure = failure.clone().unwrap();
    assert!(
        failure.contains("t2") && failure.contains("dead-lettered after 2 deliveries"),
        "{failure}"
    );
    // Both attempts are in the dead-letter stream with their reason, out of the work queue.
    let names = t.bus.names().clone();
    let mut dlq = t.bus.raw_js().get_stream(names.stream_dlq()).await.unwrap();
    let last = dlq.info().await.unwrap().state.last_sequence;
    let mut attempts = Vec::new();
    for seq in 1..=last {
        let m = dlq.get_raw_message(seq).await.unwrap();
        assert_eq!(
            m.headers.get(headers::REASON).map(|v| v.as_str()),
            Some("max_deliveries")
        );
        assert_eq!(
            m.headers.get(headers::DELIVERIES).map(|v| v.as_str()),
            Some("2")
        );
        let InboxMessage::Task(task) = serde_json::from_slice(&m.payload).unwrap() else {
            panic!()
        };
        assert_eq!(task.role, Role::parse("analysis").unwrap());
        attempts.push(task.attempt);
    }
    assert_eq!(attempts, vec![1, 2]);
    assert!(
        inbox_is_empty(&t.bus).await,
        "dead letters left the work queue"
    );
    // flotilla dlq's operations see them, and a replay puts one back on its subject.
    let listed = flotilla_control::dlq::list(&t.bus, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|e| e.subject.ends_with(".in.analysis") && e.reason == "max_deliveries")
    );
    let subject = flotilla_control::dlq::replay(&t.bus, listed[0].seq)
        .await
        .unwrap();
    assert_eq!(subject, listed[0].subject);
    assert_eq!(
        flotilla_control::dlq::list(&t.bus, 10).await.unwrap().len(),
        1
    );
    // The replayed attempt is stale (the session moved on): it is acked, not re-run.
    assert!(inbox_is_empty(&t.bus).await);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_inboxes_push_back_and_nothing_is_lost() {
    // Three tasks per role, six in flight, room for one message per inbox, one slow
    // worker per role handling one task at a time: dispatches hit full inboxes.
    let llm: Arc<dyn LlmClient> = Arc::new(flotilla_llm::SimulatedProvider::new(
        flotilla_llm::SimConfig {
            latency_ms: 150,
            subtasks_per_role: 3,
            ..Default::default()
        },
    ));
    let mut s = spec("unused");
    s.bus.inbox_bound = 1;
    s.control.session.max_in_flight = 6;
    s.control.session.max_tasks = 12;
    s.worker.concurrency = 1;
    let t = TestFleet::start(s, llm).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..4 {
        let c = t.client.clone();
        set.spawn(async move { c.run(&format!("flood {i}"), Duration::from_secs(120)).await });
    }
    let mut backpressure = 0;
    while let Some(r) = set.join_next().await {
        let (done, _) = r.unwrap().unwrap();
        assert!(done.completed());
        let EventBody::Done {
            answer: Some(a), ..
        } = &done.event.body
        else {
            panic!()
        };
        assert_eq!(a.sections.len(), 12, "every task completed");
        let evs = events(&t, &done.session_id).await;
        backpressure += evs
            .iter()
            .filter(|e| matches!(e.body, EventBody::Backpressure { .. }))
            .count();
        for n in 1..=12 {
            assert_eq!(accepted_results(&evs, &format!("t{n}")), 1);
        }
    }
    assert!(backpressure > 0, "full inboxes were hit and logged");
    assert!(t.fleet.as_ref().unwrap().counters.snapshot().backpressure > 0);
    assert!(inbox_is_empty(&t.bus).await, "lost: 0");
    let _ = Bytes::new();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_orchestrator_call_fails_the_session_instead_of_retrying_forever() {
    // The provider refuses the synthesis request (too long, say): retrying cannot help.
    let llm = Scripted::new(10, |c| {
        if c.schema.as_deref() == Some(schema::SYNTHESIS) {
            Action::Fail(LlmError::Refused("context length exceeded".into()))
        } else {
            Action::Pass
        }
    });
    let t = TestFleet::start(spec("unused"), llm.clone() as Arc<dyn LlmClient>).await;
    let (done, _) = t
        .client
        .run("the answer is too long to write", Duration::from_secs(60))
        .await
        .unwrap();
    let EventBody::Done {
        outcome, failure, ..
    } = &done.event.body
    else {
        panic!()
    };
    assert_eq!(*outcome, SessionOutcome::Failed);
    let failure = failure.clone().unwrap();
    assert!(failure.contains("context length exceeded"), "{failure}");
    assert_eq!(
        llm.count(schema::SYNTHESIS, ""),
        1,
        "asked once, not retried"
    );
    t.stop().await;
}

/// A handler whose store does not answer (a stream without a leader while a cluster
/// elects one, a server restarting) is run again in place, backed off, with its
/// delivery kept alive: the outage spends none of the message's deliveries, even when
/// it lasts longer than the ack wait and the pool allows two deliveries only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_waited_out_in_place_without_spending_deliveries() {
    use flotilla_bus::{Bus, BusConfig, Counters, Delivery, KvError, PoolConsumer, PoolSettings};
    let server = flotilla_testkit::NatsServer::start().unwrap();
    let config = BusConfig {
        url: server.url(),
        ..BusConfig::default()
    };
    let bus = Bus::connect(&config, "outage", Arc::new(Counters::default()))
        .await
        .unwrap();
    let role = Role::parse("research").unwrap();
    bus.ensure_inbox(&role).await.unwrap();
    let settings = PoolSettings {
        ack_wait: Duration::from_secs(2),
        max_deliver: 2,
        ..PoolSettings::default()
    };
    let consumer = PoolConsumer::for_role(&bus, &role, settings).await.unwrap();
    let subject = bus
        .names()
        .inbox(&flotilla_protocol::SessionId::generate(), &role);
    bus.raw_js()
        .publish(subject, Bytes::from_static(b"{}"))
        .await
        .unwrap()
        .await
        .unwrap();
    // Unavailable four times (about 1.5 to 3 s of backoff in all), then handled.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (s, b) = (seen.clone(), bus.clone());
    let serving = tokio::spawn(consumer.serve(b, shutdown.clone(), move |d: Delivery| {
        let s = s.clone();
        async move {
            let n = {
                let mut s = s.lock().unwrap();
                s.push(d.delivered());
                s.len()
            };
            if n <= 4 {
                let e = KvError::Unavailable {
                    key: "task.x".into(),
                    source: "no leader".into(),
                };
                (d, Err(e.into()))
            } else {
                (d, Ok(()))
            }
        }
    }));
    assert!(inbox_is_empty(&bus).await, "the message was acked");
    let seen = seen.lock().unwrap().clone();
    // One delivery from the server, handled five times; each handling in place after
    // the first counts as a repeat, so the handler repairs what the failed one left.
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        bus.counters.snapshot().redelivered,
        0,
        "the server redelivered nothing"
    );
    let mut dlq = bus
        .raw_js()
        .get_stream(bus.names().stream_dlq())
        .await
        .unwrap();
    assert_eq!(
        dlq.info().await.unwrap().state.messages,
        0,
        "nothing dead-lettered"
    );
    shutdown.cancel();
    serving.await.unwrap();
}

/// A handler may let go of a delivery's payload once it has decoded it (it holds the
/// delivery through a model call, and the stream keeps the message until it is acked).
/// The payload comes back from the stream for a handling run again in place after an
/// outage, and for the dead-letter copy of a message that turns out to be poison: the
/// same bytes, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_payload_is_read_back_for_a_repeat_and_for_its_dead_letter() {
    use flotilla_bus::{
        Bus, BusConfig, Counters, Delivery, KvError, PoolConsumer, PoolSettings, VerdictError,
    };
    let server = flotilla_testkit::NatsServer::start().unwrap();
    let config = BusConfig {
        url: server.url(),
        ..BusConfig::default()
    };
    let bus = Bus::connect(&config, "released", Arc::new(Counters::default()))
        .await
        .unwrap();
    let role = Role::parse("research").unwrap();
    bus.ensure_inbox(&role).await.unwrap();
    let consumer = PoolConsumer::for_role(&bus, &role, PoolSettings::default())
        .await
        .unwrap();
    let subject = bus
        .names()
        .inbox(&flotilla_protocol::SessionId::generate(), &role);
    let body = Bytes::from_static(br#"{"v":1,"kind":"released","padding":"0123456789"}"#);
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::SESSION, "s-released");
    h.insert(headers::SIGNATURE, "checked-before-release");
    h.insert(headers::TRACEPARENT, "00-not-a-trace-context");
    bus.raw_js()
        .publish_with_headers(subject.clone(), h, body.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    // First handling: releases the payload, then hits an outage. Second (in place):
    // sees the payload again, releases it, and finds the message poison.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(Bytes, Option<String>)>::new()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (s, b) = (seen.clone(), bus.clone());
    let sent_to = subject.to_string();
    let serving = tokio::spawn(consumer.serve(b, shutdown.clone(), move |mut d: Delivery| {
        let (s, sub) = (s.clone(), sent_to.clone());
        async move {
            let n = {
                let mut s = s.lock().unwrap();
                s.push((
                    d.payload().clone(),
                    d.header(headers::SIGNATURE).map(str::to_owned),
                ));
                assert_eq!(d.subject(), sub, "the subject, read back for a repeat");
                s.len()
            };
            // A malformed trace context is replaced by a root of the delivery's own:
            // the same at every read, before the release and after it.
            let trace = d.trace();
            assert!(trace.is_some(), "replaced, not dropped");
            assert_eq!(d.trace(), trace);
            d.release_payload();
            assert_eq!(d.trace(), trace, "the same after the release");
            assert!(d.payload().is_empty(), "released");
            assert_eq!(
                d.header(headers::SIGNATURE),
                None,
                "released with the payload"
            );
            assert_eq!(
                d.header(headers::SESSION),
                None,
                "released too: the dead letter reads it back with the payload"
            );
            assert_eq!(
                d.subject(),
                "",
                "released too: read back with the payload for a repeat and a dead letter"
            );
            let verdict = if n == 1 {
                Err(KvError::Unavailable {
                    key: "task.x".into(),
                    source: "no leader".into(),
                }
                .into())
            } else {
                Err(VerdictError::poison(
                    flotilla_protocol::ErrorCode::Malformed,
                    "poison after release",
                ))
            };
            (d, verdict)
        }
    }));
    let mut dlq = bus
        .raw_js()
        .get_stream(bus.names().stream_dlq())
        .await
        .unwrap();
    let mut letters = 0;
    for _ in 0..200 {
        letters = dlq.info().await.unwrap().state.messages;
        if letters > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(letters, 1, "the poison message was dead-lettered");
    let letter = dlq.get_raw_message(1).await.unwrap();
    assert_eq!(
        letter.payload, body,
        "the dead letter holds the original bytes"
    );
    assert_eq!(
        letter
            .headers
            .get(headers::REASON)
            .map(|v| v.to_string())
            .as_deref(),
        Some("malformed")
    );
    assert!(
        inbox_is_empty(&bus).await,
        "terminated: gone from the inbox"
    );
    assert!(
        letter.headers.get(headers::TRACEPARENT).is_none(),
        "a malformed trace context is not passed on"
    );
    assert_eq!(
        letter
            .headers
            .get(headers::SESSION)
            .map(|v| v.to_string())
            .as_deref(),
        Some("s-released")
    );
    assert_eq!(
        letter
            .headers
            .get(headers::ORIGIN_SUBJECT)
            .map(|v| v.to_string())
            .as_deref(),
        Some(subject.as_str()),
        "the dead letter names the subject the message was published to"
    );
    let sig = Some("checked-before-release".to_owned());
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![(body.clone(), sig.clone()), (body, sig)],
        "the repeat in place saw the payload and the headers again"
    );
    shutdown.cancel();
    serving.await.unwrap();
}

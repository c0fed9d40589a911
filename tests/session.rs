//! A session end to end over a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::collections::HashSet;
use std::time::Duration;

use flotilla_protocol::{
    Event, EventBody, EventKindName, SessionOutcome, SessionRecord, SessionStatus, subject::keys,
};
use flotilla_tests::{TestFleet, eventually, inbox_is_empty, sim, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_completes_with_every_role() {
    // Every role shares its findings in the session's memory (off by default).
    let mut s = spec("unused");
    for role in s.control.session.roles.clone() {
        s.roles.entry(role).or_default().share_findings = Some(true);
    }
    let t = TestFleet::start(s, sim(20)).await;
    let (finished, rejections) = t
        .client
        .run(
            "compare three databases for a time-series workload",
            Duration::from_secs(60),
        )
        .await
        .expect("session finishes");
    assert_eq!(rejections, 0);
    let EventBody::Done {
        outcome, answer, ..
    } = &finished.event.body
    else {
        panic!("not a done event: {:?}", finished.event);
    };
    assert_eq!(*outcome, SessionOutcome::Completed);
    let answer = answer.as_ref().expect("completed sessions carry an answer");
    let got: HashSet<_> = answer.sections.iter().map(|s| s.role.to_string()).collect();
    let want: HashSet<_> = ["research", "analysis", "writing", "review"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want, "every worker role contributed");
    for s in &answer.sections {
        assert!(!s.output.artifacts.is_empty());
        assert!(
            s.output.summary.contains("time-series"),
            "{}",
            s.output.summary
        );
    }
    // The outbox is cleared right after the `done` event goes out: wait for it.
    let record = eventually(Duration::from_secs(10), || async {
        let (r, _) = t
            .bus
            .sessions()
            .get::<SessionRecord>(&keys::session(&finished.session_id))
            .await
            .ok()??;
        r.outbox.is_empty().then_some(r)
    })
    .await
    .expect("the outbox drains once the effects are performed");
    assert_eq!(record.status, SessionStatus::Completed);
    assert_eq!(record.answer.as_deref(), Some(answer));
    assert_eq!(record.counters.accepted, 4);
    // Every worker shared its finding in the session's memory, exactly once.
    let findings = t
        .bus
        .memory()
        .session(&finished.session_id)
        .scan::<flotilla_agent::Finding>(flotilla_agent::FINDING_PREFIX)
        .await
        .unwrap();
    let mut tasks: Vec<_> = findings
        .iter()
        .map(|(_, f)| f.value.task_id.clone())
        .collect();
    tasks.sort();
    assert_eq!(tasks, vec!["t1", "t2", "t3", "t4"]);
    for (key, f) in &findings {
        assert_eq!(*key, format!("finding-{}", f.value.task_id));
    }
    // ... and the session record counts that memory traffic.
    let m = record.counters.memory;
    assert!(
        m.cas_attempts >= 4 && m.cas_attempts >= m.conflicts,
        "{m:?}"
    );
    // The event log tells the whole story.
    let mut events = t
        .bus
        .raw_js()
        .get_stream(t.bus.names().stream_events())
        .await
        .unwrap();
    for kind in EventKindName::ALL {
        if matches!(
            kind,
            // First attempts are recorded on the event of the step that dispatched them
            // (`Event::dispatched`, checked below), not on events of their own.
            EventKindName::Dispatched
                | EventKindName::Backpressure
                | EventKindName::Reassigned
                | EventKindName::HeartbeatMissed
                | EventKindName::Clarification
                | EventKindName::RateLimitWait
                | EventKindName::BudgetExhausted
                | EventKindName::CircuitOpen
                | EventKindName::InputRequested
        ) {
            continue;
        }
        let subject = t.bus.names().event(&finished.session_id, kind);
        let msg = events
            .get_last_raw_message_by_subject(&subject)
            .await
            .unwrap_or_else(|e| panic!("no {} event: {e}", kind.as_str()));
        let ev: Event = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(ev.body.kind(), kind);
        assert_eq!(ev.session_id, finished.session_id);
    }
    let count = events.info().await.unwrap().state.messages;
    assert_eq!(count, 1 + 1 + 4 + 1, "opened, planned, 4 results, done");
    // Every task was dispatched once, recorded on `planned` (the first wave) or on the
    // result that made it ready, never on an event after its own result.
    let log = flotilla_tests::events(&t, &finished.session_id).await;
    let mut dispatched: Vec<String> = Vec::new();
    for (i, ev) in log.iter().enumerate() {
        for d in &ev.dispatched {
            assert_eq!(d.attempt, 1, "{d:?}");
            assert!(
                !log[..=i].iter().any(|e| matches!(&e.body,
                    flotilla_protocol::EventBody::Result { task_id, .. } if *task_id == d.task_id)),
                "{d:?} recorded after its result"
            );
            dispatched.push(d.task_id.to_string());
        }
    }
    dispatched.sort();
    assert_eq!(dispatched, vec!["t1", "t2", "t3", "t4"]);
    assert!(
        !log[1].dispatched.is_empty(),
        "the first wave is on `planned`"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sessions_stay_isolated() {
    let t = TestFleet::start(spec("unused"), sim(20)).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = t.client.clone();
        set.spawn(async move {
            let marker = format!("topic-{i:03}-marker");
            let res = client
                .run(
                    &format!("write a brief on {marker}"),
                    Duration::from_secs(240),
                )
                .await;
            (marker, res)
        });
    }
    let mut seen = HashSet::new();
    while let Some(joined) = set.join_next().await {
        let (marker, res) = joined.expect("task ran");
        let (finished, _) = res.unwrap_or_else(|e| panic!("{marker}: {e}"));
        assert!(
            seen.insert(finished.session_id.clone()),
            "session ids are unique"
        );
        let EventBody::Done {
            outcome, answer, ..
        } = &finished.event.body
        else {
            panic!("not done");
        };
        assert_eq!(*outcome, SessionOutcome::Completed, "{marker}");
        let answer = answer.as_ref().expect("answer");
        assert_eq!(answer.sections.len(), 4, "{marker}: one section per role");
        for s in &answer.sections {
            // Every section is about this session's task, and no other marker leaks in.
            assert!(
                s.output.summary.contains(&marker),
                "{marker}: {}",
                s.output.summary
            );
            let others = s.output.summary.matches("topic-").count();
            assert_eq!(
                others, 1,
                "{marker}: foreign content in {}",
                s.output.summary
            );
            for a in &s.output.artifacts {
                assert!(
                    a.content.contains(&marker),
                    "{marker}: artifact {}",
                    a.content
                );
            }
        }
        assert!(answer.summary.contains(&marker));
    }
    assert_eq!(seen.len(), 200);
    // Nothing is left unacknowledged in any inbox.
    assert!(
        inbox_is_empty(&t.bus).await,
        "every inbox message was acknowledged"
    );
    let c = t.fleet.as_ref().expect("fleet").counters.snapshot();
    assert_eq!(c.dispatched, 800);
    assert_eq!(c.dead_lettered, 0);
    // With the defaults the agents share no findings: nothing was written to memory.
    let memory = t
        .bus
        .raw_js()
        .get_stream(format!("KV_{}", t.bus.names().bucket_memory()))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(memory, 0, "no finding is written unless a role asks");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_carries_the_session_trace() {
    use flotilla_protocol::{TraceParent, headers};
    use futures::StreamExt;
    let t = TestFleet::start(spec("unused"), sim(10)).await;
    let mut sub = t.bus.raw_client().subscribe("flotilla.s.>").await.unwrap();
    t.bus.raw_client().flush().await.unwrap();
    let (finished, _) = t
        .client
        .run("trace me", Duration::from_secs(60))
        .await
        .unwrap();
    let (record, _) = t
        .bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&finished.session_id))
        .await
        .unwrap()
        .unwrap();
    let root = TraceParent::parse(&record.traceparent).unwrap();
    let mut seen = 0;
    let mut spans = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        let h = msg.headers.as_ref().expect("headers on every message");
        let tp =
            TraceParent::parse(h.get(headers::TRACEPARENT).expect("traceparent").as_str()).unwrap();
        assert_eq!(
            tp.trace_id, root.trace_id,
            "{} is in the session's trace",
            msg.subject
        );
        assert!(
            h.get(headers::MSG_ID).is_some(),
            "{} has a Nats-Msg-Id",
            msg.subject
        );
        assert_eq!(
            h.get(headers::SESSION).map(|v| v.as_str()),
            Some(finished.session_id.as_str())
        );
        spans.insert(tp.span_id);
        seen += 1;
        if msg.subject.ends_with(".ev.done") {
            break;
        }
    }
    // start + 4 tasks + 4 results + events
    assert!(seen >= 9, "saw {seen} messages");
    assert!(spans.len() > seen / 2, "hops get their own span ids");
    t.stop().await;
}

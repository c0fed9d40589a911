//! Session control over a real nats-server: deadlines (cancel, which needs separate
//! processes to show that work in flight stops, is in `crates/cli/tests/faults.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::sync::Arc;
use std::time::Duration;

use flotilla_llm::{SimConfig, SimulatedProvider};
use flotilla_protocol::{
    ErrorCode, EventBody, OpenReply, OpenSession, SessionId, SessionOutcome, SessionRecord,
    SessionStatus, TaskState, subject::keys,
};
use flotilla_tests::{TestFleet, eventually, spec};

/// Every call takes exactly `ms`.
fn steady(ms: u64) -> Arc<dyn flotilla_llm::LlmClient> {
    Arc::new(SimulatedProvider::new(SimConfig {
        latency_ms: ms,
        jitter: 0.0,
        ..SimConfig::default()
    }))
}

/// A session whose deadline passes mid-run ends `deadline_exceeded`, keeping the
/// results of the tasks that finished (and only those); its slot is freed. A session
/// without a deadline on the same fleet completes, and a zero deadline is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_the_session_keeping_finished_tasks() {
    // Plan at 1.5 s, the first three tasks at about 3 s, the fourth not before 4.5 s,
    // the synthesis after that: a 4 s deadline falls between.
    let t = TestFleet::start(spec("unused"), steady(1500)).await;
    let sid = SessionId::generate();
    let mut req = OpenSession::new("deadline: compare three message brokers");
    req.session_id = Some(sid.clone());
    req.deadline_ms = Some(4000);
    let done = t.client.watch(&sid);
    let reply = t.client.open(&req, Duration::from_secs(30)).await.unwrap();
    assert!(matches!(reply, OpenReply::Accepted { .. }), "{reply:?}");
    let free = {
        let mut r = OpenSession::new("no deadline: compare three caches");
        r.session_id = Some(SessionId::generate());
        r
    };
    let free_done = t.client.watch(free.session_id.as_ref().unwrap());
    t.client.open(&free, Duration::from_secs(30)).await.unwrap();

    let event = tokio::time::timeout(Duration::from_secs(30), done)
        .await
        .unwrap()
        .unwrap();
    let EventBody::Done {
        outcome,
        answer,
        failure,
        duration_ms,
        ..
    } = &event.body
    else {
        panic!("{event:?}");
    };
    assert_eq!(*outcome, SessionOutcome::DeadlineExceeded);
    assert!(
        failure.as_deref().unwrap().contains("deadline"),
        "{failure:?}"
    );
    assert!(*duration_ms >= 4000, "{duration_ms}");
    let (rec, _) = t
        .bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&sid))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, SessionStatus::DeadlineExceeded);
    let finished: Vec<_> = rec
        .tasks
        .iter()
        .filter(|t| t.state == TaskState::Done)
        .map(|t| t.task_id.clone())
        .collect();
    let answer = answer.as_ref().expect("partial results are kept");
    assert_eq!(rec.answer.as_ref(), Some(answer), "in the record too");
    let kept: Vec<_> = answer.sections.iter().map(|s| s.task_id.clone()).collect();
    assert_eq!(kept, finished, "exactly the finished tasks, in plan order");
    assert!(
        (1..rec.tasks.len()).contains(&kept.len()),
        "some but not all tasks finished by the deadline: {kept:?} of {}",
        rec.tasks.len()
    );
    // The slot is given back.
    let released = eventually(Duration::from_secs(10), || async {
        let slot: Option<(serde_json::Value, u64)> =
            t.bus.slots().get(&keys::slot(rec.slot)).await.unwrap();
        slot.is_none_or(|(v, _)| v["session_id"] != sid.as_str())
            .then_some(())
    })
    .await;
    assert!(released.is_some(), "slot {} still held", rec.slot);

    let other = tokio::time::timeout(Duration::from_secs(60), free_done)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            &other.body,
            EventBody::Done {
                outcome: SessionOutcome::Completed,
                ..
            }
        ),
        "{other:?}"
    );

    let mut zero = OpenSession::new("zero deadline");
    zero.deadline_ms = Some(0);
    let reply = t.client.open(&zero, Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(
            reply,
            OpenReply::Rejected {
                code: ErrorCode::Invalid,
                ..
            }
        ),
        "{reply:?}"
    );
    t.stop().await;
}

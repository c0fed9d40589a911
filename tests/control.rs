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
    // Plan at 2 s, the first three tasks at about 4 s, the fourth not before 6 s, the
    // synthesis after that: a 5.5 s deadline falls between.
    let t = TestFleet::start(spec("unused"), steady(2000)).await;
    let sid = SessionId::generate();
    let mut req = OpenSession::new("deadline: compare three message brokers");
    req.session_id = Some(sid.clone());
    req.deadline_ms = Some(5500);
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
    assert!(*duration_ms >= 5500, "{duration_ms}");
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
    assert_eq!(rec.answer.as_deref(), Some(answer), "in the record too");
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

fn clarify_once() -> Arc<dyn flotilla_llm::LlmClient> {
    Arc::new(SimulatedProvider::new(SimConfig {
        latency_ms: 5,
        behaviour: flotilla_llm::Behaviour::ClarifyOnce,
        ..SimConfig::default()
    }))
}

async fn record(t: &TestFleet, sid: &SessionId) -> SessionRecord {
    t.bus
        .sessions()
        .get::<SessionRecord>(&keys::session(sid))
        .await
        .unwrap()
        .unwrap()
        .0
}

/// Every task asks a question; with `human_input` the questions go to a person: the
/// session waits (`awaiting_input`, `input_requested` events, slot held), typed errors
/// for answers nobody waits for, and each answer sends its task on with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_answers_the_questions_and_the_session_completes() {
    use flotilla_protocol::AnswerReply;
    let t = TestFleet::start(spec("unused"), clarify_once()).await;
    let sid = SessionId::generate();
    let mut req = OpenSession::new("human: pick a database for us");
    req.session_id = Some(sid.clone());
    req.human_input = true;
    let done = t.client.watch(&sid);
    t.client.open(&req, Duration::from_secs(30)).await.unwrap();

    // All four tasks ask (a waiting task holds no place in flight): the session waits.
    let waiting = eventually(Duration::from_secs(30), || async {
        let rec = record(&t, &sid).await;
        (rec.status == SessionStatus::AwaitingInput).then_some(rec)
    })
    .await
    .expect("the session waits for a person");
    assert!(
        waiting
            .tasks
            .iter()
            .all(|t| t.state == TaskState::AwaitingInput)
    );
    assert!(waiting.tasks.iter().all(|t| {
        t.question
            .as_deref()
            .is_some_and(|q| q.contains("What exactly"))
    }));
    // Several wait: an answer must name its task.
    let reply = t
        .client
        .answer(&sid, None, "x", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(&reply, AnswerReply::Rejected { code: ErrorCode::NotAwaitingInput, message, .. } if message.contains("t1")),
        "{reply:?}"
    );
    for task in &waiting.tasks {
        let text = format!("use PostgreSQL for {}", task.task_id);
        let reply = t
            .client
            .answer(
                &sid,
                Some(task.task_id.clone()),
                &text,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert!(matches!(reply, AnswerReply::Accepted { .. }), "{reply:?}");
    }
    // Answered already: a typed refusal, nothing changes.
    let again = t
        .client
        .answer(
            &sid,
            Some(waiting.tasks[0].task_id.clone()),
            "no, MySQL",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            again,
            AnswerReply::Rejected {
                code: ErrorCode::NotAwaitingInput,
                ..
            }
        ),
        "{again:?}"
    );
    let event = tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .unwrap()
        .unwrap();
    let EventBody::Done {
        outcome, answer, ..
    } = &event.body
    else {
        panic!("{event:?}")
    };
    assert_eq!(*outcome, SessionOutcome::Completed, "{event:?}");
    for s in &answer.as_ref().unwrap().sections {
        assert!(
            s.output
                .summary
                .contains(&format!("(told: use PostgreSQL for {})", s.task_id)),
            "the task went on with the person's answer: {}",
            s.output.summary
        );
    }
    let evs = flotilla_tests::events(&t, &sid).await;
    let asked = evs
        .iter()
        .filter(|e| matches!(e.body, EventBody::InputRequested { .. }))
        .count();
    let answered = evs
        .iter()
        .filter(|e| matches!(&e.body, EventBody::Clarification { by: Some(b), closed: false, .. } if b == "human"))
        .count();
    assert_eq!((asked, answered), (4, 4));
    // An ended session waits for nothing.
    let late = t
        .client
        .answer(&sid, None, "late", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(
            late,
            AnswerReply::Rejected {
                code: ErrorCode::NotAwaitingInput,
                ..
            }
        ),
        "{late:?}"
    );
    t.stop().await;
}

/// Nobody answers: at the wait's end each task is told to commit to its best
/// interpretation, the event log says so, and the session completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_question_times_out_and_the_task_commits() {
    let mut s = spec("unused");
    s.control.session.input_wait = Duration::from_millis(1500);
    s.control.session.human_roles = vec![flotilla_protocol::Role::parse("research").unwrap()];
    let t = TestFleet::start(s, clarify_once()).await;
    let (finished, _) = t
        .client
        .run(
            "nobody answers: compare two queues",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(finished.completed(), "{:?}", finished.event.body);
    let evs = flotilla_tests::events(&t, &finished.session_id).await;
    let timed_out: Vec<_> = evs
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Clarification {
                role,
                by: Some(b),
                closed,
                answer,
                ..
            } if b == "deadline" => Some((role.to_string(), *closed, answer.clone())),
            _ => None,
        })
        .collect();
    // Only research's question went to a person; the others were answered by the
    // orchestrator's model as before.
    assert_eq!(timed_out.len(), 1, "{evs:?}");
    assert_eq!(timed_out[0].0, "research");
    assert!(timed_out[0].1, "the answer closes the questions");
    assert!(
        timed_out[0]
            .2
            .contains("Commit to your best interpretation")
    );
    assert!(evs.iter().any(
        |e| matches!(&e.body, EventBody::InputRequested { role, .. } if role.as_str() == "research")
    ));
    let EventBody::Done {
        answer: Some(answer),
        ..
    } = &finished.event.body
    else {
        panic!()
    };
    let research = answer
        .sections
        .iter()
        .find(|s| s.role.as_str() == "research")
        .unwrap();
    assert!(
        research.output.summary.contains("(told: Nobody answered"),
        "{}",
        research.output.summary
    );
    t.stop().await;
}

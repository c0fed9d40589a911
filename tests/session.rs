//! A session end to end over a real nats-server.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_protocol::{EventBody, SessionOutcome, SessionRecord, SessionStatus, subject::keys};
use flotilla_tests::{TestFleet, eventually, sim, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_completes_with_every_role() {
    let t = TestFleet::start(spec("unused"), sim(20)).await;
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
    .expect("outbox drained");
    assert_eq!(record.status, SessionStatus::Completed);
    assert_eq!(record.answer.as_ref(), Some(answer));
    assert_eq!(record.counters.accepted, 4);
    t.stop().await;
}

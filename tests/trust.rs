//! The trust boundary: results that are not what a task's holder committed are
//! refused as forged, and headers that disagree with the message are refused, whoever
//! publishes them. The forger is a Python program with nats-py and the protocol docs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_llm::{LlmClient, schema};
use flotilla_protocol::{
    SessionId, SessionRecord, SessionStatus, TraceParent, headers, subject::keys,
};
use flotilla_tests::{Action, Scripted, TestFleet, spec};
use futures::StreamExt;

const NO_ARTIFACTS: &str = r#"{"summary":"I looked into it","artifacts":[]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_results_are_dead_lettered_and_the_session_completes_with_real_work() {
    // research fails its first attempt (no artifacts) and takes 4 s over its second;
    // writing and review take 4 s: time for the forger to strike while they run.
    let llm = Scripted::new(10, |c| match (c.schema.as_deref(), c.field("role")) {
        (Some(schema::TASK_OUTPUT), "research") if c.input["attempt"].as_u64() == Some(1) => {
            Action::Replace(NO_ARTIFACTS.into())
        }
        (Some(schema::TASK_OUTPUT), role @ ("research" | "writing" | "review")) => {
            Action::Late(Duration::from_secs(4), format!(" [real {role}]"))
        }
        _ => Action::Pass,
    });
    let t = TestFleet::start(spec("unused"), llm.clone() as Arc<dyn LlmClient>).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/forge.py");
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(flotilla_tests::python())
            .arg(&script)
            .arg(t.server.url())
            .output(),
    )
    .await
    .expect("python finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "forger failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    let sid = SessionId::parse(report["session_id"].as_str().unwrap()).unwrap();
    let task = |role: &str| report["tasks"][role].as_str().unwrap().to_owned();

    // The session completed, each task accepted once, from its real holder: research
    // at attempt 2, the others at attempt 1 (three forged failures did not fail review).
    assert_eq!(report["outcome"], "completed", "{report}");
    let mut want = vec![
        (task("research"), 2),
        (task("analysis"), 1),
        (task("writing"), 1),
        (task("review"), 1),
    ];
    want.sort();
    let accepted: Vec<(String, u64)> = report["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_u64().unwrap()))
        .collect();
    assert_eq!(accepted, want);
    let (rec, _) = t
        .bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&sid))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, SessionStatus::Completed);
    let answer = serde_json::to_string(&rec.answer).unwrap();
    for role in ["research", "writing", "review"] {
        assert!(
            answer.contains(&format!("[real {role}]")),
            "the answer uses the real {role} output: {answer}"
        );
    }
    // The session's trace continues the one the client sent.
    let trace = TraceParent::parse(&rec.traceparent).unwrap();
    assert_eq!(trace.trace_id_hex(), report["trace_id"].as_str().unwrap());

    // Every forgery is in the dead-letter stream with its reason.
    let inbox = t
        .bus
        .names()
        .inbox(&sid, &flotilla_protocol::Role::orchestrator());
    let letters = dead_letters_from(&t, &inbox).await;
    let reasons: Vec<&str> = letters.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "forged").count(),
        5,
        "{letters:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "wrong_session").count(),
        1,
        "{letters:?}"
    );
    assert_eq!(letters.len(), 6, "{letters:?}");
    assert!(
        letters
            .iter()
            .any(|(r, d)| r == "forged" && d.contains("stale attempt 1")),
        "{letters:?}"
    );
    assert!(letters.iter().all(|(_, d)| !d.is_empty()), "{letters:?}");
    let fleet = t.fleet.as_ref().unwrap();
    assert_eq!(fleet.counters.snapshot().forged, 5);

    // Admission refused a session header naming another session, and replaced a
    // garbage traceparent with a trace of its own.
    assert_eq!(report["mismatch_code"], "wrong_session");
    let other = SessionId::parse(report["garbage_trace_session"].as_str().unwrap()).unwrap();
    let (rec, _) = t
        .bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&other))
        .await
        .unwrap()
        .unwrap();
    assert!(
        TraceParent::parse(&rec.traceparent).is_ok(),
        "{}",
        rec.traceparent
    );
    t.stop().await;
}

/// (reason, detail) of every dead letter that came from `subject`.
async fn dead_letters_from(t: &TestFleet, subject: &str) -> Vec<(String, String)> {
    let stream = t
        .bus
        .raw_js()
        .get_stream(t.bus.names().stream_dlq())
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        let h = m.headers.clone().unwrap_or_default();
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
        if get(headers::ORIGIN_SUBJECT) == subject {
            assert!(
                h.get(headers::TRACEPARENT).is_none(),
                "a garbage traceparent is not passed on"
            );
            out.push((get(headers::REASON), get(headers::DETAIL)));
        }
    }
    out
}

/// A task signed by a registered key runs without its session being read: here its
/// session does not even exist, and a worker still claims and commits it. The same
/// bytes with one field changed, or signed by a key nobody registered, get the check
/// against the session record, which refuses them (`unknown_session`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_signature_vouches_for_a_task_and_anything_else_meets_the_session_check() {
    use flotilla_bus::{Outgoing, Signer};
    use flotilla_protocol::{MessageId, Role, TaskId, TaskRecord};
    let llm = Scripted::new(10, |_| Action::Pass);
    let t = TestFleet::start(spec("unused"), llm as Arc<dyn LlmClient>).await;
    let names = t.bus.names().clone();
    let research = Role::parse("research").unwrap();
    let registered = Signer::generate();
    registered
        .register(t.bus.sessions(), "test-serve")
        .await
        .unwrap();
    let stranger = Signer::generate();
    let task = |sid: &SessionId, allowance: u64| {
        let body = format!(
            r#"{{"kind":"task","v":1,"session_id":"{sid}","task_id":"t1","role":"research","attempt":1,"instruction":"look into it","context":"a signed task","allowance":{allowance}}}"#
        );
        Outgoing {
            subject: names.inbox(sid, &research),
            msg_id: MessageId::task(sid, &TaskId::parse("t1").unwrap(), 1),
            session: Some(sid.clone()),
            attempt: Some(1),
            trace: None,
            payload: body.into_bytes().into(),
        }
    };
    let task_record = |sid: SessionId| {
        let bus = t.bus.clone();
        let research = research.clone();
        async move {
            bus.sessions()
                .get::<TaskRecord>(&keys::task(&sid, &research, &TaskId::parse("t1").unwrap()))
                .await
                .unwrap()
                .map(|(r, _)| r)
        }
    };

    // Vouched for: no session record, and still claimed and committed.
    let vouched = SessionId::parse("signed-no-record").unwrap();
    let sign = |signer: &Signer, out: &Outgoing| {
        signer
            .sign_batch([(out.subject.as_str(), &out.payload[..])])
            .unwrap()
    };
    let out = task(&vouched, 5_000);
    t.bus
        .publish_signed(&out, &sign(&registered, &out))
        .await
        .unwrap();
    let rec = flotilla_tests::eventually(Duration::from_secs(30), || async {
        task_record(vouched.clone())
            .await
            .filter(|r| r.outcome.is_some())
    })
    .await
    .expect("a worker ran the signed task");
    assert!(
        rec.holder
            .as_ref()
            .is_some_and(|h| h.as_str().starts_with("research-")),
        "{rec:?}"
    );

    // Tampered with after signing (a larger allowance, the old signature), and a good
    // signature by an unregistered key: both are checked against the session record.
    let mut dlq = t.bus.raw_js().get_stream(names.stream_dlq()).await.unwrap();
    let tampered = SessionId::parse("signed-then-tampered").unwrap();
    let mut out = task(&tampered, 5_000);
    let signed = sign(&registered, &out);
    out.payload = String::from_utf8(out.payload.to_vec())
        .unwrap()
        .replace("5000", "9999999")
        .into_bytes()
        .into();
    let mut h = out.headers();
    signed.add_headers(&mut h);
    let unregistered = SessionId::parse("signed-by-a-stranger").unwrap();
    for (sid, send) in [(tampered.clone(), Some(h)), (unregistered.clone(), None)] {
        let before = dlq.info().await.unwrap().state.last_sequence;
        match send {
            Some(h) => {
                t.bus
                    .raw_js()
                    .publish_with_headers(out.subject.clone(), h, out.payload.clone())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
            None => {
                let out = task(&sid, 5_000);
                t.bus
                    .publish_signed(&out, &sign(&stranger, &out))
                    .await
                    .unwrap();
            }
        }
        let entry = flotilla_tests::dead_letter_after(&t.bus, before)
            .await
            .unwrap_or_else(|| panic!("{sid}: no dead letter"));
        assert_eq!(
            entry.headers.get(headers::REASON).map(|v| v.as_str()),
            Some("unknown_session"),
            "{sid}"
        );
        assert!(
            task_record(sid.clone()).await.is_none(),
            "{sid}: nobody committed it"
        );
        assert!(
            t.bus
                .sessions()
                .get::<TaskRecord>(&keys::claim(&sid, &research, &TaskId::parse("t1").unwrap()))
                .await
                .unwrap()
                .is_none(),
            "{sid}: nobody claimed it"
        );
    }
    t.stop().await;
}

/// A batch's signature vouches for each message it names, and is checked once for the
/// whole batch by a verifier and every verifier sharing it. A message the batch does not
/// name, a signature changed by one digit, an unregistered signer and a message without
/// the batch header are not vouched for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_signature_vouches_for_each_task_it_names_with_one_check() {
    use flotilla_bus::{Bus, BusConfig, Counters, SignatureError, Signed, Signer, Verifier};
    let server = flotilla_testkit::NatsServer::start().unwrap();
    let config = BusConfig {
        url: server.url(),
        ..BusConfig::default()
    };
    let connect = |name: &'static str| {
        let config = config.clone();
        async move {
            Bus::connect(&config, name, Arc::new(Counters::default()))
                .await
                .unwrap()
        }
    };
    let bus = connect("signatures").await;
    let registered = Signer::generate();
    registered
        .register(bus.sessions(), "test-serve")
        .await
        .unwrap();
    let msgs: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("flotilla.s.s{i}.in.research"),
                format!(r#"{{"kind":"task","task_id":"t{i}"}}"#).into_bytes(),
            )
        })
        .collect();
    let as_refs = || msgs.iter().map(|(s, p)| (s.as_str(), p.as_slice()));
    let signed = registered.sign_batch(as_refs()).unwrap();
    fn headers<'a>(signer: &'a str, batch: &'a str, signature: &'a str) -> Signed<'a> {
        Signed {
            signer: Some(signer),
            batch: Some(batch),
            signature: Some(signature),
        }
    }
    let good = headers(registered.public_key(), signed.batch(), signed.signature());
    let verifier = Verifier::new(bus.sessions().clone());
    let other_bus = connect("signatures-2").await;
    let sharing = verifier.sharing(other_bus.sessions().clone());
    for (i, (subject, payload)) in as_refs().enumerate() {
        let v = if i % 2 == 0 { &verifier } else { &sharing };
        v.verify(subject, payload, good).await.unwrap();
    }
    assert_eq!(verifier.checks(), 1, "one Ed25519 check for the batch");
    assert_eq!(sharing.checks(), 1);

    // Not named by the batch: the payload differs from every signed one.
    let (subject, _) = &msgs[0];
    let err = verifier.verify(subject, b"{}", good).await.unwrap_err();
    assert!(matches!(err, SignatureError::Mismatch), "{err}");
    // A signature one digit off: checked (not found vouched for), and refused.
    let mut bad = signed.signature().to_owned();
    let last = if bad.ends_with('0') { "1" } else { "0" };
    bad.replace_range(bad.len() - 1.., last);
    let (subject, payload) = &msgs[1];
    let err = verifier
        .verify(
            subject,
            payload,
            headers(registered.public_key(), signed.batch(), &bad),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SignatureError::Mismatch), "{err}");
    assert_eq!(verifier.checks(), 2);
    // The batch names the message, but was signed by a key nobody registered.
    let stranger = Signer::generate();
    let by_stranger = stranger.sign_batch(as_refs()).unwrap();
    let unregistered = headers(
        stranger.public_key(),
        by_stranger.batch(),
        by_stranger.signature(),
    );
    let err = verifier
        .verify(subject, payload, unregistered)
        .await
        .unwrap_err();
    assert!(matches!(err, SignatureError::UnknownSigner(_)), "{err}");
    // A signature without its batch (the scheme of an older `serve`).
    let err = verifier
        .verify(
            subject,
            payload,
            Signed {
                batch: None,
                ..good
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SignatureError::Unsigned), "{err}");
}

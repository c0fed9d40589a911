//! A Python client (nats-py, no Flotilla code) opens sessions through the documented
//! wire protocol and reads their `done` events.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::path::Path;
use std::time::Duration;

use flotilla_protocol::{SessionId, SessionRecord, SessionStatus, subject::keys};
use flotilla_tests::{TestFleet, sim, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_opens_a_session_and_reads_done() {
    let t = TestFleet::start(spec("unused"), sim(20)).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/interop.py");
    let py = flotilla_tests::python();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(&py)
            .arg(&script)
            .arg(t.server.url())
            .output(),
    )
    .await
    .expect("python finished in time")
    .unwrap_or_else(|e| {
        panic!(
            "could not run {}: {e}; run `bash scripts/setup.sh`",
            py.display()
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed ({}); if nats-py is missing run `bash scripts/setup.sh`\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap_or("")).expect("one JSON line");
    let roles = serde_json::json!(["analysis", "research", "review", "writing"]);
    assert_eq!(report["roles"], roles);
    assert_eq!(report["queued_roles"], roles);
    assert_eq!(report["malformed_code"], "malformed");
    // Every task of the session checked from Python: digest in its batch, signer
    // registered, Ed25519 signature over the batch.
    assert!(
        report["signed_tasks"].as_u64().unwrap_or(0) >= 4,
        "{report}"
    );
    assert_eq!(report["service"], "flotilla-admission");
    assert!(report["artifacts"].as_u64().unwrap() >= 4);
    // The Rust side agrees.
    for key in ["session_id", "queued_session_id"] {
        let sid = SessionId::parse(report[key].as_str().unwrap()).unwrap();
        let (rec, _) = t
            .bus
            .sessions()
            .get::<SessionRecord>(&keys::session(&sid))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.status, SessionStatus::Completed);
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_agent_shares_memory_with_revision_checks() {
    use flotilla_bus::{MemKey, MemoryError};
    let t = TestFleet::start(spec("unused"), sim(20)).await;
    let sid = SessionId::generate();
    let mem = t.bus.memory().session(&sid);
    let notes = MemKey::parse("notes").unwrap();
    let rev = mem.create(&notes, &vec!["rust".to_owned()]).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/memory.py");
    let out = tokio::process::Command::new(flotilla_tests::python())
        .arg(&script)
        .arg(t.server.url())
        .arg(sid.as_str())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(report["read"], serde_json::json!(["rust"]));
    assert_eq!(report["read_revision"], rev);
    assert_eq!(
        report["stale_conflict"], true,
        "a stale revision from Python conflicts"
    );
    // Rust sees Python's update, at Python's revision, and its own stale write conflicts.
    let now = mem.get::<Vec<String>>(&notes).await.unwrap().unwrap();
    assert_eq!(now.value, vec!["rust", "python"]);
    assert_eq!(serde_json::json!(now.revision), report["new_revision"]);
    assert!(matches!(
        mem.compare_and_set(&notes, rev, &vec!["stale".to_owned()])
            .await,
        Err(MemoryError::Conflict(_))
    ));
    t.stop().await;
}

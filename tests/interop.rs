//! A Python client (nats-py, no Flotilla code) opens sessions through the documented
//! wire protocol and reads their `done` events.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_protocol::{SessionId, SessionRecord, SessionStatus, subject::keys};
use flotilla_tests::{TestFleet, sim, spec};

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_opens_a_session_and_reads_done() {
    let t = TestFleet::start(spec("unused"), sim(20)).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/interop.py");
    let py = python();
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

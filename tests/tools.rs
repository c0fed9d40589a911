//! The tool gateway against a real server: tools served as NATS micro services (from
//! Rust and from Python), cached deterministic results, idempotent side effects,
//! timeouts and retries, the circuit breaker, the rate limit, and discovery.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_agent::{ToolError, ToolGateway, ToolSpec, serve_tool};
use flotilla_bus::{Bus, BusConfig, Counters};
use flotilla_protocol::{SessionId, TaskId, ToolCall, ToolReply, headers};
use flotilla_testkit::NatsServer;
use flotilla_tests::eventually;
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

async fn bus(server: &NatsServer) -> Bus {
    let config = BusConfig {
        url: server.url(),
        ..BusConfig::default()
    };
    Bus::connect(&config, "tools-test", Arc::new(Counters::default()))
        .await
        .unwrap()
}

fn gateway(bus: &Bus, tools: &[(&str, ToolSpec)]) -> ToolGateway {
    let specs: BTreeMap<String, ToolSpec> = tools
        .iter()
        .map(|(n, s)| ((*n).to_owned(), s.clone()))
        .collect();
    ToolGateway::new(bus.clone(), specs).unwrap()
}

/// A Rust tool that records every call it receives; `reply` sees the call and how many
/// came before it.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<ToolCall>>>,
}

impl Recorder {
    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn calls(&self) -> Vec<ToolCall> {
        self.calls.lock().unwrap().clone()
    }
}

async fn serve<F, Fut>(bus: &Bus, name: &str, stop: &CancellationToken, reply: F) -> Recorder
where
    F: Fn(ToolCall, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ToolReply> + Send + 'static,
{
    let rec = Recorder::default();
    let calls = rec.calls.clone();
    serve_tool(
        bus,
        name,
        "a test tool",
        move |call: ToolCall| {
            let n = {
                let mut c = calls.lock().unwrap();
                c.push(call.clone());
                c.len() - 1
            };
            reply(call, n)
        },
        stop.clone(),
    )
    .await
    .unwrap();
    rec
}

fn ids() -> (SessionId, TaskId) {
    (SessionId::generate(), TaskId::nth(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_results_come_from_the_cache() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let stop = CancellationToken::new();
    let tool = serve(&bus, "add", &stop, |call, n| async move {
        let a = call.arguments["a"].as_i64().unwrap();
        let b = call.arguments["b"].as_i64().unwrap();
        // `invocation` tells a fresh result from a cached one.
        ToolReply::ok(json!({"sum": a + b, "invocation": n}))
    })
    .await;
    let spec = ToolSpec {
        deterministic: true,
        ..ToolSpec::default()
    };
    let gw = gateway(&bus, &[("add", spec)]);
    let (s, t) = ids();
    let first = gw
        .call(&s, &t, "add", &json!({"a": 1, "b": 2}))
        .await
        .unwrap();
    assert_eq!(first, json!({"sum": 3, "invocation": 0}));
    // Same arguments (in another key order, from another session): from the cache.
    let (s2, t2) = ids();
    let again = gw
        .call(&s2, &t2, "add", &json!({"b": 2, "a": 1}))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(tool.count(), 1, "a cache hit does not call the tool");
    assert_eq!(gw.stats().cache_hits.get(), 1);
    // Another process's gateway shares the cache.
    let other = gateway(
        &bus,
        &[(
            "add",
            ToolSpec {
                deterministic: true,
                ..ToolSpec::default()
            },
        )],
    );
    assert_eq!(
        other
            .call(&s, &t, "add", &json!({"a": 1, "b": 2}))
            .await
            .unwrap(),
        first
    );
    assert_eq!(tool.count(), 1);
    // Different arguments: called again.
    let other_args = gw
        .call(&s, &t, "add", &json!({"a": 2, "b": 2}))
        .await
        .unwrap();
    assert_eq!(other_args, json!({"sum": 4, "invocation": 1}));
    assert_eq!(tool.count(), 2);
    // Deterministic calls carry no idempotency key; the cache holds a `t.` key.
    assert!(tool.calls().iter().all(|c| c.idempotency_key.is_none()));
    let kv = bus
        .raw_js()
        .get_key_value(bus.names().bucket_cache())
        .await
        .unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.starts_with("t.")), "{keys:?}");
    // A tool without `deterministic` is called every time.
    let plain = serve(
        &bus,
        "now",
        &stop,
        |_, n| async move { ToolReply::ok(json!(n)) },
    )
    .await;
    let gw = gateway(&bus, &[("now", ToolSpec::default())]);
    for want in 0..3 {
        assert_eq!(
            gw.call(&s, &t, "now", &json!({})).await.unwrap(),
            json!(want)
        );
    }
    assert_eq!(plain.count(), 3);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_effects_happen_once_per_call() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let stop = CancellationToken::new();
    // A raw subscriber sees each request with its headers (the micro endpoint answers).
    let mut raw = bus
        .raw_client()
        .subscribe("flotilla.tool.send-mail")
        .await
        .unwrap();
    let mail = serve(&bus, "send-mail", &stop, |call, n| async move {
        ToolReply::ok(json!({"message_id": format!("m{n}"), "to": call.arguments["to"]}))
    })
    .await;
    let spec = ToolSpec {
        side_effects: true,
        ..ToolSpec::default()
    };
    let gw = gateway(&bus, &[("send-mail", spec.clone())]);
    let (s, t) = ids();
    let args = json!({"to": "ops@example.com", "body": "hello"});
    let first = gw.call(&s, &t, "send-mail", &args).await.unwrap();
    assert_eq!(first, json!({"message_id": "m0", "to": "ops@example.com"}));
    // The same call again (a retry or a redelivered task, even in another process).
    let again = gw.call(&s, &t, "send-mail", &args).await.unwrap();
    let elsewhere = gateway(&bus, &[("send-mail", spec)]);
    let third = elsewhere.call(&s, &t, "send-mail", &args).await.unwrap();
    assert_eq!((&again, &third), (&first, &first));
    assert_eq!(mail.count(), 1, "the effect happened once");
    assert_eq!(gw.stats().replayed.get(), 1);
    // The tool got the idempotency key, in the body and in the header.
    let got = mail.calls();
    let key = got[0].idempotency_key.clone().expect("an idempotency key");
    assert_eq!(key.len(), 32);
    let m = tokio::time::timeout(Duration::from_secs(10), raw.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.headers
            .as_ref()
            .and_then(|h| h.get(headers::IDEMPOTENCY_KEY))
            .map(|v| v.as_str().to_owned()),
        Some(key.clone())
    );
    // Another task making the same call is another effect, with another key.
    let other = gw
        .call(&s, &TaskId::nth(2), "send-mail", &args)
        .await
        .unwrap();
    assert_eq!(other["message_id"], "m1");
    let got = mail.calls();
    assert_eq!(got.len(), 2);
    assert_ne!(got[1].idempotency_key.as_deref(), Some(key.as_str()));
    assert!(got[1].idempotency_key.is_some());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_then_reported() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let stop = CancellationToken::new();
    let slow = serve(&bus, "slow", &stop, |_, _| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ToolReply::ok(json!("late"))
    })
    .await;
    let spec = ToolSpec {
        timeout: Duration::from_millis(400),
        retries: 2,
        breaker_failures: 0,
        ..ToolSpec::default()
    };
    let gw = gateway(&bus, &[("slow", spec)]);
    let (s, t) = ids();
    let err = gw.call(&s, &t, "slow", &json!({})).await.unwrap_err();
    assert_eq!(
        err,
        ToolError::Timeout {
            tool: "slow".into(),
            attempts: 3
        }
    );
    assert!(err.is_transient());
    // Every attempt reached the tool, and no more.
    assert!(
        eventually(Duration::from_secs(10), || async {
            (slow.count() == 3).then_some(())
        })
        .await
        .is_some(),
        "the tool saw {} attempts",
        slow.count()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slow.count(), 3);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_and_others_are_not() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let stop = CancellationToken::new();
    let flaky = serve(&bus, "flaky", &stop, |_, n| async move {
        if n == 0 {
            ToolReply::error("warming up", true)
        } else {
            ToolReply::ok(json!({"attempt": n + 1}))
        }
    })
    .await;
    let picky = serve(&bus, "picky", &stop, |_, _| async move {
        ToolReply::error("argument `q` is required", false)
    })
    .await;
    let spec = ToolSpec {
        timeout: Duration::from_secs(10),
        ..ToolSpec::default()
    };
    let gw = gateway(
        &bus,
        &[
            ("flaky", spec.clone()),
            ("picky", spec.clone()),
            ("absent", ToolSpec { retries: 1, ..spec }),
        ],
    );
    let (s, t) = ids();
    assert_eq!(
        gw.call(&s, &t, "flaky", &json!({})).await.unwrap(),
        json!({"attempt": 2})
    );
    assert_eq!(flaky.count(), 2);
    // A non-retryable error is final after one attempt.
    assert_eq!(
        gw.call(&s, &t, "picky", &json!({})).await.unwrap_err(),
        ToolError::Failed {
            tool: "picky".into(),
            message: "argument `q` is required".into()
        }
    );
    assert_eq!(picky.count(), 1);
    // Nobody serves `absent`; nothing is configured as `nope`.
    assert!(matches!(
        gw.call(&s, &t, "absent", &json!({})).await,
        Err(ToolError::Unavailable { .. })
    ));
    assert_eq!(
        gw.call(&s, &t, "nope", &json!({})).await.unwrap_err(),
        ToolError::Unknown {
            tool: "nope".into()
        }
    );
    assert!(gw.knows("flaky") && !gw.knows("nope"));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_fails_fast_after_repeated_failures() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let stop = CancellationToken::new();
    let broken = serve(&bus, "broken", &stop, |_, _| async move {
        ToolReply::error("backend down", true)
    })
    .await;
    let spec = ToolSpec {
        retries: 0,
        breaker_failures: 3,
        breaker_cooldown: Duration::from_secs(120),
        ..ToolSpec::default()
    };
    let gw = gateway(&bus, &[("broken", spec)]);
    let (s, t) = ids();
    for _ in 0..3 {
        let err = gw.call(&s, &t, "broken", &json!({})).await.unwrap_err();
        assert!(
            matches!(err, ToolError::Unavailable { ref detail, .. } if detail == "backend down"),
            "{err:?}"
        );
    }
    assert_eq!(broken.count(), 3);
    for _ in 0..5 {
        let err = gw.call(&s, &t, "broken", &json!({})).await.unwrap_err();
        match err {
            ToolError::CircuitOpen { retry_in, .. } => {
                assert!(retry_in > Duration::from_secs(60), "{retry_in:?}")
            }
            other => panic!("expected CircuitOpen, got {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broken.count(), 3, "an open breaker does not call the tool");
    assert_eq!(gw.stats().circuit_open.get(), 5);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_paced_by_the_rate_limit() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let stop = CancellationToken::new();
    let tool = serve(&bus, "paced", &stop, |_, n| async move {
        ToolReply::ok(json!(n))
    })
    .await;
    let spec = ToolSpec {
        rate_per_s: 5.0,
        ..ToolSpec::default()
    };
    let gw = gateway(&bus, &[("paced", spec)]);
    let (s, t) = ids();
    let started = std::time::Instant::now();
    let calls = (0..10).map(|i| {
        let (gw, s, t) = (gw.clone(), s.clone(), t.clone());
        async move { gw.call(&s, &t, "paced", &json!({"i": i})).await }
    });
    let results = futures::future::join_all(calls).await;
    let took = started.elapsed();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(tool.count(), 10);
    // 10 calls at 5/s, evenly spaced: the last starts 1.8 s after the first.
    assert!(took >= Duration::from_millis(1600), "took {took:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_discoverable_micro_services() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let stop = CancellationToken::new();
    serve(&bus, "lookup", &stop, |_, _| async move {
        ToolReply::ok(json!(null))
    })
    .await;
    let ping = bus
        .raw_client()
        .request("$SRV.PING.flotilla-tool-lookup", "".into())
        .await
        .unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "flotilla-tool-lookup");
    let info = bus
        .raw_client()
        .request("$SRV.INFO.flotilla-tool-lookup", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["description"], "a test tool");
    assert_eq!(info["endpoints"][0]["subject"], "flotilla.tool.lookup");
    // A malformed call gets a non-retryable tool error with the micro error headers.
    let reply = bus
        .raw_client()
        .request("flotilla.tool.lookup", "{\"v\":1}".into())
        .await
        .unwrap();
    let parsed: ToolReply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        matches!(
            parsed,
            ToolReply::Error {
                retryable: false,
                ..
            }
        ),
        "{parsed:?}"
    );
    assert_eq!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.as_str().to_owned()),
        Some("400".to_owned())
    );
    // After shutdown the tool is gone.
    stop.cancel();
    assert!(
        eventually(Duration::from_secs(10), || async {
            bus.raw_client()
                .request("$SRV.PING.flotilla-tool-lookup", "".into())
                .await
                .is_err()
                .then_some(())
        })
        .await
        .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_tool_serves_the_rust_gateway() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/tool.py");
    let py = flotilla_tests::python();
    let mut child = tokio::process::Command::new(&py)
        .arg(&script)
        .arg(server.url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "could not run {}: {e}; run `bash scripts/setup.sh`",
                py.display()
            )
        });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let ready = tokio::time::timeout(Duration::from_secs(120), stdout.read_line(&mut line)).await;
    if !matches!(ready, Ok(Ok(n)) if n > 0 && line.trim() == "ready") {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err).await;
        panic!(
            "python tool did not start ({ready:?}, {line:?}); if nats-py is missing run `bash scripts/setup.sh`\nstderr: {err}"
        );
    }
    let spec = ToolSpec {
        timeout: Duration::from_secs(10),
        ..ToolSpec::default()
    };
    let gw = gateway(&bus, &[("py-upper", spec)]);
    let (s, t) = ids();
    assert_eq!(
        gw.call(&s, &t, "py-upper", &json!({"text": "hello flotilla"}))
            .await
            .unwrap(),
        json!({"text": "HELLO FLOTILLA"})
    );
    assert!(matches!(
        gw.call(&s, &t, "py-upper", &json!({"text": 5})).await,
        Err(ToolError::Failed { ref message, .. }) if message.contains("string")
    ));
    // Discoverable like any micro service.
    let info = bus
        .raw_client()
        .request("$SRV.INFO.flotilla-tool-py-upper", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    assert_eq!(subjects, ["flotilla.tool.py-upper"]);
    // Closing stdin stops it; it reports what it saw.
    drop(child.stdin.take());
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_string(&mut rest))
        .await
        .expect("python exits in time")
        .unwrap();
    let status = child.wait().await.unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err).await;
    assert!(
        status.success(),
        "python tool failed ({status})\nstderr: {err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(rest.trim().lines().last().unwrap_or("")).expect("one JSON line");
    assert_eq!(report["calls"], 2);
    assert_eq!(report["tools"], json!(["py-upper"]));
    assert_eq!(report["sessions"], json!([s.as_str()]));
}

/// End to end: a role configured with a tool; the model asks for it, the agent calls it
/// through the gateway, and the model's final answer quotes the tool's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_calls_its_roles_tool_when_the_model_asks() {
    use flotilla_agent::RoleSpec;
    use flotilla_llm::{Behaviour, SimConfig, SimulatedProvider};
    use flotilla_protocol::{EventBody, Role};
    use flotilla_tests::{TestFleet, spec};

    let mut s = spec("");
    s.tools = BTreeMap::from([(
        "lookup".to_owned(),
        ToolSpec {
            deterministic: true,
            ..ToolSpec::default()
        },
    )]);
    for role in s.control.session.roles.clone() {
        s.roles.insert(
            role,
            RoleSpec {
                tools: vec!["lookup".into()],
                ..RoleSpec::default()
            },
        );
    }
    let llm = Arc::new(SimulatedProvider::new(SimConfig {
        latency_ms: 5,
        behaviour: Behaviour::UseTool,
        ..SimConfig::default()
    }));
    let fleet = TestFleet::start(s, llm).await;
    let stop = CancellationToken::new();
    let tool = serve(&fleet.bus, "lookup", &stop, |call: ToolCall, _| async move {
        ToolReply::ok(json!({"found": format!("the answer for {}", call.arguments["query"].as_str().unwrap_or("?"))}))
    })
    .await;
    let (finished, _) = fleet
        .client
        .run("use a tool", Duration::from_secs(60))
        .await
        .unwrap();
    let EventBody::Done {
        answer: Some(answer),
        ..
    } = &finished.event.body
    else {
        panic!("{:?}", finished.event.body)
    };
    for section in &answer.sections {
        assert!(
            section
                .output
                .summary
                .contains(&format!("the answer for {}", section.task_id)),
            "{}",
            section.output.summary
        );
    }
    let calls = tool.calls();
    assert_eq!(calls.len(), answer.sections.len(), "one call per task");
    assert!(calls.iter().all(|c| c.session_id == finished.session_id));
    let _ = Role::orchestrator();
    stop.cancel();
    fleet.stop().await;
}

//! The fleet rate limiter against a fake OpenAI-compatible server that answers 429
//! above its RPM and TPM: under a load that would exceed both, callers get no 429 and
//! still use most of the quota; a request too large for the window is refused with a
//! typed error, and a caller with no permit in time gets a typed timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::{LimitError, LimitedLlm, LimiterClient, LimitsConfig, ModelLimits};
use flotilla_bus::{Bus, BusConfig, Counters};
use flotilla_control::limiter::Limiter;
use flotilla_llm::{ChatMessage, CompletionRequest, LlmClient, OpenAiClient, OpenAiConfig};
use flotilla_protocol::AcquireRefusal;
use flotilla_testkit::{FakeConfig, FakeOpenAi, NatsServer};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "fake-model";

fn limits(rpm: u64, tpm: u64, window: Duration) -> LimitsConfig {
    LimitsConfig {
        window,
        lease_ttl: Duration::from_secs(2),
        acquire_timeout: Duration::from_secs(60),
        models: BTreeMap::from([(MODEL.to_owned(), ModelLimits { rpm, tpm })]),
        ..LimitsConfig::default()
    }
}

async fn bus(url: &str, name: &str) -> Bus {
    let config = BusConfig {
        url: url.to_owned(),
        ..BusConfig::default()
    };
    Bus::connect(&config, name, Arc::new(Counters::default()))
        .await
        .unwrap()
}

/// The OpenAI-compatible client pointed at `fake`.
fn openai_client(fake: &FakeOpenAi) -> Arc<dyn LlmClient> {
    Arc::new(
        OpenAiClient::new(OpenAiConfig {
            base_url: fake.base_url(),
            ..OpenAiConfig::default()
        })
        .unwrap(),
    )
}

fn request(i: usize) -> CompletionRequest {
    CompletionRequest {
        model: MODEL.into(),
        messages: vec![
            ChatMessage::system("You are a load generator."),
            ChatMessage::user(format!("request number {i:06} of the limiter test")),
        ],
        response_format: None,
        max_tokens: Some(50),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_429s_and_most_of_the_quota_used_under_a_load_exceeding_both_limits() {
    let server = NatsServer::start().unwrap();
    let window = Duration::from_secs(2);
    // Each call is ~17 prompt + 50 completion tokens: 120 requests or ~90 calls' worth
    // of tokens per window. Tokens bind; unbounded callers exceed both.
    let (rpm, tpm) = (120, 6_000);
    let fake = FakeOpenAi::start(FakeConfig {
        rpm: Some(rpm),
        tpm: Some(tpm),
        window,
        completion_tokens: 50,
        latency: Duration::from_millis(20),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let config = limits(rpm, tpm, window);
    let shutdown = CancellationToken::new();
    for i in 0..2 {
        let limiter = Limiter::new(
            bus(&server.url(), &format!("limiter-{i}")).await,
            config.clone(),
            format!("limiter-{i}"),
        );
        tokio::spawn(limiter.run(shutdown.child_token()));
    }
    let openai = openai_client(&fake);
    let caller_bus = bus(&server.url(), "callers").await;
    let limiter = LimiterClient::new(caller_bus, config.clone());
    let stats = limiter.stats();
    let llm = Arc::new(LimitedLlm::new(openai, limiter));

    // Once a leader answers, start the clock (election is not what is measured).
    llm.complete(&request(0)).await.expect("a first call");
    let s0 = fake.stats();
    let duration = Duration::from_secs(10);
    let started = tokio::time::Instant::now();
    let mut callers = Vec::new();
    for c in 0..24 {
        let llm = llm.clone();
        callers.push(tokio::spawn(async move {
            let (mut ok, mut last) = (0u64, started);
            let mut i = c * 100_000;
            while started.elapsed() < duration {
                i += 1;
                llm.complete(&request(i)).await.expect("call succeeds");
                ok += 1;
                last = tokio::time::Instant::now();
            }
            (ok, last)
        }));
    }
    let (mut ok, mut end) = (0, started);
    for c in callers {
        let (n, last) = c.await.unwrap();
        ok += n;
        end = end.max(last);
    }
    // Up to the last call: callers still waiting for a permit at the deadline are
    // granted one as the window frees, and those calls count.
    let elapsed = end - started;
    let s = fake.stats();
    assert_eq!(s.http_429, 0, "the provider never had to refuse: {s:?}");
    assert_eq!(s.ok - s0.ok, ok, "every call reached the provider once");
    let windows = elapsed.as_secs_f64() / window.as_secs_f64();
    let request_quota = (s.ok - s0.ok) as f64 / (rpm as f64 * windows);
    let token_quota = (s.tokens - s0.tokens) as f64 / (tpm as f64 * windows);
    let used = request_quota.max(token_quota);
    eprintln!(
        "quota used {:.1}% (requests {:.1}%, tokens {:.1}%): {s:?}",
        used * 100.0,
        request_quota * 100.0,
        token_quota * 100.0
    );
    assert!(
        used >= 0.75,
        "quota used {:.0}% (requests {:.0}%, tokens {:.0}%): {s:?}",
        used * 100.0,
        request_quota * 100.0,
        token_quota * 100.0
    );
    assert!(
        s.max_tokens_in_window <= tpm && s.max_requests_in_window <= rpm,
        "{s:?}"
    );
    assert!(
        stats.waited.get() > 0,
        "the offered load was over the limits, so callers waited"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_timeouts_are_typed() {
    let server = NatsServer::start().unwrap();
    let config = LimitsConfig {
        acquire_timeout: Duration::from_millis(1500),
        ..limits(2, 1_000, Duration::from_secs(60))
    };
    let shutdown = CancellationToken::new();
    let limiter = Limiter::new(bus(&server.url(), "leader").await, config.clone(), "leader");
    tokio::spawn(limiter.run(shutdown.child_token()));
    let client = LimiterClient::new(bus(&server.url(), "caller").await, config);
    // 800 tokens fit the window's budget (1000 less 20%), 900 never will.
    match client.acquire(MODEL, 900).await {
        Err(LimitError::Refused { code, .. }) => assert_eq!(code, AcquireRefusal::TooLarge),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Two requests per minute less 20% is one: the second waits, then times out.
    client.acquire(MODEL, 10).await.expect("first permit");
    let started = tokio::time::Instant::now();
    match client.acquire(MODEL, 10).await {
        Err(LimitError::Timeout { waited, .. }) => {
            assert!(waited >= Duration::from_millis(1500), "{waited:?}");
            assert!(started.elapsed() < Duration::from_secs(10));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_that_still_happens_is_waited_out_and_fed_back_to_the_limiter() {
    let server = NatsServer::start().unwrap();
    let fake = FakeOpenAi::start(FakeConfig::default()).await.unwrap();
    let config = limits(1_000, 1_000_000, Duration::from_secs(60));
    let shutdown = CancellationToken::new();
    let leader_bus = bus(&server.url(), "leader").await;
    let limiter = Limiter::new(leader_bus.clone(), config.clone(), "leader");
    tokio::spawn(limiter.run(shutdown.child_token()));
    let openai = openai_client(&fake);
    let client = LimiterClient::new(bus(&server.url(), "caller").await, config);
    let stats = client.stats();
    let llm = LimitedLlm::new(openai, client);
    // The provider refuses once, asking for 1 s.
    fake.push_script(flotilla_testkit::Behaviour::RateLimited {
        retry_after: Duration::from_secs(1),
    });
    let started = tokio::time::Instant::now();
    let done = llm
        .complete(&request(1))
        .await
        .expect("succeeds on the retry");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the Retry-After"
    );
    assert!(done.usage.total() > 0);
    let s = fake.stats();
    assert_eq!((s.http_429, s.ok), (1, 1), "{s:?}");
    assert_eq!(stats.http_429.get(), 1);
    // The leader paused the model's window for the Retry-After (seen in its snapshot).
    let key = flotilla_control::limiter::window_key(MODEL);
    let paused = flotilla_tests::eventually(Duration::from_secs(10), || {
        let b = leader_bus.clone();
        let key = key.clone();
        async move {
            b.limits()
                .get::<flotilla_protocol::WindowSnapshot>(&key)
                .await
                .ok()
                .flatten()
                .map(|(w, _)| w.paused_until_ms)
                .filter(|p| *p > 0)
        }
    })
    .await;
    assert!(paused.is_some(), "the limiter was told about the 429");
    shutdown.cancel();
}

/// A whole session over HTTP: the orchestrator and every worker call an
/// OpenAI-compatible endpoint (the fake server, answering as the simulator would) through
/// the OpenAI client, with structured output checked against the JSON Schemas, token
/// usage from the responses, and the rate limiter in front of both models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_on_an_openai_compatible_endpoint_through_the_limiter() {
    use flotilla_llm::{SimConfig, SimulatedProvider};
    use flotilla_tests::{TestFleet, spec};

    let sim = SimulatedProvider::new(SimConfig {
        latency_ms: 0,
        ..SimConfig::default()
    });
    let responder: flotilla_testkit::Responder = Arc::new(move |body: &serde_json::Value| {
        sim.respond(&CompletionRequest::from_openai_body(body))
            .map(|(_, c)| c.content)
            .unwrap_or_default()
    });
    let fake = FakeOpenAi::start(FakeConfig {
        rpm: Some(600),
        tpm: Some(1_000_000),
        responder: Some(responder),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let openai = openai_client(&fake);
    let mut s = spec("");
    let models = ["gpt-4o", "gpt-4o-mini"];
    s.worker_model = models[0].into();
    s.control.session.orchestrator_model = models[1].into();
    s.control.limits.models = models
        .iter()
        .map(|m| {
            (
                (*m).to_owned(),
                ModelLimits {
                    rpm: 600,
                    tpm: 1_000_000,
                },
            )
        })
        .collect();
    let fleet = TestFleet::start(s, openai).await;
    for i in 0..3 {
        let (finished, _) = fleet
            .client
            .run(&format!("session {i} over HTTP"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(finished.completed(), "{:?}", finished.event.body);
    }
    let st = fake.stats();
    // Per session: a plan, four tasks, a synthesis.
    assert!(st.ok >= 18, "{st:?}");
    assert_eq!(st.http_429, 0, "{st:?}");
    let log = fake.requests_log();
    assert!(log.iter().any(|r| r["model"] == "gpt-4o-mini"
        && r["response_format"]["json_schema"]["name"] == "flotilla_plan"));
    assert!(log.iter().any(|r| r["model"] == "gpt-4o"
        && r["response_format"]["json_schema"]["name"] == "flotilla_task_output"));
    fleet.stop().await;
}

/// A Python client takes part from the documented protocol: a permit, its settlement,
/// and a typed refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_acquires_and_settles_permits() {
    let server = NatsServer::start().unwrap();
    let config = limits(100, 10_000, Duration::from_secs(60));
    let shutdown = CancellationToken::new();
    let leader_bus = bus(&server.url(), "leader").await;
    tokio::spawn(Limiter::new(leader_bus.clone(), config, "leader").run(shutdown.child_token()));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/limits.py");
    let py = flotilla_tests::python();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&py)
            .arg(&script)
            .arg(server.url())
            .arg(MODEL)
            .output(),
    )
    .await
    .expect("python finishes")
    .unwrap_or_else(|e| panic!("cannot run {}: {e} (run scripts/setup.sh)", py.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["granted"].as_str().unwrap().contains('.'), "{v}");
    assert_eq!(v["settled"], true, "{v}");
    assert_eq!(v["refused"]["status"], "refused", "{v}");
    assert_eq!(v["refused"]["code"], "too_large", "{v}");
    assert_eq!(
        v["bad"],
        serde_json::json!({
            "acquire_garbage": "malformed",
            "acquire_v2": "unsupported_version",
            "acquire_unknown_field": "unknown_field",
            "settle_garbage": "malformed",
        }),
        "{v}"
    );
    // The settlement reached the leader: its window holds 80 used tokens, not 120.
    let key = flotilla_control::limiter::window_key(MODEL);
    let used = flotilla_tests::eventually(Duration::from_secs(10), || {
        let b = leader_bus.clone();
        let key = key.clone();
        async move {
            b.limits()
                .get::<flotilla_protocol::WindowSnapshot>(&key)
                .await
                .ok()
                .flatten()
                .map(|(w, _)| w.slots.iter().map(|s| s[2]).sum::<u64>())
                .filter(|t| *t == 80)
        }
    })
    .await;
    assert_eq!(used, Some(80));
    shutdown.cancel();
}

//! Shared fixtures for the integration tests: a real `nats-server` (started by the
//! testkit on random ports with a temporary store) and an in-process fleet on it.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test fixtures: a failed set-up should panic loudly

use std::sync::Arc;
use std::time::Duration;

use flotilla_bus::{Bus, BusConfig, Counters, PoolSettings};
use flotilla_control::{Client, ControlConfig, Fleet, FleetSpec};
use flotilla_llm::{LlmClient, SimConfig, SimulatedProvider};
use flotilla_testkit::NatsServer;

/// A spec with fast, compressed settings for tests.
pub fn spec(url: &str) -> FleetSpec {
    let bus = BusConfig {
        url: url.to_owned(),
        ..BusConfig::default()
    };
    let mut control = ControlConfig::default();
    control.session.reconcile_every = Duration::from_secs(3600);
    FleetSpec {
        bus,
        control,
        serve_instances: 1,
        workers_per_role: 1,
        worker: PoolSettings::default(),
        roles: Default::default(),
        tools: Default::default(),
        worker_model: "sim-worker".into(),
        component_bus: Default::default(),
    }
}

/// The simulated provider with `latency_ms` mean latency.
pub fn sim(latency_ms: u64) -> Arc<dyn LlmClient> {
    Arc::new(SimulatedProvider::new(SimConfig {
        latency_ms,
        ..SimConfig::default()
    }))
}

/// A server, a fleet on it, and a client.
pub struct TestFleet {
    /// The server (killed on drop).
    pub server: NatsServer,
    /// The fleet.
    pub fleet: Option<Fleet>,
    /// A client.
    pub client: Client,
    /// A bus for inspection.
    pub bus: Bus,
}

impl TestFleet {
    /// Starts a server and a fleet from `spec` (its URL is replaced by the server's).
    pub async fn start(mut spec: FleetSpec, llm: Arc<dyn LlmClient>) -> Self {
        let server = NatsServer::start().expect("nats-server starts");
        spec.bus.url = server.url();
        let fleet = Fleet::start(spec.clone(), llm).await.expect("fleet starts");
        let bus = Bus::connect(&spec.bus, "test-inspector", Arc::new(Counters::default()))
            .await
            .expect("inspector connects");
        let client = Client::new(bus.shared_connection(), bus.names().clone())
            .await
            .expect("client subscribes");
        Self {
            server,
            fleet: Some(fleet),
            client,
            bus,
        }
    }

    /// Stops the fleet (the server stops on drop).
    pub async fn stop(mut self) {
        if let Some(f) = self.fleet.take() {
            f.stop().await;
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or `None` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The newest dead letter once the dead-letter stream's last sequence passes `before`
/// (`None` after 20 s).
pub async fn dead_letter_after(
    bus: &flotilla_bus::Bus,
    before: u64,
) -> Option<async_nats::jetstream::message::StreamMessage> {
    eventually(Duration::from_secs(20), || async {
        let s = bus.dead_letters().await.ok()?;
        let last = s.state().await.ok()?.last_sequence;
        if last <= before {
            return None;
        }
        s.message(last).await.ok()
    })
    .await
}

/// What a scripted call does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Answer as the simulator would.
    Pass,
    /// Wait, then answer as the simulator would, with `tag` appended to every artifact.
    Late(Duration, String),
    /// Answer with this content instead.
    Replace(String),
    /// Fail with this error.
    Fail(flotilla_llm::LlmError),
}

/// One call as the script sees it.
#[derive(Debug, Clone)]
pub struct Call {
    /// Structured-output schema name, if any.
    pub schema: Option<String>,
    /// The user message parsed as JSON (Flotilla's prompts are JSON).
    pub input: serde_json::Value,
    /// How many calls with the same (schema, role, task_id, attempt) came before.
    pub nth: usize,
}

impl Call {
    /// A string field of the input.
    pub fn field(&self, name: &str) -> &str {
        self.input[name].as_str().unwrap_or("")
    }
}

type Script = dyn Fn(&Call) -> Action + Send + Sync;

/// The simulated provider with a script that can delay, replace or fail calls, and a
/// record of every call. Deterministic: the script sees each call's content and count.
pub struct Scripted {
    inner: SimulatedProvider,
    script: Box<Script>,
    /// Every call made, in order.
    pub calls: std::sync::Mutex<Vec<Call>>,
}

impl Scripted {
    /// Wraps the simulator (`latency_ms` mean) with `script`.
    pub fn new(
        latency_ms: u64,
        script: impl Fn(&Call) -> Action + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: SimulatedProvider::new(SimConfig {
                latency_ms,
                ..SimConfig::default()
            }),
            script: Box::new(script),
            calls: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Calls made with this schema for this task id.
    pub fn count(&self, schema: &str, task_id: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.schema.as_deref() == Some(schema) && c.field("task_id") == task_id)
            .count()
    }
}

impl LlmClient for Scripted {
    fn complete<'a>(
        &'a self,
        request: &'a flotilla_llm::CompletionRequest,
    ) -> flotilla_llm::LlmFuture<'a> {
        Box::pin(async move {
            let schema = request.response_format.as_ref().map(|f| f.name.to_string());
            let input: serde_json::Value = request
                .messages
                .last()
                .and_then(|m| serde_json::from_str(&m.content).ok())
                .unwrap_or_default();
            let call = {
                let mut calls = self.calls.lock().unwrap();
                let same = |c: &Call| {
                    c.schema == schema
                        && c.input["session_id"] == input["session_id"]
                        && c.input["role"] == input["role"]
                        && c.input["task_id"] == input["task_id"]
                        && c.input["attempt"] == input["attempt"]
                };
                let nth = calls.iter().filter(|c| same(c)).count();
                let call = Call { schema, input, nth };
                calls.push(call.clone());
                call
            };
            match (self.script)(&call) {
                Action::Pass => self.inner.complete(request).await,
                Action::Late(wait, tag) => {
                    tokio::time::sleep(wait).await;
                    let mut c = self.inner.complete(request).await?;
                    let mut out: flotilla_protocol::TaskOutput =
                        serde_json::from_str(&c.content).unwrap();
                    for a in &mut out.artifacts {
                        a.content.push_str(&tag);
                    }
                    c.content = serde_json::to_string(&out).unwrap();
                    Ok(c)
                }
                Action::Replace(content) => {
                    let mut c = self.inner.complete(request).await?;
                    c.content = content;
                    Ok(c)
                }
                Action::Fail(e) => Err(e),
            }
        })
    }
}

/// Waits (up to 15 s) until every inbox stream is empty: every message was acked or
/// dead-lettered, so nothing is lost.
pub async fn inbox_is_empty(bus: &Bus) -> bool {
    eventually(Duration::from_secs(15), || async {
        (bus.inbox_backlog().await.ok()? == 0).then_some(())
    })
    .await
    .is_some()
}

/// Every event of a session, in order (those published so far: waits 500 ms for more).
pub async fn events(
    t: &TestFleet,
    sid: &flotilla_protocol::SessionId,
) -> Vec<flotilla_protocol::Event> {
    let stream = t.bus.stream(&t.bus.names().stream_events()).await.unwrap();
    let mut out = Vec::new();
    let mut msgs = stream
        .replay(&[t.bus.names().events_of(sid)])
        .await
        .unwrap();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        out.push(serde_json::from_slice(&m.payload).unwrap());
    }
    out
}

/// The Python with nats-py: the project's `.tools/venv` (scripts/setup.sh), else
/// `python3` on PATH.
pub fn python() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        std::path::PathBuf::from("python3")
    }
}

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
        worker_model: "sim-worker".into(),
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
        let client = Client::new(bus.client.clone(), bus.names().clone())
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

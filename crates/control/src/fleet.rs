//! A whole Flotilla in one process: `serve` plus one worker pool process per role, each
//! on its own NATS connection, as `flotilla demo`, `flotilla bench` and the tests run it.

use std::sync::Arc;

use flotilla_agent::Worker;
use std::collections::BTreeMap;

use flotilla_agent::RoleSpec;
use flotilla_bus::{Bus, BusConfig, ConnectError, Counters, PoolSettings};
use flotilla_llm::LlmClient;
use flotilla_protocol::Role;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::ControlConfig;
use crate::serve::Serve;

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// NATS and topology.
    pub bus: BusConfig,
    /// Control plane.
    pub control: ControlConfig,
    /// `serve` processes.
    pub serve_instances: usize,
    /// Worker processes per role.
    pub workers_per_role: usize,
    /// Worker consumer settings.
    pub worker: PoolSettings,
    /// Roles defined in configuration (agent and pool settings).
    pub roles: BTreeMap<Role, RoleSpec>,
    /// Tools agents may call (`flotilla.tool.<name>`).
    pub tools: flotilla_agent::ToolsConfig,
    /// Model the workers use.
    pub worker_model: String,
    /// Connection settings per component (`serve`, or a role name) where they differ
    /// from `bus`: each component on its own user, as in `nats/accounts.conf`.
    pub component_bus: BTreeMap<String, BusConfig>,
}

impl FleetSpec {
    /// The connection settings of `component` (`serve` or a role name).
    pub fn bus_of(&self, component: &str) -> &BusConfig {
        self.component_bus.get(component).unwrap_or(&self.bus)
    }
}

/// A running in-process fleet.
#[derive(Debug)]
pub struct Fleet {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Counters shared by every component of the fleet.
    pub counters: Arc<Counters>,
}

impl Fleet {
    /// Starts `serve` instances and worker pools for every configured role, and
    /// returns once admission answers.
    pub async fn start(spec: FleetSpec, llm: Arc<dyn LlmClient>) -> Result<Self, ConnectError> {
        let shutdown = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let mut spec = spec;
        for role in &spec.control.session.roles {
            let def = spec.roles.get(role).cloned().unwrap_or_default();
            spec.control
                .worker_pools
                .insert(role.clone(), def.pool().apply(&spec.worker));
        }
        for i in 0..spec.serve_instances.max(1) {
            let bus = Bus::connect(
                spec.bus_of("serve"),
                &format!("flotilla-serve-{i}"),
                counters.clone(),
            )
            .await?;
            let serve = Serve::new(bus, llm.clone(), spec.control.clone());
            let s = shutdown.child_token();
            tasks.spawn(async move {
                if let Err(e) = serve.run(s).await {
                    tracing::error!(error = %e, "serve stopped");
                }
            });
        }
        // `serve` is up (it answers admission) before the agents start: it creates the
        // inboxes and consumers, which agents on least-privilege users may not.
        let probe = Bus::connect(
            spec.bus_of("serve"),
            "flotilla-fleet-probe",
            counters.clone(),
        )
        .await?;
        let ping = format!("$SRV.PING.{}", probe.names().service_name());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let asked = probe.request(
                ping.clone(),
                None,
                bytes::Bytes::new(),
                std::time::Duration::from_secs(1),
            );
            if asked.await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // The workers of this process share one verifier: a batch of tasks signed
        // together is checked once, not once per role.
        let mut verifier: Option<flotilla_bus::Verifier> = None;
        for role in &spec.control.session.roles {
            for i in 0..spec.workers_per_role.max(1) {
                let bus = Bus::connect(
                    spec.bus_of(role.as_str()),
                    &format!("flotilla-agent-{role}-{i}"),
                    counters.clone(),
                )
                .await?;
                let limited =
                    flotilla_agent::LimitedLlm::wrap(llm.clone(), &bus, &spec.control.limits);
                let def = spec.roles.get(role).cloned().unwrap_or_default();
                let gateway = flotilla_agent::ToolGateway::new(bus.clone(), spec.tools.clone())
                    .map_err(|e| ConnectError::Bucket {
                        bucket: "tools".into(),
                        detail: format!("invalid tool name: {e}"),
                    })?;
                let agent = Arc::new(def.agent(
                    role,
                    &spec.worker_model,
                    limited,
                    &spec.control.budgets,
                    &bus,
                    &gateway,
                ));
                let settings = def.pool().apply(&spec.worker);
                let mut worker = Worker::new(bus, role.clone(), agent, settings)
                    .with_liveness(spec.control.liveness.clone());
                match &verifier {
                    Some(v) => worker = worker.with_verifier(v),
                    None => verifier = Some(worker.verifier().clone()),
                }
                let s = shutdown.child_token();
                let role: Role = role.clone();
                tasks.spawn(async move {
                    if let Err(e) = worker.run(s).await {
                        tracing::error!(role = %role, error = %e, "worker stopped");
                    }
                });
            }
        }
        Ok(Self {
            shutdown,
            tasks,
            counters,
        })
    }

    /// Stops everything and waits for the drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

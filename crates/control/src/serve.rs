//! `flotilla serve`: admission (endpoint and submit queue), the orchestrator pool, and
//! slot reconciliation, as one process.

use std::sync::Arc;
use std::time::Duration;

use flotilla_bus::{Bus, PoolConsumer};
use flotilla_llm::LlmClient;
use flotilla_protocol::Role;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::config::ControlConfig;
use crate::orchestrator::Orchestrator;
use crate::slots::SlotTable;

/// A component of `serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Loading the slot view or the agents bucket failed: NATS is unreachable.
    #[error("cannot read a bucket: {0}")]
    Slots(#[from] flotilla_bus::KvError),
    /// A consumer could not be bound: check the topology.
    #[error(transparent)]
    Consumer(#[from] flotilla_bus::ConsumerError),
    /// An inbox stream conflicts or cannot be created.
    #[error(transparent)]
    Topology(#[from] flotilla_bus::TopologyError),
    /// The admission endpoint could not be registered.
    #[error("admission endpoint failed: {0}")]
    Endpoint(String),
}

/// The control plane of one `serve` process.
#[derive(Clone)]
pub struct Serve {
    bus: Bus,
    llm: Arc<dyn LlmClient>,
    config: Arc<ControlConfig>,
    tracker: flotilla_agent::Tracker,
}

impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve").finish_non_exhaustive()
    }
}

impl Serve {
    /// A control plane over `bus`, planning with `llm`.
    pub fn new(bus: Bus, llm: Arc<dyn LlmClient>, config: ControlConfig) -> Self {
        let llm = flotilla_agent::LimitedLlm::wrap(llm, &bus, &config.limits);
        Self {
            bus,
            llm,
            config: Arc::new(config),
            tracker: flotilla_agent::Tracker::default(),
        }
    }

    /// The orchestrator's inbox and every worker role's, so tasks queue durably even
    /// before any agent of a role has started; and their pools' consumers, which agents
    /// only bind to.
    async fn bootstrap(&self) -> Result<(), ServeError> {
        let cfg = &self.config.session;
        for role in std::iter::once(Role::orchestrator()).chain(cfg.roles.iter().cloned()) {
            self.bus.ensure_inbox(&role).await?;
        }
        for (role, settings) in &self.config.worker_pools {
            PoolConsumer::for_role(&self.bus, role, settings.clone()).await?;
        }
        Ok(())
    }

    /// Runs until `shutdown`, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let cfg = &self.config.session;
        // A cluster still electing its stream leaders (or a server restarting) does not
        // answer at first: wait it out, backed off; a conflict is final.
        let backoff = flotilla_protocol::Backoff::exponential(
            Duration::from_millis(200),
            Duration::from_secs(5),
        )
        .with_jitter(flotilla_protocol::Jitter::Half);
        for retry in 0.. {
            let e = match self.bootstrap().await {
                Ok(()) => break,
                Err(ServeError::Topology(e @ flotilla_bus::TopologyError::Conflict { .. })) => {
                    return Err(e.into());
                }
                Err(ServeError::Consumer(e)) if e.permanent => return Err(e.into()),
                Err(e) => e,
            };
            tracing::warn!(error = %e, retry, "inboxes and consumers not ready; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.delay(retry)) => {}
            }
        }
        let slots = SlotTable::new(self.bus.clone(), cfg.pool_size, cfg.retry_after_ms);
        for retry in 0.. {
            match slots.watch(shutdown.child_token()).await {
                Ok(()) => break,
                Err(e @ flotilla_bus::KvError::Unavailable { .. }) => {
                    tracing::warn!(error = %e, retry, "slot table not readable yet; retrying");
                }
                Err(e) => return Err(e.into()),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.delay(retry)) => {}
            }
        }
        // Sessions ended from outside (cancel, deadline): this process's own work for
        // them stops at once, and it answers the stop notices of the fleet.
        let agent_id = flotilla_protocol::AgentId::generate(&Role::orchestrator());
        let stops = flotilla_agent::Stops::default();
        let stop_notices = flotilla_agent::stops::listen(
            self.bus.clone(),
            agent_id.to_string(),
            stops.clone(),
            shutdown.child_token(),
        )
        .await;
        let ender = crate::ender::Ender::new(self.bus.clone(), stops.clone(), cfg.stop_wait);
        let cache = crate::orchestrator::RecordCache::with_output_budget(cfg.output_cache_bytes);
        let admission = Admission::new(self.bus.clone(), cfg.clone(), slots.clone())
            .with_ender(ender.clone())
            .with_cache(cache.clone());
        let mut tasks: JoinSet<Result<(), ServeError>> = JoinSet::new();
        tasks.spawn(async move {
            let _ = stop_notices.await;
            Ok(())
        });

        let restarter = admission.clone();
        let (a, s) = (admission.clone(), shutdown.child_token());
        tasks.spawn(async move {
            a.serve_endpoint(s)
                .await
                .map_err(|e| ServeError::Endpoint(e.to_string()))
        });
        let (a, s, settings) = (
            admission,
            shutdown.child_token(),
            self.config.submit.clone(),
        );
        tasks.spawn(async move { Ok(a.serve_queue(settings, s).await?) });
        // This process's task-signing key, registered where workers look it up (and
        // again every day, inside the bucket's max age). Until it is registered,
        // workers check its tasks against the session record instead.
        let signer = flotilla_bus::Signer::generate();
        let (bus, reg, id, s) = (
            self.bus.clone(),
            signer.clone(),
            agent_id.to_string(),
            shutdown.child_token(),
        );
        tasks.spawn(async move {
            let mut retry = 0u32;
            loop {
                let wait = match reg.register(bus.sessions(), &id).await {
                    Ok(()) => {
                        retry = 0;
                        Duration::from_secs(24 * 3600)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry, "could not register the task-signing key; retrying");
                        retry = retry.saturating_add(1);
                        backoff.delay(retry)
                    }
                };
                tokio::select! {
                    _ = s.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        let orch = Orchestrator::new(self.bus.clone(), self.llm.clone(), self.config.clone())
            .with_tracker(self.tracker.clone())
            .with_stops(stops)
            .with_ender(ender.clone())
            .with_signer(signer)
            .with_cache(cache);
        let s = shutdown.child_token();
        tasks.spawn(async move { Ok(orch.run(s).await?) });

        let mover = crate::dlq::DeadLetterMover::new(self.bus.clone());
        let s = shutdown.child_token();
        tasks.spawn(async move { Ok(mover.run(s).await?) });

        // Gauges for Prometheus, every 5 s: sessions and slots in use, the dead-letter
        // queue's depth and each role's inbox depth (one stream info each).
        let (bus, gauged, roles, size, s) = (
            self.bus.clone(),
            slots.clone(),
            cfg.roles.clone(),
            cfg.pool_size,
            shutdown.child_token(),
        );
        tasks.spawn(async move {
            loop {
                metrics::gauge!("flotilla_session_slots").set(f64::from(size));
                metrics::gauge!("flotilla_sessions_in_use").set(f64::from(gauged.taken()));
                let names = bus.names();
                if let Ok(dlq) = bus.dead_letters().await
                    && let Ok(state) = dlq.state().await
                {
                    metrics::gauge!("flotilla_dead_letter_queue_depth").set(state.messages as f64);
                }
                for role in std::iter::once(Role::orchestrator()).chain(roles.iter().cloned()) {
                    if let Ok(inbox) = bus.stream(&names.stream_inbox(&role)).await
                        && let Ok(state) = inbox.state().await
                    {
                        metrics::gauge!("flotilla_inbox_depth", "role" => role.to_string())
                            .set(state.messages as f64);
                    }
                }
                tokio::select! {
                    _ = s.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        });
        let (every, grace, s) = (cfg.reconcile_every, cfg.slot_grace, shutdown.child_token());
        let bus = self.bus.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = s.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(every) => {}
                }
                match slots.reconcile(grace).await {
                    Ok(found) => {
                        for session in &found.stuck_planning {
                            if let Err(e) = restarter.restart_if_planning(session).await {
                                tracing::warn!(session = %session, error = %e, "could not restart session");
                            }
                        }
                        // Questions whose wait timed out while no timer ran for them.
                        for msg in &found.input_timed_out {
                            if let Err(e) = crate::ender::publish_input(&bus, msg).await {
                                tracing::warn!(session = %msg.session_id, error = %e, "could not end a wait for input");
                            }
                        }
                        // Deadlines whose timer died with the process that admitted them.
                        for (session, deadline) in &found.past_deadline {
                            if let Err(e) = ender.end_past_deadline(session, *deadline).await {
                                tracing::warn!(session = %session, error = %e, "could not end a session past its deadline");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "slot reconciliation failed"),
                }
            }
        });
        // Presence of this process, and the watchdog over every process's presence.
        let (b, l, s, id) = (
            self.bus.clone(),
            self.config.liveness.clone(),
            shutdown.child_token(),
            agent_id.clone(),
        );
        let tracker = self.tracker.clone();
        tasks.spawn(async move {
            flotilla_agent::presence::heartbeat(b, id, Role::orchestrator(), tracker, l, s).await;
            Ok(())
        });
        if self.config.limits.enabled {
            let limiter = crate::limiter::Limiter::new(
                self.bus.clone(),
                self.config.limits.clone(),
                agent_id.to_string(),
            );
            let s = shutdown.child_token();
            tasks.spawn(async move {
                limiter
                    .run(s)
                    .await
                    .map_err(|e| ServeError::Endpoint(e.to_string()))
            });
        }
        let watchdog =
            crate::watchdog::Watchdog::new(self.bus.clone(), self.config.liveness.clone()).await?;
        let s = shutdown.child_token();
        tasks.spawn(async move {
            watchdog.run(s).await;
            Ok(())
        });
        tracing::info!("serve started");

        let mut first_err = None;
        while let Some(res) = tasks.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "serve component failed; shutting down");
                    first_err.get_or_insert(e);
                    shutdown.cancel();
                }
                Err(join) => {
                    tracing::error!(error = %join, "serve component panicked; shutting down");
                    shutdown.cancel();
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

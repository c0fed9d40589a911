//! The durable pull consumer a role pool shares, and the pull loop that feeds a
//! handler with bounded concurrency.
//!
//! All processes serving a role bind the same durable consumer, so work spreads across
//! them and a message one process does not ack in time goes to another: that process
//! is the backup agent.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::Bus;
use crate::delivery::Delivery;
use crate::verdict::{VerdictError, settle};
use flotilla_protocol::Role;

/// Binding the consumer failed: check the topology, then retry.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind consumer {name}: {detail}")]
pub struct ConsumerError {
    /// Consumer name.
    pub name: String,
    /// The cause.
    pub detail: String,
    /// Retrying cannot help (invalid settings, or a consumer configured otherwise);
    /// otherwise the stream or consumer may not exist yet, or NATS is unreachable.
    pub permanent: bool,
}

/// How a pool consumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// How long a delivered message may go unacknowledged before the server gives it
    /// to another process of the pool.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a message is given up on (then dead-lettered); -1 for no bound.
    pub max_deliver: i64,
    /// Redelivery delays, one per delivery after the first (the last repeats); empty
    /// means redeliver after `ack_wait`. When set, the server uses the first value as the
    /// ack wait, and `max_deliver` must exceed the list's length.
    #[serde(with = "durations")]
    pub backoff: Vec<Duration>,
    /// Messages handled at once by one process. A memory bound (each handler in flight
    /// holds its message), not an I/O bound: handlers waiting on an LLM call hold no
    /// other slot, and calls are bounded by the limiter's `max_in_flight`.
    pub concurrency: usize,
    /// Longest a pull request waits for messages.
    #[serde(with = "humantime_serde")]
    pub fetch_expiry: Duration,
    /// How long shutdown waits for in-flight handlers.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl PoolSettings {
    /// How long a delivery may go unacknowledged before redelivery: the first backoff
    /// value when there is one (the server uses it in place of `ack_wait`).
    pub fn effective_ack_wait(&self) -> Duration {
        self.backoff.first().copied().unwrap_or(self.ack_wait)
    }

    /// Checks the settings the server would refuse.
    pub fn validate(&self) -> Result<(), String> {
        if !self.backoff.is_empty()
            && self.max_deliver != -1
            && self.max_deliver <= self.backoff.len() as i64
        {
            return Err(format!(
                "max_deliver ({}) must exceed the number of backoff delays ({})",
                self.max_deliver,
                self.backoff.len()
            ));
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        Ok(())
    }
}

/// Serde for `Vec<Duration>` as human-readable strings (`["1s", "5s"]`).
mod durations {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Serde for `Option<Vec<Duration>>` as human-readable strings (`["1s", "5s"]`), for
/// `#[serde(with = "...")]`.
pub mod opt_durations {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes.
    pub fn serialize<S: Serializer>(v: &Option<Vec<Duration>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::durations::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    /// Deserializes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Duration>>, D::Error> {
        Option::<Vec<String>>::deserialize(d)?
            .map(|v| {
                v.iter()
                    .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
                    .collect()
            })
            .transpose()
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(12),
            max_deliver: 5,
            backoff: Vec::new(),
            concurrency: 50_000,
            fetch_expiry: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Per-role changes to the worker pool settings (`[roles.<role>]` in the config):
/// what is set replaces the `[worker]` value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolOverrides {
    /// See [`PoolSettings::ack_wait`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ack_wait: Option<Duration>,
    /// See [`PoolSettings::max_deliver`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_deliver: Option<i64>,
    /// See [`PoolSettings::backoff`].
    #[serde(
        default,
        with = "opt_durations",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff: Option<Vec<Duration>>,
    /// See [`PoolSettings::concurrency`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

impl PoolOverrides {
    /// `base` with these changes.
    pub fn apply(&self, base: &PoolSettings) -> PoolSettings {
        PoolSettings {
            ack_wait: self.ack_wait.unwrap_or(base.ack_wait),
            max_deliver: self.max_deliver.unwrap_or(base.max_deliver),
            backoff: self.backoff.clone().unwrap_or_else(|| base.backoff.clone()),
            concurrency: self.concurrency.unwrap_or(base.concurrency),
            ..base.clone()
        }
    }
}

/// A bound durable pull consumer.
#[derive(Debug)]
pub struct PoolConsumer {
    consumer: PullConsumer,
    settings: PoolSettings,
    name: String,
}

impl PoolConsumer {
    /// The consumer of `role`'s inboxes across every session.
    pub async fn for_role(
        bus: &Bus,
        role: &Role,
        settings: PoolSettings,
    ) -> Result<Self, ConsumerError> {
        let names = bus.names();
        Self::bind(
            bus,
            names.stream_inbox(role),
            names.role_consumer(role),
            names.inbox_of_role(role),
            settings,
        )
        .await
    }

    /// The consumer of the durable submit queue, shared by every `serve`.
    pub async fn for_submit(bus: &Bus, settings: PoolSettings) -> Result<Self, ConsumerError> {
        let names = bus.names();
        Self::bind(
            bus,
            names.stream_submit(),
            names.submit_consumer(),
            names.submit(),
            settings,
        )
        .await
    }

    /// The orchestrators' consumer of committed task records (`*.t.>` in the sessions
    /// bucket), shared by every `serve`: a task's commit is its result.
    pub async fn for_commits(bus: &Bus, settings: PoolSettings) -> Result<Self, ConsumerError> {
        let names = bus.names();
        let stream = names.stream_sessions();
        // A commit its consumer gave up on is dead-lettered (and kept: it is the record).
        crate::topology::capture_max_deliveries(&bus.js, names, &stream)
            .await
            .map_err(|e| ConsumerError {
                name: names.commits_consumer(),
                detail: e.to_string(),
                permanent: false,
            })?;
        Self::bind(
            bus,
            names.stream_sessions(),
            names.commits_consumer(),
            names.sessions_key_subject(flotilla_protocol::subject::keys::ALL_TASKS),
            settings,
        )
        .await
    }

    /// The dead-letter mover's consumer of captured max-deliveries advisories.
    pub async fn for_advisories(bus: &Bus, settings: PoolSettings) -> Result<Self, ConsumerError> {
        let names = bus.names();
        Self::bind(
            bus,
            names.stream_advisories(),
            names.dlq_mover_consumer(),
            String::new(),
            settings,
        )
        .await
    }

    async fn bind(
        bus: &Bus,
        stream: String,
        name: String,
        filter: String,
        settings: PoolSettings,
    ) -> Result<Self, ConsumerError> {
        let err = |detail: String| ConsumerError {
            name: name.clone(),
            detail,
            permanent: false,
        };
        settings.validate().map_err(|detail| ConsumerError {
            permanent: true,
            ..err(detail)
        })?;
        let stream = bus
            .js
            .get_stream(&stream)
            .await
            .map_err(|e| err(e.to_string()))?;
        let config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: filter,
            ack_policy: AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            backoff: settings.backoff.clone(),
            max_ack_pending: 100_000,
            max_waiting: 4096,
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer::<pull::Config>(&name, config.clone())
            .await
            .map_err(|e| err(e.to_string()))?;
        // An existing consumer shared by the pool must be configured as this process is:
        // say so clearly rather than run with settings nobody asked for.
        let have = consumer
            .info()
            .await
            .map_err(|e| err(e.to_string()))?
            .config
            .clone();
        let unbounded = |v: i64| if v <= 0 { -1 } else { v };
        let mismatch = if have.ack_wait != config.ack_wait && config.backoff.is_empty() {
            Some(format!(
                "ack_wait {:?}, this process wants {:?}",
                have.ack_wait, config.ack_wait
            ))
        } else if unbounded(have.max_deliver) != unbounded(config.max_deliver) {
            Some(format!(
                "max_deliver {}, this process wants {}",
                have.max_deliver, config.max_deliver
            ))
        } else if have.backoff != config.backoff {
            Some(format!(
                "backoff {:?}, this process wants {:?}",
                have.backoff, config.backoff
            ))
        } else {
            None
        };
        if let Some(m) = mismatch {
            return Err(ConsumerError {
                permanent: true,
                ..err(format!(
                    "the pool's consumer exists with {m}; give every process of the pool the same settings, or delete the consumer"
                ))
            });
        }
        Ok(Self {
            consumer,
            settings,
            name,
        })
    }

    /// Like [`PoolConsumer::run`], for handlers that return a [`VerdictError`]: each
    /// delivery is then acked, naked or dead-lettered accordingly.
    pub async fn serve<F, Fut>(self, bus: Bus, shutdown: CancellationToken, handler: F)
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (Delivery, Result<(), VerdictError>)> + Send + 'static,
    {
        // The handler, the connection verdicts go out on and the shutdown token: one
        // pointer in each handling's future (which lives through model calls), not
        // three.
        let shared = Arc::new((handler, bus.clone(), shutdown.clone()));
        self.run(bus, shutdown, move |d| {
            let shared = shared.clone();
            async move {
                // Nothing is held beside the handler's future but the delivery and the
                // shared pointer: a verdict is taken at once, and an outage is waited
                // out (the handler run again) in a future of its own, allocated only
                // when one happens.
                let (d, verdict) = (shared.0)(d).await;
                let (d, verdict) = after_handling(&shared, d, verdict).await;
                Box::pin(settle_owned(&shared.1, d, verdict)).await;
            }
        })
        .await;
    }

    /// Pulls until `shutdown`, running `handler` on each delivery with at most
    /// `concurrency` in flight; on shutdown stops pulling and waits up to the drain
    /// timeout for handlers to finish (unfinished ones are redelivered elsewhere).
    pub async fn run<F, Fut>(self, bus: Bus, shutdown: CancellationToken, handler: F)
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let limit = self.settings.concurrency.max(1);
        let keepalive = (self.settings.effective_ack_wait() / 2).max(Duration::from_millis(100));
        let permits = Arc::new(Semaphore::new(limit));
        // One timer for every delivery in flight, not one each (a handler in a long
        // model call holds no timer of its own); stopped when this loop returns.
        let keepalives = Keepalives::default();
        let _ticker = AbortOnDropHandle::new(tokio::spawn(keepalives.clone().run(keepalive)));
        let backoff = flotilla_protocol::Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
        .with_jitter(flotilla_protocol::Jitter::Half);
        let mut failed_pulls = 0u32;
        let pull_bound = self.settings.fetch_expiry + Duration::from_secs(5);
        'pull: while !shutdown.is_cancelled() {
            // Wait for at least one free slot before asking for work.
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let want = (permits.available_permits() + 1).min(128);
            let batch = self
                .consumer
                .batch()
                .max_messages(want)
                .expires(self.settings.fetch_expiry)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(consumer = %self.name, error = %e, "pull failed, retrying");
                    drop(first);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff.delay(failed_pulls)) => {}
                    }
                    failed_pulls = failed_pulls.saturating_add(1);
                    continue;
                }
            };
            failed_pulls = 0;
            let mut first = Some(first);
            loop {
                // The server ends a pull at its expiry with a status message; a server
                // that restarted meanwhile has forgotten the pull and never will, so
                // the wait is bounded on this side too.
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break 'pull,
                    n = tokio::time::timeout(pull_bound, batch.next()) => match n {
                        Ok(n) => n,
                        Err(_) => {
                            tracing::debug!(consumer = %self.name, "pull unanswered past its expiry; pulling again");
                            break;
                        }
                    },
                };
                let msg = match next {
                    None => break,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(consumer = %self.name, error = %e, "pull batch ended");
                        break;
                    }
                };
                let permit = match first.take() {
                    Some(p) => p,
                    None => match permits.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break 'pull,
                    },
                };
                let delivery = Delivery::new(msg, &bus);
                if delivery.delivered() > 1 {
                    bus.counters.redelivered.increment();
                }
                // A healthy handler keeps its delivery: an LLM call may outlast the
                // ack wait, and letting it expire would have another process redo (and
                // pay for) the same work. A dead or frozen process stops the keepalive,
                // and the watchdog finds it sooner than the ack wait would.
                let kept = delivery.handle().map(|a| keepalives.keep(a));
                // The handler's future is made here and spawned as it is, with the two
                // guards beside it (an `async` block awaiting it would keep the handler
                // and the delivery in slots of their own as well, through the model
                // call).
                tokio::spawn(handler(delivery).map(move |()| {
                    drop(kept);
                    drop(permit);
                }));
            }
        }
        // Drain: wait for in-flight handlers, bounded.
        let all = u32::try_from(limit).unwrap_or(u32::MAX);
        let drained =
            tokio::time::timeout(self.settings.drain_timeout, permits.acquire_many(all)).await;
        if drained.is_err() {
            tracing::warn!(consumer = %self.name, "drain timed out; unfinished messages will be redelivered");
        }
    }
}

/// A delivery given back by its handler, with the handler's verdict.
type Handled = (Delivery, Result<(), VerdictError>);

/// What follows a handling: its verdict as it is, or for an outage, the handler run
/// again in place ([`through_outage`], boxed: only an outage allocates it). Not
/// `async`: its output is the only thing a handling's future keeps of it.
fn after_handling<'a, F, Fut>(
    shared: &'a (F, Bus, CancellationToken),
    d: Delivery,
    verdict: Result<(), VerdictError>,
) -> futures::future::Either<
    std::future::Ready<Handled>,
    std::pin::Pin<Box<dyn Future<Output = Handled> + Send + 'a>>,
>
where
    F: Fn(Delivery) -> Fut + Send + Sync,
    Fut: Future<Output = Handled> + Send + 'a,
{
    match verdict {
        Err(e) if e.is_outage() => {
            futures::future::Either::Right(Box::pin(through_outage(shared, d, e)))
        }
        other => futures::future::Either::Left(std::future::ready((d, other))),
    }
}

/// [`settle`] for a delivery given up by its handling's future.
async fn settle_owned(bus: &Bus, d: Delivery, verdict: Result<(), VerdictError>) {
    settle(bus, &d, verdict).await;
}

/// Runs a handler whose handling met an outage (`why`) again in place, backed off, the
/// delivery kept alive by [`PoolConsumer::run`]'s keepalive (a nak per try would spend
/// one of its bounded deliveries), until it gets a verdict that is not an outage, or
/// the outage outlasts [`crate::verdict::OUTAGE_PATIENCE`] or shutdown comes: then the
/// delivery is handed back with the outage's verdict.
async fn through_outage<F, Fut>(
    shared: &(F, Bus, CancellationToken),
    mut d: Delivery,
    why: VerdictError,
) -> Handled
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = Handled>,
{
    let (handler, bus, stop) = shared;
    let mut outage = Outage::began();
    let mut why = why;
    loop {
        if let Some(given_up) = outage.wait_out(stop, bus, &mut d, why).await {
            return (d, Err(given_up));
        }
        // What the failed handling wrote before the outage hit may have left effects
        // unperformed: the handler repairs them when it sees a redelivery.
        d.handled_again();
        let (back, verdict) = handler(d).await;
        d = back;
        match verdict {
            Err(e) if e.is_outage() => why = e,
            other => return (d, other),
        }
    }
}

/// An outage a handler is waiting out in place (see [`PoolConsumer::serve`]): since
/// when, and how many times the handler has been run again.
struct Outage {
    since: tokio::time::Instant,
    retries: u32,
}

impl Outage {
    fn began() -> Self {
        Self {
            since: tokio::time::Instant::now(),
            retries: 0,
        }
    }

    /// Waits before the handler runs again, and reads a released payload back from
    /// the stream (waiting again while that fails too). `None`: run the handler again;
    /// `Some(why)`: give up, past [`crate::verdict::OUTAGE_PATIENCE`] from the
    /// outage's start or at shutdown, and hand the delivery back with `why`.
    async fn wait_out(
        &mut self,
        stop: &CancellationToken,
        bus: &Bus,
        d: &mut Delivery,
        why: VerdictError,
    ) -> Option<VerdictError> {
        let patience = crate::verdict::OUTAGE_PATIENCE;
        if self.since.elapsed() >= patience {
            return Some(why);
        }
        tracing::debug!(
            subject = d.subject(),
            seq = d.stream_sequence(),
            retry = self.retries,
            "jetstream unavailable; handling again"
        );
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Some(why),
                _ = tokio::time::sleep(crate::verdict::OUTAGE_BACKOFF.delay(self.retries)) => {}
            }
            self.retries += 1;
            match d.reload_payload(bus).await {
                Ok(()) => return None,
                Err(e) => {
                    tracing::debug!(
                        subject = d.subject(),
                        seq = d.stream_sequence(),
                        error = %e,
                        "payload not read back yet"
                    );
                    if self.since.elapsed() >= patience {
                        return Some(why);
                    }
                }
            }
        }
    }
}

/// The deliveries in flight of one pull loop, each with when its next keepalive
/// (`+WPI`) is due. One task sends them all, so a handler waiting on a model call
/// holds an entry here (a few dozen bytes) instead of a timer of its own.
#[derive(Clone, Default)]
struct Keepalives(Arc<std::sync::Mutex<KeepaliveSet>>);

#[derive(Default)]
struct KeepaliveSet {
    next_id: u64,
    due: std::collections::HashMap<u64, (tokio::time::Instant, crate::AckHandle)>,
}

/// A delivery's entry in [`Keepalives`], removed when its handler ends (or is dropped).
struct Kept {
    set: Keepalives,
    id: u64,
}

impl Keepalives {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeepaliveSet> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `ack`'s delivery alive until the returned entry is dropped.
    fn keep(&self, ack: crate::AckHandle) -> Kept {
        let mut set = self.lock();
        let id = set.next_id;
        set.next_id += 1;
        set.due.insert(id, (tokio::time::Instant::now(), ack));
        Kept {
            set: self.clone(),
            id,
        }
    }

    /// Sends each delivery's keepalive `every` from its start: it looks four times a
    /// period, so a keepalive is at most a quarter period late.
    async fn run(self, every: Duration) {
        let mut tick = tokio::time::interval(every / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let due: Vec<crate::AckHandle> = {
                let mut set = self.lock();
                set.due
                    .values_mut()
                    .filter(|(since, _)| now.duration_since(*since) >= every)
                    .map(|(since, ack)| {
                        *since = now;
                        ack.clone()
                    })
                    .collect()
            };
            for ack in due {
                if let Err(e) = ack.progress().await {
                    tracing::debug!(error = %e, "keepalive not sent");
                }
            }
        }
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.set.lock().due.remove(&self.id);
    }
}

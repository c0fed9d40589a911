//! Idempotent, versioned bootstrap of every stream and bucket.
//!
//! [`ensure`] creates what is missing and checks what exists. A stream or bucket whose
//! existing configuration conflicts with ours is an error that names the field; it is
//! never silently reconfigured.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{
    self, kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::config::BusConfig;
use flotilla_protocol::{Namespace, Role};

/// The topology version written into every stream's metadata.
pub const TOPOLOGY_VERSION: &str = "1";
const VERSION_KEY: &str = "flotilla.topology";

/// Bootstrapping failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An existing stream or bucket differs from what this version of Flotilla needs.
    /// Delete it (losing its data) or point this deployment at another prefix.
    #[error(
        "{name} exists with {field} = {found}, flotilla needs {expected}; remove it or use another prefix"
    )]
    Conflict {
        /// Stream or bucket name.
        name: String,
        /// The differing setting.
        field: &'static str,
        /// What it needs.
        expected: String,
        /// What exists.
        found: String,
    },
    /// A stream or bucket does not exist, and this process could not create it: its
    /// NATS user may not (least privilege), so `flotilla serve` must create it.
    #[error(
        "{name} does not exist and this process could not create it ({detail}); if its NATS user may not create streams, start `flotilla serve` first: it creates the topology"
    )]
    Missing {
        /// Stream or bucket name.
        name: String,
        /// Why the create failed.
        detail: String,
    },
    /// Talking to JetStream failed; retry.
    #[error("jetstream request for {name} failed: {source}")]
    Unavailable {
        /// Stream or bucket name.
        name: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the streams must look like.
pub(crate) fn stream_configs(ns: &Namespace, c: &BusConfig) -> Vec<stream::Config> {
    let meta = HashMap::from([(VERSION_KEY.to_owned(), TOPOLOGY_VERSION.to_owned())]);
    vec![
        stream::Config {
            name: ns.stream_submit(),
            subjects: vec![ns.submit()],
            retention: RetentionPolicy::WorkQueue,
            max_messages: c.submit_queue_max,
            discard: DiscardPolicy::New,
            duplicate_window: c.duplicate_window,
            storage: StorageType::File,
            num_replicas: c.replicas,
            max_consumers: 16,
            metadata: meta.clone(),
            description: Some("flotilla durable session submissions".into()),
            ..Default::default()
        },
        stream::Config {
            name: ns.stream_events(),
            subjects: vec![ns.events_all()],
            retention: RetentionPolicy::Limits,
            max_age: c.events_max_age,
            duplicate_window: c.duplicate_window,
            storage: StorageType::File,
            num_replicas: c.replicas,
            max_consumers: 10_000,
            metadata: meta.clone(),
            description: Some("flotilla session event logs".into()),
            ..Default::default()
        },
        stream::Config {
            name: ns.stream_dlq(),
            subjects: vec![ns.dlq_all()],
            retention: RetentionPolicy::Limits,
            duplicate_window: c.duplicate_window,
            storage: StorageType::File,
            num_replicas: c.replicas,
            max_consumers: 256,
            metadata: meta.clone(),
            description: Some("flotilla dead letters".into()),
            ..Default::default()
        },
        stream::Config {
            name: ns.stream_spend(),
            subjects: vec![ns.spend_all()],
            retention: RetentionPolicy::Limits,
            max_age: c.records_max_age,
            duplicate_window: c.duplicate_window,
            storage: StorageType::File,
            num_replicas: c.replicas,
            max_consumers: 256,
            allow_direct: true,
            allow_message_counter: true,
            metadata: meta.clone(),
            description: Some(
                "flotilla session token ledgers: one counter per session (Nats-Incr)".into(),
            ),
            ..Default::default()
        },
        stream::Config {
            name: ns.stream_advisories(),
            // Each role's inbox stream adds its own subject here (see `ensure_inbox`).
            subjects: vec![ns.max_deliveries_advisory(&ns.stream_submit())],
            retention: RetentionPolicy::WorkQueue,
            max_age: Duration::from_secs(7 * 24 * 3600),
            storage: StorageType::File,
            num_replicas: c.replicas,
            max_consumers: 16,
            metadata: meta,
            description: Some(
                "max-deliveries advisories of flotilla work queues, for the dead-letter mover"
                    .into(),
            ),
            ..Default::default()
        },
    ]
}

pub(crate) fn bucket_configs(ns: &Namespace, c: &BusConfig) -> Vec<kv::Config> {
    // Every bucket keeps one value per key; some expire keys by age, and the TTL
    // buckets need limit markers (server 2.11+; an expiry then leaves a purge marker).
    let bucket =
        |bucket: String, description: &str, max_age: Duration, per_key_ttl: bool| kv::Config {
            bucket,
            description: description.into(),
            history: 1,
            max_age,
            storage: StorageType::File,
            num_replicas: c.replicas,
            limit_markers: per_key_ttl.then_some(Duration::from_secs(60)),
            ..Default::default()
        };
    let forever = Duration::ZERO;
    vec![
        bucket(
            ns.bucket_sessions(),
            "flotilla session and task records",
            c.records_max_age,
            false,
        ),
        bucket(
            ns.bucket_memory(),
            "flotilla session shared memory",
            c.records_max_age,
            false,
        ),
        bucket(
            ns.bucket_locks(),
            "flotilla timed locks (per-key TTL)",
            forever,
            true,
        ),
        bucket(
            ns.bucket_agents(),
            "flotilla process presence (per-key TTL)",
            forever,
            true,
        ),
        bucket(
            ns.bucket_limits(),
            "flotilla rate limiter lease and windows, token spend (per-key TTL)",
            c.records_max_age,
            true,
        ),
        bucket(
            ns.bucket_slots(),
            "flotilla admission slots",
            forever,
            false,
        ),
        bucket(
            ns.bucket_cache(),
            "flotilla tool results: cached and idempotency records (per-key TTL)",
            forever,
            true,
        ),
    ]
}

fn stream_missing(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(je) if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// A creation refused because the cluster cannot place the replicas yet (a peer not
/// heard from since it started, or gone): waiting helps, unlike a refusal.
fn placement_pending(detail: &str) -> bool {
    detail.contains("no suitable peers for placement")
}

/// What a failed creation means when the stream is still missing after it.
fn not_created(name: &str, detail: String) -> TopologyError {
    if placement_pending(&detail) {
        TopologyError::Unavailable {
            name: name.to_owned(),
            source: detail.into(),
        }
    } else {
        TopologyError::Missing {
            name: name.to_owned(),
            detail,
        }
    }
}

fn unavailable(name: &str, e: impl std::error::Error + Send + Sync + 'static) -> TopologyError {
    TopologyError::Unavailable {
        name: name.to_owned(),
        source: Box::new(e),
    }
}

fn check<T: PartialEq + std::fmt::Debug>(
    name: &str,
    field: &'static str,
    expected: T,
    found: T,
) -> Result<(), TopologyError> {
    if expected == found {
        Ok(())
    } else {
        Err(TopologyError::Conflict {
            name: name.to_owned(),
            field,
            expected: format!("{expected:?}"),
            found: format!("{found:?}"),
        })
    }
}

/// The server reports "no limit" as -1 whatever was sent (0 or -1).
fn unlimited(v: i64) -> i64 {
    if v <= 0 { -1 } else { v }
}

fn compare_stream(want: &stream::Config, have: &stream::Config) -> Result<(), TopologyError> {
    let n = &want.name;
    if want.name.ends_with("_ADVISORIES") {
        // Grows with the roles (see `ensure_inbox`): only ours must be there.
        if let Some(missing) = want.subjects.iter().find(|s| !have.subjects.contains(s)) {
            return Err(TopologyError::Conflict {
                name: n.clone(),
                field: "subjects",
                expected: format!("to include {missing}"),
                found: format!("{:?}", have.subjects),
            });
        }
    } else {
        check(n, "subjects", &want.subjects, &have.subjects)?;
    }
    check(n, "retention", want.retention, have.retention)?;
    check(n, "discard", want.discard, have.discard)?;
    check(
        n,
        "discard_new_per_subject",
        want.discard_new_per_subject,
        have.discard_new_per_subject,
    )?;
    check(
        n,
        "max_messages_per_subject",
        unlimited(want.max_messages_per_subject),
        unlimited(have.max_messages_per_subject),
    )?;
    check(n, "storage", want.storage, have.storage)?;
    // A deployment moved to a cluster raises its streams' replicas first (docs:
    // architecture, "From one server to a cluster"); a process still configured for
    // the other count says so here instead of running on streams it does not expect.
    check(n, "num_replicas", want.num_replicas, have.num_replicas)?;
    check(
        n,
        "allow_msg_counter",
        want.allow_message_counter,
        have.allow_message_counter,
    )?;
    check(
        n,
        "metadata.flotilla.topology",
        want.metadata.get(VERSION_KEY),
        have.metadata.get(VERSION_KEY),
    )?;
    if have.duplicate_window < want.duplicate_window {
        return Err(TopologyError::Conflict {
            name: n.clone(),
            field: "duplicate_window",
            expected: format!(">= {:?}", want.duplicate_window),
            found: format!("{:?}", have.duplicate_window),
        });
    }
    Ok(())
}

/// How long a creation refused because its replicas cannot be placed yet is tried
/// again: a cluster that has just formed refuses placement until its meta leader has
/// heard from every peer, which takes seconds at most.
const PLACEMENT_PATIENCE: Duration = Duration::from_secs(20);

/// Runs `step` again, backed off, while it fails only because replicas cannot be placed
/// yet ([`PLACEMENT_PATIENCE`] at most); any other outcome is returned as it is.
async fn waiting_for_placement<F, Fut>(step: F) -> Result<(), TopologyError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), TopologyError>>,
{
    crate::verdict::retry_while(
        step,
        TopologyError::placement_pending,
        flotilla_protocol::Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2)),
        PLACEMENT_PATIENCE,
    )
    .await
}

impl TopologyError {
    /// The cluster could not place the replicas yet (see [`placement_pending`]).
    fn placement_pending(&self) -> bool {
        matches!(self, Self::Unavailable { source, .. } if placement_pending(&source.to_string()))
    }
}

/// Creates every stream and bucket that is missing and checks the ones that exist.
/// Safe to run concurrently from many processes. A cluster that cannot place the
/// replicas yet is waited for ([`PLACEMENT_PATIENCE`] at most).
pub async fn ensure(
    js: &jetstream::Context,
    ns: &Namespace,
    c: &BusConfig,
) -> Result<(), TopologyError> {
    waiting_for_placement(|| ensure_once(js, ns, c)).await
}

async fn ensure_once(
    js: &jetstream::Context,
    ns: &Namespace,
    c: &BusConfig,
) -> Result<(), TopologyError> {
    for want in stream_configs(ns, c) {
        ensure_stream(js, &want).await?;
    }
    for want in bucket_configs(ns, c) {
        let stream_name = format!("KV_{}", want.bucket);
        match js.get_stream(&stream_name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| unavailable(&stream_name, e))?;
                let have = &info.config;
                check(
                    &want.bucket,
                    "history",
                    want.history,
                    have.max_messages_per_subject,
                )?;
                check(&want.bucket, "max_age", want.max_age, have.max_age)?;
                check(
                    &want.bucket,
                    "num_replicas",
                    want.num_replicas,
                    have.num_replicas,
                )?;
            }
            Err(e) if stream_missing(&e) => {
                match js.create_key_value(want.clone()).await {
                    Ok(_) => {}
                    Err(e) => {
                        // Lost a creation race (accepted), or may not create, or got
                        // no answer (unavailable).
                        match js.get_stream(&stream_name).await {
                            Ok(_) => {}
                            Err(get) if stream_missing(&get) => {
                                return Err(not_created(&want.bucket, e.to_string()));
                            }
                            Err(get) => return Err(unavailable(&stream_name, get)),
                        }
                    }
                }
            }
            Err(e) => return Err(unavailable(&stream_name, e)),
        }
    }
    Ok(())
}

async fn ensure_stream(
    js: &jetstream::Context,
    want: &stream::Config,
) -> Result<(), TopologyError> {
    match js.get_stream(&want.name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| unavailable(&want.name, e))?;
            compare_stream(want, &info.config)
        }
        Err(e) if stream_missing(&e) => match js.create_stream(want.clone()).await {
            Ok(_) => Ok(()),
            Err(create) => {
                // Lost a creation race (then the winner's must match), or may not create.
                tracing::debug!(stream = %want.name, error = %create, "create failed, re-checking");
                match js.get_stream(&want.name).await {
                    Ok(mut s) => {
                        let info = s.info().await.map_err(|e| unavailable(&want.name, e))?;
                        compare_stream(want, &info.config)
                    }
                    Err(e) if stream_missing(&e) => {
                        Err(not_created(&want.name, create.to_string()))
                    }
                    // No answer at all (a cluster still electing its leaders, a node
                    // going away): JetStream is unavailable, not refusing.
                    Err(e) => Err(unavailable(&want.name, e)),
                }
            }
        },
        Err(e) => Err(unavailable(&want.name, e)),
    }
}

/// What one role's inbox stream must look like.
pub(crate) fn inbox_config(ns: &Namespace, c: &BusConfig, role: &Role) -> stream::Config {
    stream::Config {
        name: ns.stream_inbox(role),
        subjects: vec![ns.inbox_of_role(role)],
        retention: RetentionPolicy::WorkQueue,
        max_messages_per_subject: c.inbox_bound_of(role),
        discard: DiscardPolicy::New,
        discard_new_per_subject: true,
        duplicate_window: c.duplicate_window,
        storage: StorageType::File,
        num_replicas: c.replicas,
        max_consumers: 16,
        metadata: HashMap::from([(VERSION_KEY.to_owned(), TOPOLOGY_VERSION.to_owned())]),
        description: Some(format!("flotilla inboxes of role {role}")),
        ..Default::default()
    }
}

/// Creates or checks `role`'s inbox stream, and makes sure the advisories stream
/// captures its max-deliveries advisories. Run by every process that serves or
/// dispatches to the role.
pub async fn ensure_inbox(
    js: &jetstream::Context,
    ns: &Namespace,
    c: &BusConfig,
    role: &Role,
) -> Result<(), TopologyError> {
    let want = inbox_config(ns, c, role);
    waiting_for_placement(|| ensure_stream(js, &want)).await?;
    capture_max_deliveries(js, ns, &ns.stream_inbox(role)).await
}

/// Makes sure the advisories stream captures the max-deliveries advisories of
/// `stream`'s consumers, so the dead-letter mover sees a message they gave up on.
pub(crate) async fn capture_max_deliveries(
    js: &jetstream::Context,
    ns: &Namespace,
    stream: &str,
) -> Result<(), TopologyError> {
    let adv = ns.stream_advisories();
    let subject = ns.max_deliveries_advisory(stream);
    // Read-modify-write of the subject list: re-check after updating, since another
    // process may add its stream at the same moment.
    for _ in 0..10 {
        let mut s = js
            .get_stream(&adv)
            .await
            .map_err(|e| unavailable(&adv, e))?;
        let info = s.info().await.map_err(|e| unavailable(&adv, e))?;
        if info.config.subjects.contains(&subject) {
            return Ok(());
        }
        let mut config = info.config.clone();
        config.subjects.push(subject.clone());
        if let Err(e) = js.update_stream(config).await {
            tracing::debug!(error = %e, "advisories stream update raced, retrying");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(TopologyError::Unavailable {
        name: adv,
        source: format!("could not add {stream}'s advisory subject").into(),
    })
}

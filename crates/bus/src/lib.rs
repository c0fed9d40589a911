//! Flotilla's NATS layer: the only crate that talks to NATS directly.
//!
//! A [`Bus`] is one connection with its JetStream context, the [`Namespace`] every name
//! derives from, the typed KV buckets, and the process's message counters. The
//! connection and the context are private to this crate: other crates reach NATS
//! through the methods of [`Bus`], named for what they do (tests, with the
//! `test-support` feature, through `raw_client` and `raw_js`).
//!
//! # Layout
//! - [`config`]: [`BusConfig`], the connection and topology settings.
//! - [`topology`]: idempotent, versioned bootstrap of streams and buckets.
//! - [`publish`]: JetStream publish with `Nats-Msg-Id`, retry and backpressure; single
//!   publishes and `Nats-Incr` counter increments.
//! - [`signing`]: task signatures, so workers trust a task without reading its session.
//! - [`kv`]: typed records changed by compare-and-set; buckets by name, and writes with
//!   their own time to live.
//! - [`memory`]: sessions' shared memory (compare-and-set, merge, timed locks).
//! - [`delivery`]: a pulled message and what a handler does with it (ack, nak, dead-letter).
//! - [`consumer`]: the shared durable pull consumer of a role pool, and the pull loop.
//! - [`verdict`]: what a handler decided (ack, retry, dead-letter) and carrying it out.
//! - [`nats`]: core NATS: requests, subscriptions, answers, micro services, connection
//!   state.
//! - [`streams`]: streams by name: state, one message, deleting one, ordered replays.
//! - [`metrics`]: message counters.
//! - [`trace`]: span ids for W3C trace context.

pub mod config;
pub mod consumer;
pub mod delivery;
pub mod kv;
pub mod memory;
pub mod metrics;
pub mod nats;
pub mod publish;
pub mod signing;
pub mod streams;
pub mod topology;
pub mod trace;
pub mod verdict;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use flotilla_protocol::Namespace;

pub use config::{AuthMethod, BusConfig, NatsAuth, NatsTls};
pub use consumer::{ConsumerError, PoolConsumer, PoolOverrides, PoolSettings, opt_durations};
pub use delivery::{AckError, AckHandle, DeadLetter, Delivery};
pub use kv::{Applied, FencedWrite, KvError, Records, Start, Step, wrong_last_sequence};
pub use memory::{
    LockGuard, MemKey, Memory, MemoryConfig, MemoryError, MemoryStats, SessionMemory, Versioned,
};
pub use metrics::{Counters, CountersSnapshot};
pub use nats::{CoreError, RequestError};
pub use publish::{Outgoing, PublishError, Published, message_headers};
pub use signing::{SignatureError, Signed, SignedBatch, Signer, SignerRecord, Verifier};
pub use streams::{Replay, StreamError, StreamHandle};
pub use topology::TopologyError;
pub use verdict::{VerdictError, outlast, settle};

/// Connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The prefix is not a valid namespace.
    #[error(transparent)]
    Prefix(#[from] flotilla_protocol::subject::InvalidPrefix),
    /// The server could not be reached: check the URL, or start a server.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// `nats.url` is not a URL, or a comma-separated list of them.
    #[error("nats.url {url:?} is not a NATS URL or a comma-separated list of them: {detail}")]
    BadUrl {
        /// The configured value.
        url: String,
        /// Which part failed and why.
        detail: String,
    },
    /// The server refused these credentials, or they are misconfigured.
    #[error("NATS at {url} refused to authenticate this process: {detail}")]
    Auth {
        /// The URL.
        url: String,
        /// What went wrong, and what to check.
        detail: String,
    },
    /// The TLS handshake failed, or the TLS settings are unusable.
    #[error("TLS with NATS at {url} failed: {detail}")]
    Tls {
        /// The URL.
        url: String,
        /// What went wrong, and what to check.
        detail: String,
    },
    /// The topology does not match: see the error.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A bucket could not be opened.
    #[error("cannot open bucket {bucket}: {detail}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// The cause.
        detail: String,
    },
}

/// One process's handle on NATS. Cheap to clone: one pointer, so the futures that hold
/// one across a long model call stay small (its fields are in [`BusInner`]).
#[derive(Clone)]
pub struct Bus(Arc<BusInner>);

impl std::ops::Deref for Bus {
    type Target = BusInner;
    fn deref(&self) -> &BusInner {
        &self.0
    }
}

/// What a [`Bus`] holds.
pub struct BusInner {
    /// The core client (requests, core subscriptions): only this crate speaks NATS
    /// (other crates use the methods of [`Bus`]).
    pub(crate) client: async_nats::Client,
    /// The JetStream context.
    pub(crate) js: jetstream::Context,
    names: Namespace,
    config: Arc<BusConfig>,
    sessions: Records,
    slots: Records,
    limits: Records,
    agents: Records,
    memory: Memory,
    /// Message counters of this process.
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects as `name` (the connection name the server shows), bootstraps the
    /// topology, and opens the buckets.
    pub async fn connect(
        config: &BusConfig,
        name: &str,
        counters: Arc<Counters>,
    ) -> Result<Self, ConnectError> {
        let names = Namespace::new(&config.prefix)?;
        let client = connect_counted(config, name, Some(counters.clone())).await?;
        // Flush so a wrong URL fails here, not at the first publish.
        if let Err(e) = tokio::time::timeout(Duration::from_secs(10), client.flush()).await {
            tracing::warn!(error = %e, url = %config.url, "nats not reachable yet");
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .build(client.clone());
        topology::ensure(&js, &names, config).await?;
        let open = |bucket: String| {
            let js = js.clone();
            async move {
                js.get_key_value(&bucket)
                    .await
                    .map_err(|e| ConnectError::Bucket {
                        bucket: bucket.clone(),
                        detail: e.to_string(),
                    })
            }
        };
        let sessions = Records::new(
            open(names.bucket_sessions()).await?,
            js.clone(),
            config.max_payload,
        );
        let slots = Records::new(
            open(names.bucket_slots()).await?,
            js.clone(),
            config.max_payload,
        );
        let limits = Records::new(
            open(names.bucket_limits()).await?,
            js.clone(),
            config.max_payload,
        );
        let agents = Records::new(
            open(names.bucket_agents()).await?,
            js.clone(),
            config.max_payload,
        );
        let memory = Memory::open(&js, &names, config.memory.clone(), counters.clone())
            .await
            .map_err(|e| ConnectError::Bucket {
                bucket: names.bucket_memory(),
                detail: e.to_string(),
            })?;
        Ok(Self(Arc::new(BusInner {
            client,
            js,
            names,
            config: Arc::new(config.clone()),
            sessions,
            slots,
            limits,
            agents,
            memory,
            counters,
        })))
    }

    /// Like [`Bus::connect`], but waits with backoff and says so while the topology is
    /// missing and this process may not create it (an agent on a least-privilege user
    /// that started before `serve`), or while JetStream does not answer (a cluster
    /// still electing its stream leaders, a server restarting). Other errors (a wrong
    /// URL, refused credentials, a topology that disagrees) come back at once. `None`
    /// if `shutdown` comes first.
    pub async fn connect_patiently(
        config: &BusConfig,
        name: &str,
        counters: Arc<Counters>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Self>, ConnectError> {
        let backoff = flotilla_protocol::Backoff::exponential(
            Duration::from_millis(200),
            Duration::from_secs(10),
        )
        .with_jitter(flotilla_protocol::Jitter::Half);
        for retry in 0.. {
            match Self::connect(config, name, counters.clone()).await {
                Err(ConnectError::Topology(e @ TopologyError::Missing { .. })) => {
                    tracing::warn!(error = %e, "waiting for the topology");
                }
                Err(ConnectError::Topology(e @ TopologyError::Unavailable { .. })) => {
                    tracing::warn!(error = %e, retry, "jetstream not answering; retrying");
                }
                other => return other.map(Some),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff.delay(retry)) => {}
            }
        }
        Ok(None)
    }

    /// The raw core client, for tests only (that inspect or inject NATS traffic):
    /// with the `test-support` feature, which only tests enable.
    #[cfg(feature = "test-support")]
    pub fn raw_client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The raw JetStream context, for tests only (that inspect or inject NATS
    /// traffic): with the `test-support` feature, which only tests enable.
    #[cfg(feature = "test-support")]
    pub fn raw_js(&self) -> &jetstream::Context {
        &self.js
    }

    /// The namespace every name derives from.
    pub fn names(&self) -> &Namespace {
        &self.names
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Session and task records.
    pub fn sessions(&self) -> &Records {
        &self.sessions
    }

    /// Admission slots.
    pub fn slots(&self) -> &Records {
        &self.slots
    }

    /// The rate limiter's lease and windows, and token ledgers.
    pub fn limits(&self) -> &Records {
        &self.limits
    }

    /// Presence records, one per process (key: its agent id), expiring unless renewed.
    pub fn agents(&self) -> &Records {
        &self.agents
    }

    /// Shared memory (hand [`Memory::session`] handles to agents).
    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// Creates or checks `role`'s inbox stream (see [`topology::ensure_inbox`]).
    pub async fn ensure_inbox(&self, role: &flotilla_protocol::Role) -> Result<(), TopologyError> {
        topology::ensure_inbox(&self.js, &self.names, &self.config, role).await
    }

    /// True when `session`'s inbox of `role` holds a message (waiting, or delivered and
    /// not yet acknowledged): whatever was sent there is not lost.
    pub async fn inbox_holds(
        &self,
        session: &flotilla_protocol::SessionId,
        role: &flotilla_protocol::Role,
    ) -> Result<bool, TopologyError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let name = self.names.stream_inbox(role);
        let stream =
            self.js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| TopologyError::Unavailable {
                    name: name.clone(),
                    source: Box::new(e),
                })?;
        match stream
            .get_last_raw_message_by_subject(&self.names.inbox(session, role))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(TopologyError::Unavailable {
                name,
                source: Box::new(e),
            }),
        }
    }

    /// Messages waiting or unacknowledged in every role's inboxes (0 when quiet).
    pub async fn inbox_backlog(&self) -> Result<u64, TopologyError> {
        use futures::StreamExt;
        let prefix = self.names.stream_inbox_prefix();
        let unavailable =
            |name: &str, e: Box<dyn std::error::Error + Send + Sync>| TopologyError::Unavailable {
                name: name.to_owned(),
                source: e,
            };
        let mut names = self.js.stream_names();
        let mut total = 0;
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| unavailable(&prefix, Box::new(e)))?;
            if name.starts_with(&prefix) {
                let mut s = self
                    .js
                    .get_stream(&name)
                    .await
                    .map_err(|e| unavailable(&name, Box::new(e)))?;
                let info = s
                    .info()
                    .await
                    .map_err(|e| unavailable(&name, Box::new(e)))?;
                total += info.state.messages;
            }
        }
        Ok(total)
    }
}

/// The options every connection of this process uses: name, credentials, TLS, inbox
/// prefix, unbounded reconnects, and server errors (permission violations among
/// them) in the log.
async fn options(
    config: &BusConfig,
    name: &str,
    counters: Option<Arc<Counters>>,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    use config::AuthMethod;
    let url = || config.url.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(config.ping_interval)
        .max_reconnects(None)
        // Exponential with jitter, so a fleet does not reconnect in step.
        // (Called before every attempt, the first included: that one goes at once.)
        .reconnect_delay_callback(|attempts| {
            if attempts <= 1 {
                return Duration::ZERO;
            }
            flotilla_protocol::Backoff::exponential(
                Duration::from_millis(100),
                Duration::from_secs(8),
            )
            .with_jitter(flotilla_protocol::Jitter::Half)
            .delay((attempts - 2).min(32) as u32)
        })
        .custom_inbox_prefix(&config.inbox_prefix)
        .event_callback(move |event| {
            let counters = counters.clone();
            async move {
                match event {
                    async_nats::Event::ServerError(e) => {
                        match &counters {
                            Some(c) => c.server_errors.increment(),
                            None => ::metrics::counter!("flotilla_nats_server_errors_total")
                                .increment(1),
                        }
                        tracing::warn!(error = %e, "nats server error")
                    }
                    async_nats::Event::ClientError(e) => {
                        // Repeats at every reconnect attempt while the server is away.
                        tracing::debug!(error = %e, "nats client error")
                    }
                    // Also at every clean shutdown of the server: not a warning.
                    async_nats::Event::Disconnected => {
                        match &counters {
                            Some(c) => c.disconnects.increment(),
                            None => {
                                ::metrics::counter!("flotilla_nats_disconnects_total").increment(1)
                            }
                        }
                        tracing::info!("nats connection lost; reconnecting")
                    }
                    async_nats::Event::Connected => {
                        ::metrics::counter!("flotilla_nats_connects_total").increment(1);
                        tracing::info!("nats connected")
                    }
                    other => tracing::debug!(event = %other, "nats event"),
                }
            }
        });
    opts = match config
        .auth
        .method()
        .map_err(|detail| ConnectError::Auth { url: url(), detail })?
    {
        AuthMethod::None => opts,
        AuthMethod::UserPassword(u, p) => opts.user_and_password(u.to_owned(), p.to_owned()),
        AuthMethod::Token(t) => opts.token(t.to_owned()),
        AuthMethod::Nkey(seed) => opts.nkey(seed.to_owned()),
        AuthMethod::Creds(path) => {
            opts.credentials_file(path)
                .await
                .map_err(|e| ConnectError::Auth {
                    url: url(),
                    detail: format!("cannot read nats.auth.creds_file {}: {e}", path.display()),
                })?
        }
    };
    let tls = &config.tls;
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(ConnectError::Tls {
            url: url(),
            detail: "nats.tls.cert_file and nats.tls.key_file go together".into(),
        });
    }
    for path in [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .flatten()
    {
        if !path.is_file() {
            return Err(ConnectError::Tls {
                url: url(),
                detail: format!("{} is not a readable file", path.display()),
            });
        }
    }
    if let Some(ca) = &tls.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if tls.configured()
        || config
            .url
            .split(',')
            .any(|u| u.trim().starts_with("tls://"))
    {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// Connects: once straight away, so that refused credentials or a failed TLS
/// handshake are an error that says so; if the server is merely not up yet, the
/// connection keeps trying in the background (a process may start before its server).
pub async fn connect_client(
    config: &BusConfig,
    name: &str,
) -> Result<async_nats::Client, ConnectError> {
    connect_counted(config, name, None).await
}

async fn connect_counted(
    config: &BusConfig,
    name: &str,
    counters: Option<Arc<Counters>>,
) -> Result<async_nats::Client, ConnectError> {
    use async_nats::ConnectErrorKind as Kind;
    let url = config.url.as_str();
    // One or more servers: a comma-separated list (a cluster's nodes).
    let servers = server_addrs(url)?;
    match options(config, name, counters.clone())
        .await?
        .connect(servers.clone())
        .await
    {
        Ok(client) => Ok(client),
        Err(e) => match e.kind() {
            Kind::Authentication | Kind::AuthorizationViolation => Err(ConnectError::Auth {
                url: url.to_owned(),
                detail: format!(
                    "{e}; check nats.auth (user and password, token, nkey_seed or creds_file) against the server's accounts"
                ),
            }),
            Kind::Tls => Err(ConnectError::Tls {
                url: url.to_owned(),
                detail: format!("{e}; {TLS_HINT}"),
            }),
            Kind::ServerParse | Kind::Dns => Err(ConnectError::Connect {
                url: url.to_owned(),
                source: e,
            }),
            // A handshake the server's certificate failed can surface as an I/O error.
            Kind::Io if is_tls_failure(&e.to_string()) => Err(ConnectError::Tls {
                url: url.to_owned(),
                detail: format!("{e}; {TLS_HINT}"),
            }),
            Kind::TimedOut | Kind::Io | Kind::MaxReconnects => {
                tracing::warn!(error = %e, url, "nats not reachable yet; retrying in the background");
                options(config, name, counters)
                    .await?
                    .retry_on_initial_connect()
                    .connect(servers.clone())
                    .await
                    .map_err(|source| ConnectError::Connect {
                        url: url.to_owned(),
                        source,
                    })
            }
        },
    }
}

const TLS_HINT: &str = "check that nats.tls.ca_file is the CA that signed the server's certificate, and, if the server verifies clients, nats.tls.cert_file and key_file";

/// Whether an I/O error from connecting is a TLS failure (async-nats reports some
/// handshake failures, e.g. an unknown issuer, as I/O errors).
fn is_tls_failure(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("certificate") || m.contains("tls") || m.contains("handshake")
}

/// The servers of `nats.url`: one URL, or several separated by commas (a cluster's
/// nodes; the client picks one and fails over to the others).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse().map_err(|e| ConnectError::BadUrl {
                url: url.to_owned(),
                detail: format!("{u}: {e}"),
            })
        })
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err(ConnectError::BadUrl {
            url: url.to_owned(),
            detail: "no server".into(),
        });
    }
    Ok(servers)
}

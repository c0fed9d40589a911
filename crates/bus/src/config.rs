//! The bus's configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How to reach NATS and how the JetStream topology is shaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// NATS server URL(s): one, several comma-separated (a cluster's nodes), or, in a
    /// config file, a list of URLs.
    #[serde(deserialize_with = "one_or_many")]
    pub url: String,
    /// Namespace prefix of every subject, stream and bucket.
    pub prefix: String,
    /// Stream and bucket replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// Messages one worker inbox (`<p>.s.<sid>.in.<role>`) may hold before publishes to
    /// it are refused (backpressure). Delivered but unacknowledged messages count.
    pub inbox_bound: i64,
    /// The same for each session's orchestrator inbox; must exceed the tasks a session
    /// has in flight, since the start and a person's answer to each of them may wait
    /// there at once (results do not: a task's commit is its result).
    pub orchestrator_inbox_bound: i64,
    /// Per-role inbox bounds, replacing `inbox_bound` for those roles.
    pub role_inbox_bounds: std::collections::BTreeMap<flotilla_protocol::Role, i64>,
    /// Submissions the durable submit queue may hold before publishes are refused.
    pub submit_queue_max: i64,
    /// How long session events are kept.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// How long session and task records are kept.
    #[serde(with = "humantime_serde")]
    pub records_max_age: Duration,
    /// JetStream de-duplication window; must cover ack wait x max deliver.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Largest message payload accepted from the bus, in bytes.
    pub max_payload: usize,
    /// How long to wait for one publish acknowledgement.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Publish attempts (same message id) before giving up.
    pub publish_attempts: u32,
    /// How often the client pings its server; two unanswered pings end the connection
    /// and it reconnects (to another node of a cluster). A frozen or partitioned node
    /// keeps its TCP connections open, so this is how long its clients stay with it:
    /// about two to three intervals.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Shared memory limits and the session template's declared keys.
    pub memory: crate::memory::MemoryConfig,
    /// Who this process is to the server (none: an open server).
    pub auth: NatsAuth,
    /// TLS: the CA to trust and this process's certificate (mutual TLS).
    pub tls: NatsTls,
    /// Subject prefix of this process's reply inboxes. Give each user its own
    /// (`_INBOX_<user>`) so server permissions can keep users from reading each
    /// other's replies (pull deliveries arrive on reply inboxes too).
    pub inbox_prefix: String,
}

/// Credentials: at most one of user and password, a token, an nkey seed, or a
/// `.creds` file (a user JWT with its nkey seed).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsAuth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// A token.
    pub token: Option<String>,
    /// An nkey seed (`SU...`): the server knows the public key.
    pub nkey_seed: Option<String>,
    /// A `.creds` file (decentralized JWT authentication).
    pub creds_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log line.
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("nkey_seed", &hidden(&self.nkey_seed))
            .field("creds_file", &self.creds_file)
            .finish()
    }
}

impl NatsAuth {
    /// Which method is configured; an error names the conflict or the missing half.
    pub fn method(&self) -> Result<AuthMethod<'_>, String> {
        let mut methods = Vec::new();
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => methods.push(AuthMethod::UserPassword(u, p)),
            (None, None) => {}
            _ => return Err("nats.auth.user and nats.auth.password go together".into()),
        }
        if let Some(t) = &self.token {
            methods.push(AuthMethod::Token(t));
        }
        if let Some(s) = &self.nkey_seed {
            methods.push(AuthMethod::Nkey(s));
        }
        if let Some(c) = &self.creds_file {
            methods.push(AuthMethod::Creds(c));
        }
        match methods.len() {
            0 => Ok(AuthMethod::None),
            1 => Ok(methods.remove(0)),
            _ => Err(
                "configure one of nats.auth user/password, token, nkey_seed or creds_file".into(),
            ),
        }
    }
}

/// One way to authenticate (see [`NatsAuth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod<'a> {
    /// No credentials.
    None,
    /// User and password.
    UserPassword(&'a str, &'a str),
    /// A token.
    Token(&'a str),
    /// An nkey seed.
    Nkey(&'a str),
    /// A `.creds` file.
    Creds(&'a std::path::Path),
}

/// TLS settings. A `tls://` URL, or any of these set, makes the connection require TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTls {
    /// PEM file of the CA(s) that signed the server's certificate (default: the
    /// system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM file of this process's certificate, for servers that verify clients.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file of that certificate's private key.
    pub key_file: Option<std::path::PathBuf>,
}

impl NatsTls {
    /// Whether any TLS setting is given.
    pub fn configured(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            prefix: "flotilla".to_owned(),
            replicas: 1,
            inbox_bound: 8,
            orchestrator_inbox_bound: 64,
            role_inbox_bounds: std::collections::BTreeMap::new(),
            submit_queue_max: 100_000,
            events_max_age: Duration::from_secs(24 * 3600),
            records_max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            max_payload: flotilla_protocol::DEFAULT_MAX_PAYLOAD,
            publish_timeout: Duration::from_secs(5),
            publish_attempts: 6,
            ping_interval: Duration::from_secs(10),
            memory: crate::memory::MemoryConfig::default(),
            auth: NatsAuth::default(),
            tls: NatsTls::default(),
            inbox_prefix: "_INBOX".to_owned(),
        }
    }
}

impl BusConfig {
    /// The inbox bound of `role`.
    pub fn inbox_bound_of(&self, role: &flotilla_protocol::Role) -> i64 {
        if role.is_orchestrator() {
            self.orchestrator_inbox_bound
        } else {
            self.role_inbox_bounds
                .get(role)
                .copied()
                .unwrap_or(self.inbox_bound)
        }
    }
}

/// A URL, or a list of URLs joined with commas.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Urls::deserialize(d)? {
        Urls::One(u) => u,
        Urls::Many(v) => v.join(","),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_one_or_a_list() {
        let one: BusConfig =
            serde_json::from_str(r#"{"url": "nats://a:4222,nats://b:4222"}"#).unwrap_or_default();
        assert_eq!(one.url, "nats://a:4222,nats://b:4222");
        let many: BusConfig =
            serde_json::from_str(r#"{"url": ["nats://a:4222", "nats://b:4222"]}"#)
                .unwrap_or_default();
        assert_eq!(many.url, "nats://a:4222,nats://b:4222");
        assert_eq!(
            crate::server_addrs(&many.url).map(|v| v.len()).ok(),
            Some(2)
        );
        assert!(crate::server_addrs("nats://a:4222,::nonsense::").is_err());
        assert!(crate::server_addrs(" , ").is_err());
    }
}

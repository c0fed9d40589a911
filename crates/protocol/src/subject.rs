//! Every subject, stream and bucket name Flotilla uses, built and parsed here only.
//!
//! A [`Namespace`] is a validated prefix (default `flotilla`). All names derive from
//! it, so two deployments with different prefixes share a NATS account without
//! seeing each other.
//!
//! | subject | meaning |
//! |---|---|
//! | `<p>.session.open` | admission service endpoint (request/reply) |
//! | `<p>.submit` | durable submissions (stream `<P>_SUBMIT`) |
//! | `<p>.s.<sid>.in.<role>` | an agent's inbox (stream `<P>_INBOX`) |
//! | `<p>.s.<sid>.ev.<kind>` | a session's event log (stream `<P>_EVENTS`) |
//! | `<p>.dlq.<stream>.<reason>` | dead letters (stream `<P>_DLQ`) |
//! | `<p>.tool.<name>` | a tool's endpoint (NATS micro service `<p>-tool-<name>`) |

use std::fmt;

use crate::event::EventKindName;
use crate::ids::{InvalidId, Role, SessionId};
use crate::tool::ToolName;

/// A subject could not be parsed as one of Flotilla's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The subject does not start with this namespace's prefix or has an unknown shape.
    #[error("subject {0:?} is not a flotilla subject of this namespace")]
    Foreign(String),
    /// The shape is right but a token is not a valid id.
    #[error("subject {subject:?} has an invalid token: {source}")]
    BadToken {
        /// The subject.
        subject: String,
        /// The id error.
        #[source]
        source: InvalidId,
    },
    /// The event kind token is unknown.
    #[error("subject {0:?} names an unknown event kind")]
    UnknownEvent(String),
}

/// The prefix was not a valid subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid namespace prefix {0:?}: use 1-32 characters of a-z, 0-9, '_' or '-', starting with a letter"
)]
pub struct InvalidPrefix(pub String);

/// A parsed Flotilla subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedSubject {
    /// `<p>.session.open`
    SessionOpen,
    /// `<p>.session.cancel`
    SessionCancel,
    /// `<p>.session.answer`
    SessionAnswer,
    /// `<p>.ctl.stop`
    CtlStop,
    /// `<p>.submit`
    Submit,
    /// `<p>.s.<sid>.in.<role>`
    Inbox {
        /// Session.
        session: SessionId,
        /// Role whose inbox it is.
        role: Role,
    },
    /// `<p>.s.<sid>.ev.<kind>`
    Event {
        /// Session.
        session: SessionId,
        /// Event kind.
        kind: EventKindName,
    },
}

/// The validated prefix from which every name derives.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    prefix: String,
    upper: String,
}

impl Default for Namespace {
    fn default() -> Self {
        Self {
            prefix: "flotilla".to_owned(),
            upper: "FLOTILLA".to_owned(),
        }
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({})", self.prefix)
    }
}

impl Namespace {
    /// Validates `prefix` (`[a-z][a-z0-9_-]{0,31}`).
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(InvalidPrefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            upper: prefix.to_ascii_uppercase().replace('-', "_"),
        })
    }

    /// The prefix, e.g. `flotilla`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ---- subjects -------------------------------------------------------------

    /// Admission endpoint: `<p>.session.open`.
    pub fn session_open(&self) -> String {
        format!("{}.session.open", self.prefix)
    }

    /// Cancel requests: `<p>.session.cancel` (request/reply, [`crate::CancelSession`]).
    pub fn session_cancel(&self) -> String {
        format!("{}.session.cancel", self.prefix)
    }

    /// A person's answers to tasks' questions: `<p>.session.answer` (request/reply,
    /// [`crate::AnswerInput`]).
    pub fn session_answer(&self) -> String {
        format!("{}.session.answer", self.prefix)
    }

    /// The fleet-wide stop notice for an ended session: `<p>.ctl.stop`
    /// ([`crate::StopSession`], answered by every process with a [`crate::StopAck`]).
    pub fn ctl_stop(&self) -> String {
        format!("{}.ctl.stop", self.prefix)
    }

    /// Durable submissions: `<p>.submit`.
    pub fn submit(&self) -> String {
        format!("{}.submit", self.prefix)
    }

    /// One agent's inbox: `<p>.s.<sid>.in.<role>`.
    pub fn inbox(&self, session: &SessionId, role: &Role) -> String {
        format!("{}.s.{session}.in.{role}", self.prefix)
    }

    /// All inboxes of one role across sessions (a role pool's consumer filter).
    pub fn inbox_of_role(&self, role: &Role) -> String {
        format!("{}.s.*.in.{role}", self.prefix)
    }

    /// Every inbox of every role (for monitoring; each role's inboxes live in the
    /// role's own stream, [`Namespace::stream_inbox`]).
    pub fn inbox_all(&self) -> String {
        format!("{}.s.*.in.*", self.prefix)
    }

    /// One event of a session: `<p>.s.<sid>.ev.<kind>`.
    pub fn event(&self, session: &SessionId, kind: EventKindName) -> String {
        format!("{}.s.{session}.ev.{}", self.prefix, kind.as_str())
    }

    /// Every event of one session.
    pub fn events_of(&self, session: &SessionId) -> String {
        format!("{}.s.{session}.ev.>", self.prefix)
    }

    /// Every event of every session (the events stream's subject).
    pub fn events_all(&self) -> String {
        format!("{}.s.*.ev.>", self.prefix)
    }

    /// The `done` event of every session.
    pub fn done_all(&self) -> String {
        format!("{}.s.*.ev.{}", self.prefix, EventKindName::Done.as_str())
    }

    /// Dead letters (the DLQ stream's subject).
    pub fn dlq_all(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    /// One dead letter's subject: `<p>.dlq.<stream>.<code>`.
    pub fn dlq(&self, stream: &str, code: &str) -> String {
        format!("{}.dlq.{stream}.{code}", self.prefix)
    }

    /// The server's advisory when a message of `stream` exhausts its deliveries.
    pub fn max_deliveries_advisory(&self, stream: &str) -> String {
        format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*")
    }

    // ---- streams, consumers, buckets -------------------------------------------

    /// Stream of durable submissions.
    pub fn stream_submit(&self) -> String {
        format!("{}_SUBMIT", self.upper)
    }
    /// The stream of one role's inboxes, `<P>_INBOX_<role>`: each role has its own, so
    /// each has its own inbox bound and a flood for one role never fills another's.
    pub fn stream_inbox(&self, role: &Role) -> String {
        format!("{}_INBOX_{role}", self.upper)
    }
    /// The common prefix of every role's inbox stream.
    pub fn stream_inbox_prefix(&self) -> String {
        format!("{}_INBOX_", self.upper)
    }
    /// Stream of session events.
    pub fn stream_events(&self) -> String {
        format!("{}_EVENTS", self.upper)
    }
    /// Stream of dead letters.
    pub fn stream_dlq(&self) -> String {
        format!("{}_DLQ", self.upper)
    }
    /// Stream of the session token ledgers (JetStream counters).
    pub fn stream_spend(&self) -> String {
        format!("{}_SPEND", self.upper)
    }
    /// Every session token ledger's subject.
    pub fn spend_all(&self) -> String {
        format!("{}.spend.>", self.prefix)
    }
    /// The token ledger counter of one session: `<p>.spend.s.<sid>`.
    pub fn spend(&self, session: &SessionId) -> String {
        format!("{}.spend.s.{session}", self.prefix)
    }
    /// Stream capturing the server's max-deliveries advisories for our work queues.
    pub fn stream_advisories(&self) -> String {
        format!("{}_ADVISORIES", self.upper)
    }
    /// The durable consumer of the advisories stream (the dead-letter mover).
    pub fn dlq_mover_consumer(&self) -> String {
        "dlq-mover".to_owned()
    }
    /// The durable consumer shared by a role pool.
    pub fn role_consumer(&self, role: &Role) -> String {
        format!("role-{role}")
    }
    /// The durable consumer of committed task records (`$KV.<p>-sessions.*.t.>`), shared
    /// by every `serve`'s orchestrator: a commit is a task's result.
    pub fn commits_consumer(&self) -> String {
        "orchestrator-commits".to_owned()
    }
    /// The stream behind the sessions bucket.
    pub fn stream_sessions(&self) -> String {
        format!("KV_{}", self.bucket_sessions())
    }
    /// The subject of a key of the sessions bucket.
    pub fn sessions_key_subject(&self, key: &str) -> String {
        format!("$KV.{}.{key}", self.bucket_sessions())
    }
    /// The durable consumer of the submit queue, shared by every `serve`.
    pub fn submit_consumer(&self) -> String {
        "admission".to_owned()
    }
    /// KV bucket of session and task records.
    pub fn bucket_sessions(&self) -> String {
        format!("{}-sessions", self.prefix)
    }
    /// KV bucket of sessions' shared memory (keys `<sid>.<key>`).
    pub fn bucket_memory(&self) -> String {
        format!("{}-memory", self.prefix)
    }
    /// KV bucket of timed locks (keys `<sid>.<lock>`, per-key TTL).
    pub fn bucket_locks(&self) -> String {
        format!("{}-locks", self.prefix)
    }
    /// KV bucket of process presence (key = agent id, per-key TTL).
    pub fn bucket_agents(&self) -> String {
        format!("{}-agents", self.prefix)
    }
    /// The subject a process answers pings on while connected.
    pub fn agent_ping(&self, agent: &crate::ids::AgentId) -> String {
        format!("{}.agent.{agent}.ping", self.prefix)
    }
    /// KV bucket of admission slots.
    pub fn bucket_slots(&self) -> String {
        format!("{}-slots", self.prefix)
    }
    /// KV bucket of the rate limiter's leader lease and window snapshots, and of
    /// token spend (keys `spend.global`, `spend.s.<sid>`).
    pub fn bucket_limits(&self) -> String {
        format!("{}-limits", self.prefix)
    }
    /// The limiter leader's permit endpoint.
    pub fn limits_acquire(&self) -> String {
        format!("{}.limits.acquire", self.prefix)
    }
    /// The limiter leader's settlement endpoint.
    pub fn limits_settle(&self) -> String {
        format!("{}.limits.settle", self.prefix)
    }
    /// NATS micro service name of the rate limiter (only the leader serves it).
    pub fn limits_service_name(&self) -> String {
        format!("{}-limits", self.prefix)
    }
    /// NATS micro service name of the admission service.
    pub fn service_name(&self) -> String {
        format!("{}-admission", self.prefix)
    }
    /// A tool's endpoint: `<p>.tool.<name>`.
    pub fn tool(&self, name: &ToolName) -> String {
        format!("{}.tool.{name}", self.prefix)
    }
    /// Every tool's endpoint: `<p>.tool.*`.
    pub fn tools_all(&self) -> String {
        format!("{}.tool.*", self.prefix)
    }
    /// NATS micro service name of a tool: `<p>-tool-<name>`.
    pub fn tool_service_name(&self, name: &ToolName) -> String {
        format!("{}-tool-{name}", self.prefix)
    }
    /// KV bucket of tool results: deterministic tools' cached results (keys
    /// `t.<hash>`) and side-effecting calls' recorded results (keys `i.<hash>`), each
    /// with its own TTL.
    pub fn bucket_cache(&self) -> String {
        format!("{}-cache", self.prefix)
    }

    // ---- parsing ----------------------------------------------------------------

    /// Parses any subject built by this namespace.
    pub fn parse(&self, subject: &str) -> Result<ParsedSubject, SubjectError> {
        let foreign = || SubjectError::Foreign(subject.to_owned());
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(foreign)?;
        let tokens: Vec<&str> = rest.split('.').collect();
        let bad = |source| SubjectError::BadToken {
            subject: subject.to_owned(),
            source,
        };
        match tokens.as_slice() {
            ["session", "open"] => Ok(ParsedSubject::SessionOpen),
            ["session", "cancel"] => Ok(ParsedSubject::SessionCancel),
            ["session", "answer"] => Ok(ParsedSubject::SessionAnswer),
            ["ctl", "stop"] => Ok(ParsedSubject::CtlStop),
            ["submit"] => Ok(ParsedSubject::Submit),
            ["s", sid, "in", role] => Ok(ParsedSubject::Inbox {
                session: SessionId::parse(*sid).map_err(bad)?,
                role: Role::parse(*role).map_err(bad)?,
            }),
            ["s", sid, "ev", kind] => Ok(ParsedSubject::Event {
                session: SessionId::parse(*sid).map_err(bad)?,
                kind: EventKindName::parse(kind)
                    .ok_or_else(|| SubjectError::UnknownEvent(subject.to_owned()))?,
            }),
            _ => Err(foreign()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sid() -> impl Strategy<Value = SessionId> {
        "[A-Za-z0-9_-]{1,64}".prop_map(|s| SessionId::parse(s).unwrap())
    }
    fn role() -> impl Strategy<Value = Role> {
        "[a-z][a-z0-9_-]{0,31}".prop_map(|s| Role::parse(s).unwrap())
    }
    fn ns() -> impl Strategy<Value = Namespace> {
        "[a-z][a-z0-9_-]{0,31}".prop_map(|s| Namespace::new(&s).unwrap())
    }

    proptest! {
        #[test]
        fn inbox_round_trips(ns in ns(), s in sid(), r in role()) {
            let subject = ns.inbox(&s, &r);
            prop_assert_eq!(ns.parse(&subject).unwrap(), ParsedSubject::Inbox { session: s, role: r });
        }

        #[test]
        fn event_round_trips(ns in ns(), s in sid(), k in proptest::sample::select(EventKindName::ALL.to_vec())) {
            let subject = ns.event(&s, k);
            prop_assert_eq!(ns.parse(&subject).unwrap(), ParsedSubject::Event { session: s, kind: k });
        }

        #[test]
        fn foreign_prefix_never_parses(s in sid(), r in role()) {
            let a = Namespace::new("alpha").unwrap();
            let b = Namespace::new("alphab").unwrap();
            prop_assert!(a.parse(&b.inbox(&s, &r)).is_err());
        }

        #[test]
        fn arbitrary_strings_never_panic(subject in ".{0,100}") {
            let _ = Namespace::default().parse(&subject);
        }
    }

    #[test]
    fn fixed_subjects() {
        let ns = Namespace::default();
        assert_eq!(
            ns.parse("flotilla.session.open").unwrap(),
            ParsedSubject::SessionOpen
        );
        assert_eq!(ns.parse("flotilla.submit").unwrap(), ParsedSubject::Submit);
        assert!(ns.parse("flotilla.s.a.b.in.research").is_err());
        assert!(ns.parse("flotilla.s.abc.in.Research").is_err());
        assert!(Namespace::new("Flotilla").is_err());
        assert_eq!(
            Namespace::new("my-app")
                .unwrap()
                .stream_inbox(&Role::parse("research").unwrap()),
            "MY_APP_INBOX_research"
        );
        let tool = ToolName::parse("py-upper").unwrap();
        assert_eq!(ns.tool(&tool), "flotilla.tool.py-upper");
        assert_eq!(ns.tool_service_name(&tool), "flotilla-tool-py-upper");
        assert_eq!(ns.bucket_cache(), "flotilla-cache");
    }
}

/// KV keys in the sessions and slots buckets (built here so keys and subjects share
/// one module).
pub mod keys {
    use crate::ids::{Role, SessionId, TaskId};

    /// The session record: `<sid>`.
    pub fn session(session: &SessionId) -> String {
        session.as_str().to_owned()
    }

    /// An agent's conversation on a task: `<sid>.h.<role>.<task>`. The role token
    /// lets server permissions give each role's agents only their own keys.
    pub fn history(session: &SessionId, role: &Role, task: &TaskId) -> String {
        format!("{session}.h.{role}.{task}")
    }

    /// A task's committed record: `<sid>.t.<role>.<task>` (the role token: as for
    /// [`history`]). Written once per attempt, by its holder's commit (fenced on the
    /// claim at [`claim`]); the orchestrator follows these as its results.
    pub fn task(session: &SessionId, role: &Role, task: &TaskId) -> String {
        format!("{session}.t.{role}.{task}")
    }

    /// A task's claim: `<sid>.c.<role>.<task>`, the running attempt and its holder,
    /// changed by compare-and-set (claim, take-over, the watchdog's fence).
    pub fn claim(session: &SessionId, role: &Role, task: &TaskId) -> String {
        format!("{session}.c.{role}.{task}")
    }

    /// Every committed task record of a session: `<sid>.t.>`.
    pub fn task_pattern(session: &SessionId) -> String {
        format!("{session}.t.>")
    }

    /// Every claim of a session: `<sid>.c.>`.
    pub fn claim_pattern(session: &SessionId) -> String {
        format!("{session}.c.>")
    }

    /// Every committed task record of every session: `*.t.>`.
    pub const ALL_TASKS: &str = "*.t.>";

    /// Every claim of every session (for the watchdog): `*.c.>`.
    pub const ALL_CLAIMS: &str = "*.c.>";

    /// The session, role and task of a claim key (`<sid>.c.<role>.<task>`), `None` for
    /// any other key.
    pub fn parse_claim(key: &str) -> Option<(SessionId, Role, TaskId)> {
        let (session, rest) = key.split_once('.')?;
        let (role, task) = rest.strip_prefix("c.")?.split_once('.')?;
        Some((
            SessionId::parse(session).ok()?,
            Role::parse(role).ok()?,
            TaskId::parse(task).ok()?,
        ))
    }

    /// The claim key of a committed record's key (`<sid>.t.<role>.<task>` ->
    /// `<sid>.c.<role>.<task>`), `None` for any other key.
    pub fn claim_of_commit(key: &str) -> Option<String> {
        let (session, rest) = key.split_once('.')?;
        let rest = rest.strip_prefix("t.")?;
        (rest.split('.').count() == 2).then(|| format!("{session}.c.{rest}"))
    }

    /// An admission slot: `slot.<n>`.
    pub fn slot(n: u32) -> String {
        format!("slot.{n}")
    }

    /// A shared-memory key of a session: `<sid>.<key>` (`key` is one token).
    pub fn memory(session: &SessionId, key: &str) -> String {
        format!("{session}.{key}")
    }

    /// A deterministic tool's cached result in the cache bucket: `t.<hash>`.
    pub fn tool_result(hash: &str) -> String {
        format!("t.{hash}")
    }

    /// A side-effecting tool call's recorded result in the cache bucket: `i.<hash>`
    /// (the hash is its idempotency key).
    pub fn tool_effect(hash: &str) -> String {
        format!("i.{hash}")
    }

    /// Parses an admission slot key.
    pub fn parse_slot(key: &str) -> Option<u32> {
        key.strip_prefix("slot.")?.parse().ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod key_tests {
    use super::keys;
    use crate::ids::{Role, SessionId, TaskId};

    #[test]
    fn a_claim_key_parses_back_and_a_commit_names_its_claim() {
        let (s, r, t) = (
            SessionId::generate(),
            Role::parse("research").unwrap(),
            TaskId::nth(3),
        );
        let claim = keys::claim(&s, &r, &t);
        assert_eq!(
            keys::parse_claim(&claim),
            Some((s.clone(), r.clone(), t.clone()))
        );
        assert_eq!(keys::claim_of_commit(&keys::task(&s, &r, &t)), Some(claim));
        for other in [
            keys::task(&s, &r, &t),
            keys::session(&s),
            format!("{s}.c.research"),
            format!("{s}.c.Research.t1"),
            "a.c.b.c.d".to_owned(),
        ] {
            assert_eq!(keys::parse_claim(&other), None, "{other}");
        }
    }
}

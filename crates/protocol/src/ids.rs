//! Typed identifiers.
//!
//! Every id that reaches a subject or a KV key is validated on construction and on
//! deserialization, so a value of one of these types is always safe to put in a
//! subject token: no dots, no wildcards, no whitespace.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

/// An identifier was empty, too long, or contained a character that cannot go in a
/// subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {why}")]
pub struct InvalidId {
    /// Which kind of id was being parsed.
    pub kind: &'static str,
    /// The rejected input (truncated to 80 characters).
    pub value: String,
    /// What rule it broke.
    pub why: &'static str,
}

fn check(
    kind: &'static str,
    s: &str,
    max: usize,
    first_lower_alpha: bool,
) -> Result<(), InvalidId> {
    let fail = |why| InvalidId {
        kind,
        value: s.chars().take(80).collect(),
        why,
    };
    if s.is_empty() {
        return Err(fail("empty"));
    }
    if s.len() > max {
        return Err(fail("too long"));
    }
    if first_lower_alpha {
        if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(fail("must start with a lowercase letter"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(fail("only a-z, 0-9, '_' and '-' are allowed"));
        }
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(fail("only A-Z, a-z, 0-9, '_' and '-' are allowed"));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $lower:expr, $pattern:literal) => {
        $(#[$doc])*
        ///
        /// Up to 23 bytes it is held inline; a longer one (a UUID session id) is one
        /// shared allocation, so a clone never allocates.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(SmolStr);

        impl $name {
            /// Validates and wraps `s`.
            pub fn parse(s: impl AsRef<str>) -> Result<Self, InvalidId> {
                let s = s.as_ref();
                check($kind, s, $max, $lower)?;
                Ok(Self(SmolStr::new(s)))
            }

            /// The id as a string slice (always a valid subject token).
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.into()
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a ", $kind))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $max,
                    "pattern": $pattern,
                })
            }
        }
    };
}

id_type!(
    /// A session: one user task with its orchestrator, workers and shared memory.
    /// 1-64 characters of `A-Z a-z 0-9 _ -`.
    SessionId, "session id", 64, false, "^[A-Za-z0-9_-]{1,64}$"
);
id_type!(
    /// A task inside a session (`t1`, `t2`, ...). 1-32 characters of `A-Z a-z 0-9 _ -`.
    TaskId, "task id", 32, false, "^[A-Za-z0-9_-]{1,32}$"
);
id_type!(
    /// An agent role (`orchestrator`, `research`, ...): 1-32 characters, lowercase letter first,
    /// then `a-z 0-9 _ -`.
    Role, "role", 32, true, "^[a-z][a-z0-9_-]{0,31}$"
);
id_type!(
    /// A tool's name (`<p>.tool.<name>`): 1-64 characters, a lowercase letter first, then
    /// `a-z 0-9 _ -`, so it is safe in a subject token and a service name.
    ToolName, "tool name", 64, true, "^[a-z][a-z0-9_-]{0,63}$"
);
id_type!(
    /// A process's identity on the bus (its presence key and connection name).
    AgentId, "agent id", 64, false, "^[A-Za-z0-9_-]{1,64}$"
);

impl SessionId {
    /// A fresh, globally unique session id: a UUIDv7 (time-ordered, so ids sort by
    /// creation time and listings can go newest first without reading records).
    pub fn generate() -> Self {
        Self(SmolStr::new(uuid::Uuid::now_v7().to_string()))
    }

    /// When the session id was generated, ms since the Unix epoch, if it is a UUIDv7
    /// (client-chosen ids are not).
    pub fn created_ms(&self) -> Option<u64> {
        let u = uuid::Uuid::parse_str(&self.0).ok()?;
        if u.get_version_num() != 7 {
            return None;
        }
        let (secs, nanos) = u.get_timestamp()?.to_unix();
        Some(secs * 1000 + u64::from(nanos) / 1_000_000)
    }
}

impl TaskId {
    /// The conventional id of the `n`th task (1-based) of a plan: `t1`, `t2`, ...
    pub fn nth(n: usize) -> Self {
        Self(smol_str::format_smolstr!("t{n}"))
    }
}

impl AgentId {
    /// A fresh agent id for a process serving `role`: `<role>-<nuid>`.
    pub fn generate(role: &Role) -> Self {
        Self(smol_str::format_smolstr!(
            "{}-{}",
            role.as_str(),
            nuid::next()
        ))
    }
}

impl Role {
    /// The role served by `flotilla serve`.
    pub fn orchestrator() -> Self {
        Self(SmolStr::new_static("orchestrator"))
    }

    /// True for the orchestrator role.
    pub fn is_orchestrator(&self) -> bool {
        self.0 == "orchestrator"
    }
}

/// A message id: the `Nats-Msg-Id` header, unique per logical message, so the server
/// drops a re-publish inside its duplicate window. Built from typed parts only.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct MessageId(String);

impl MessageId {
    /// The one `start` message of a session.
    pub fn start(session: &SessionId) -> Self {
        Self(format!("{session}.start"))
    }

    /// The dispatch of one attempt of a task.
    pub fn task(session: &SessionId, task: &TaskId, attempt: u32) -> Self {
        Self(format!("{session}.{task}.{attempt}.task"))
    }

    /// The result notification of one attempt of a task.
    pub fn result(session: &SessionId, task: &TaskId, attempt: u32) -> Self {
        Self(format!("{session}.{task}.{attempt}.result"))
    }

    /// The commit of one attempt of a task (its record at `<sid>.t.<role>.<task>`): a
    /// commit retried after an unanswered try is stored once.
    pub fn commit(session: &SessionId, task: &TaskId, attempt: u32) -> Self {
        Self(format!("{session}.{task}.{attempt}.commit"))
    }

    /// The answer to the question of `task`'s `attempt` (a person's, or the timeout's:
    /// the same id, so only the first is stored).
    pub fn input(session: &SessionId, task: &TaskId, attempt: u32) -> Self {
        Self(format!("{session}.{task}.{attempt}.input"))
    }

    /// An event of a session; `discriminator` makes it unique within the session.
    pub fn event(session: &SessionId, discriminator: &str) -> Self {
        Self(format!("{session}.ev.{discriminator}"))
    }

    /// A submission on the durable submit queue.
    pub fn submit(session: &SessionId) -> Self {
        Self(format!("{session}.submit"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_subject_metacharacters() {
        for bad in ["", "a.b", "a*", ">", "a b", "é", &"x".repeat(65)] {
            assert!(SessionId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Role::parse("Research").is_err());
        assert!(Role::parse("1abc").is_err());
        assert!(Role::parse("research").is_ok());
    }

    #[test]
    fn generated_session_ids_are_uuidv7_and_sort_by_creation() {
        let a = SessionId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = SessionId::generate();
        assert_eq!(a.as_str().len(), 36);
        assert!(SessionId::parse(a.as_str()).is_ok());
        assert!(a.as_str() < b.as_str(), "{a} then {b}");
        let now = crate::epoch_ms(std::time::SystemTime::now());
        let made = b.created_ms().unwrap();
        assert!(made <= now && now - made < 60_000, "{made} vs {now}");
        assert_eq!(SessionId::parse("my-id-123").unwrap().created_ms(), None);
    }

    #[test]
    fn serde_validates() {
        let r: Result<SessionId, _> = serde_json::from_str("\"a.b\"");
        assert!(r.is_err());
        let ok: SessionId = serde_json::from_str("\"abc_D-1\"").unwrap();
        assert_eq!(ok.as_str(), "abc_D-1");
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        SessionId::parse(a.as_str()).unwrap();
        AgentId::parse(AgentId::generate(&Role::orchestrator()).as_str()).unwrap();
    }
}

//! Typed records in a KV bucket, changed only by compare-and-set on the key's revision.

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use bytes::Bytes;
use flotilla_protocol::{DecodeError, decode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A KV operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The key changed since the revision given: re-read and re-apply.
    #[error("{key} changed since the revision read")]
    Conflict {
        /// The key.
        key: String,
    },
    /// `create` on a key that exists.
    #[error("{key} already exists")]
    Exists {
        /// The key.
        key: String,
    },
    /// The stored value does not decode: the record is corrupt or of another version.
    #[error("{key} holds an undecodable record: {source}")]
    Corrupt {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: DecodeError,
    },
    /// The bucket could not be reached: retry later.
    #[error("kv request for {key} failed: {source}")]
    Unavailable {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl KvError {
    fn unavailable(key: &str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        KvError::Unavailable {
            key: key.to_owned(),
            source: Box::new(e),
        }
    }
}

/// What a transition function decided about the value it was shown.
#[derive(Debug)]
pub enum Step<T, R> {
    /// Write this value (compare-and-set on the revision read, or create if absent),
    /// and report `R`.
    Write(T, R),
    /// Write nothing; report `R`.
    Keep(R),
}

/// Where [`Records::transition`] starts.
#[derive(Debug)]
pub enum Start<T> {
    /// Read the key first.
    Read,
    /// Assume the key is absent and try a create (one round trip when right; on
    /// "exists" it reads and goes on).
    Absent,
    /// The value and revision the caller holds (one round trip when still current).
    Known(T, u64),
}

/// How a transition ended.
#[derive(Debug)]
pub enum Applied<R> {
    /// The value was written at `revision`.
    Written {
        /// What the function reported.
        value: R,
        /// The new revision.
        revision: u64,
    },
    /// The function chose to write nothing.
    Kept(R),
    /// Every round lost to a concurrent writer.
    Contended,
}

/// A bucket of JSON records, read with their revision and changed by compare-and-set.
/// Cheap to clone (one pointer).
#[derive(Clone)]
pub struct Records(std::sync::Arc<RecordsInner>);

struct RecordsInner {
    store: kv::Store,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    max_payload: usize,
}

/// A fenced write ([`Records::put_fenced`]) that landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FencedWrite {
    /// The new revision of the key written.
    pub revision: u64,
    /// The server had this write already (same message id): nothing new was stored.
    pub duplicate: bool,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Bytes, KvError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| KvError::unavailable(key, e))
}

impl Records {
    pub(crate) fn new(
        store: kv::Store,
        js: async_nats::jetstream::Context,
        max_payload: usize,
    ) -> Self {
        Self(std::sync::Arc::new(RecordsInner {
            store,
            client: js.client(),
            js,
            max_payload,
        }))
    }

    /// The subject a key is written on (`$KV.<bucket>.<key>`).
    fn subject(&self, key: &str) -> String {
        let store = &self.0.store;
        format!(
            "{}{key}",
            store.put_prefix.as_ref().unwrap_or(&store.prefix)
        )
    }

    /// Writes `value` at `key` only while `fence_key` is still at revision
    /// `fence_revision` (`Nats-Expected-Last-Subject-Sequence` checked on the fence's
    /// subject, server 2.11+), whatever `key` holds: a task's commit, refused once its
    /// claim moved. [`KvError::Conflict`] when the fence moved. `headers` should carry a
    /// `Nats-Msg-Id` ([`crate::message_headers`]): a write retried after an unanswered
    /// try is then stored once.
    pub async fn put_fenced<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        fence_key: &str,
        fence_revision: u64,
        mut headers: async_nats::HeaderMap,
    ) -> Result<FencedWrite, KvError> {
        use async_nats::header;
        headers.insert(
            header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            fence_revision.to_string().as_str(),
        );
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            self.subject(fence_key).as_str(),
        );
        let sent = self
            .0
            .js
            .publish_with_headers(self.subject(key), headers, encode(key, value)?)
            .await
            .map_err(|e| KvError::unavailable(key, e))?;
        match sent.await {
            Ok(ack) => Ok(FencedWrite {
                revision: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) if wrong_last_sequence(&e) => Err(KvError::Conflict {
                key: key.to_owned(),
            }),
            Err(e) => Err(KvError::unavailable(key, e)),
        }
    }

    /// The current records of every key matching `filter` (a key pattern with `*` and
    /// `>`), in one request: a batched direct get of the last message of each matching
    /// subject (server 2.11+). Deleted keys are left out. At most 256 keys.
    pub async fn get_matching<T: DeserializeOwned>(
        &self,
        filter: &str,
    ) -> Result<Vec<(String, T, u64)>, KvError> {
        use futures::StreamExt;
        let unavailable = |e: String| KvError::Unavailable {
            key: filter.to_owned(),
            source: e.into(),
        };
        let subject_prefix = self.0.store.prefix.clone();
        let body = serde_json::json!({
            "multi_last": [format!("{subject_prefix}{filter}")],
            "batch": 256,
        });
        let inbox = self.0.client.new_inbox();
        let mut replies = self
            .0
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        self.0
            .client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", self.0.store.stream_name),
                inbox,
                serde_json::to_vec(&body).unwrap_or_default().into(),
            )
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut out = Vec::new();
        loop {
            let msg = match tokio::time::timeout(std::time::Duration::from_secs(5), replies.next())
                .await
            {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => return Err(unavailable("no end of batch within 5 s".into())),
            };
            match msg.status.map(|s| s.as_u16()) {
                // End of the batch, or nothing matched.
                Some(204) | Some(404) => break,
                Some(code) if code >= 400 => {
                    return Err(unavailable(format!(
                        "direct get answered {code}: {}",
                        msg.description.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            let header = |name: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            if is_delete_marker(header(KV_OPERATION).as_deref()) {
                continue;
            }
            let Some(subject) = header("Nats-Subject") else {
                continue;
            };
            let key = subject
                .strip_prefix(subject_prefix.as_str())
                .unwrap_or(&subject)
                .to_owned();
            let revision = header("Nats-Sequence")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let value =
                decode(&msg.payload, self.0.max_payload.max(1 << 20)).map_err(|source| {
                    KvError::Corrupt {
                        key: key.clone(),
                        source,
                    }
                })?;
            out.push((key, value, revision));
        }
        let _ = replies.unsubscribe().await;
        Ok(out)
    }

    /// The raw store, for watchers.
    pub fn store(&self) -> &kv::Store {
        &self.0.store
    }

    /// [`Records::get_matching`], and when the batch goes unanswered, each of `keys`
    /// from the stream leader ([`Records::get_latest`]): for reads that know which keys
    /// they want (the task records a session's table lists). `keys` must match
    /// `filter`.
    pub async fn get_each<T: DeserializeOwned>(
        &self,
        filter: &str,
        keys: &[String],
    ) -> Result<Vec<(String, T, u64)>, KvError> {
        match self.get_matching(filter).await {
            Ok(found) => return Ok(found),
            Err(KvError::Unavailable { source, .. }) => {
                tracing::debug!(filter, error = %source, "batched read unanswered; asking the leader for each key");
            }
            Err(e) => return Err(e),
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((value, revision)) = self.get_latest(key).await? {
                out.push((key.clone(), value, revision));
            }
        }
        Ok(out)
    }

    /// The record at `key` with its revision, or `None` if absent or deleted.
    ///
    /// A direct get, which any replica may answer. One that goes unanswered is asked
    /// of the stream leader ([`Records::get_latest`]) before it fails: on a cluster, a
    /// replica that stopped answering but still looks connected (a frozen process, a
    /// one-way partition) keeps drawing direct gets until its routes time out, and
    /// without this every read it drew would count as an outage.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>, KvError> {
        let entry = match self.0.store.entry(key).await {
            Ok(entry) => entry,
            Err(e) => {
                tracing::debug!(key, error = %e, "direct get unanswered; asking the leader");
                return self.get_latest(key).await;
            }
        };
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let value =
                    decode(&e.value, self.0.max_payload.max(1 << 20)).map_err(|source| {
                        KvError::Corrupt {
                            key: key.to_owned(),
                            source,
                        }
                    })?;
                Ok(Some((value, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// [`Records::get`], then, when the answer is missing or `current` says it is too
    /// old, [`Records::get_latest`]. On a cluster any replica answers a get from
    /// wherever its replication stands, so a record another process has just written
    /// can read as missing (nats-server#6557; seen under load on three replicas: a
    /// `start` dead-lettered as "no session"). For reads whose miss would be final (a
    /// refusal, a dead letter): the leader read costs one more request, only then.
    pub async fn get_current<T: DeserializeOwned>(
        &self,
        key: &str,
        current: impl Fn(&T) -> bool,
    ) -> Result<Option<(T, u64)>, KvError> {
        match self.get::<T>(key).await? {
            Some((v, rev)) if current(&v) => Ok(Some((v, rev))),
            _ => self.get_latest(key).await,
        }
    }

    /// Like [`Records::get`], but answered by the bucket's stream leader (a plain
    /// message get, not a direct get that any replica may answer from behind): for a
    /// decision that must see every write acknowledged so far, such as vouching for
    /// a result by the commit it claims.
    pub async fn get_latest<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, KvError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{key}", self.0.store.prefix);
        let msg = match self
            .0
            .store
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(KvError::unavailable(key, e)),
        };
        if is_delete_marker(msg.headers.get(KV_OPERATION).map(|v| v.as_str())) {
            return Ok(None);
        }
        let value = decode(&msg.payload, self.0.max_payload.max(1 << 20)).map_err(|source| {
            KvError::Corrupt {
                key: key.to_owned(),
                source,
            }
        })?;
        Ok(Some((value, msg.sequence)))
    }

    /// Writes `key` whatever it holds (for values only one writer owns, such as a
    /// registration).
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<u64, KvError> {
        self.0
            .store
            .put(key, encode(key, value)?)
            .await
            .map_err(|e| KvError::unavailable(key, e))
    }

    /// Creates `key`; fails with [`KvError::Exists`] if it holds a value.
    pub async fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<u64, KvError> {
        match self.0.store.create(key, encode(key, value)?).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists || wrong_last_sequence(&e) => {
                Err(KvError::Exists {
                    key: key.to_owned(),
                })
            }
            Err(e) => Err(KvError::unavailable(key, e)),
        }
    }

    /// Replaces `key` if its revision is still `revision`; otherwise
    /// [`KvError::Conflict`].
    pub async fn update<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<u64, KvError> {
        match self
            .0
            .store
            .update(key, encode(key, value)?, revision)
            .await
        {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision || wrong_last_sequence(&e) => {
                Err(KvError::Conflict {
                    key: key.to_owned(),
                })
            }
            Err(e) => Err(KvError::unavailable(key, e)),
        }
    }

    /// Applies `f` to the value at `key` by compare-and-set, re-reading and re-applying
    /// on conflict, for at most `rounds` rounds: the one conflict loop every record's
    /// writers share. `f` sees `None` when the key is absent (a write then creates it).
    pub async fn transition<T, R>(
        &self,
        key: &str,
        start: Start<T>,
        rounds: usize,
        mut f: impl FnMut(Option<&T>) -> Step<T, R>,
    ) -> Result<Applied<R>, KvError>
    where
        T: Serialize + DeserializeOwned,
    {
        let mut current = match start {
            Start::Read => self.get::<T>(key).await?,
            Start::Absent => None,
            Start::Known(v, rev) => Some((v, rev)),
        };
        for _ in 0..rounds.max(1) {
            let (next, out) = match f(current.as_ref().map(|(v, _)| v)) {
                Step::Keep(out) => return Ok(Applied::Kept(out)),
                Step::Write(next, out) => (next, out),
            };
            let res = match &current {
                Some((_, rev)) => self.update(key, &next, *rev).await,
                None => self.create(key, &next).await,
            };
            match res {
                Ok(revision) => {
                    return Ok(Applied::Written {
                        value: out,
                        revision,
                    });
                }
                Err(KvError::Conflict { .. } | KvError::Exists { .. }) => {
                    metrics::counter!("flotilla_cas_conflicts_total", "bucket" => "records")
                        .increment(1);
                    crate::trace::span_event(
                        "cas_conflict",
                        vec![crate::trace::KeyValue::new("flotilla.key", key.to_owned())],
                    );
                    current = self.get::<T>(key).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Applied::Contended)
    }

    /// Deletes `key`, only if its revision is still `revision` when given.
    pub async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), KvError> {
        match self.0.store.delete_expect_revision(key, revision).await {
            Ok(()) => Ok(()),
            Err(e)
                if e.kind() == kv::DeleteErrorKind::WrongLastRevision
                    || wrong_last_sequence(&e) =>
            {
                Err(KvError::Conflict {
                    key: key.to_owned(),
                })
            }
            Err(e) => Err(KvError::unavailable(key, e)),
        }
    }
}

/// The header a KV bucket's stream marks deletes and purges with.
pub const KV_OPERATION: &str = "KV-Operation";

/// Whether a message of a KV bucket's stream, by its [`KV_OPERATION`] header, is a delete
/// or purge marker rather than a value.
pub fn is_delete_marker(operation: Option<&str>) -> bool {
    matches!(operation, Some("DEL" | "PURGE"))
}

/// The JetStream API error code somewhere in `e`'s chain of sources.
pub(crate) fn jetstream_code(e: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(je) = err.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(je.error_code().0);
        }
        cur = err.source();
    }
    None
}

/// A compare-and-set write (a KV create, update or revision-checked delete, or a
/// publish with an expected last subject sequence) refused because the subject moved
/// on. A single server answers error 10071; a clustered stream answers 10164 (the same
/// refusal, without the sequence in its text, so every replica gives the same answer),
/// which async-nats 0.51 reports as an unknown error. Both are a conflict, never an
/// outage: treating 10164 as "unavailable" turned every lost race on a cluster into a
/// redelivery.
pub fn wrong_last_sequence(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(jetstream_code(e), Some(10071 | 10164))
}

impl crate::Bus {
    /// Opens KV bucket `name` (one stream info request): for buckets the bus does not
    /// hold as [`Records`] (the tool cache), or to watch or list a bucket's keys.
    pub async fn open_bucket(&self, name: &str) -> Result<kv::Store, KvError> {
        self.js
            .get_key_value(name)
            .await
            .map_err(|e| KvError::unavailable(name, e))
    }

    /// Writes `payload` at `key` of bucket `bucket` with its own time to live (whole
    /// seconds, server 2.11+; the bucket must allow per-message TTLs): a presence, a
    /// cached result, a lease. With `expected_last`, only while the key's last
    /// sequence is that (0: absent), else [`KvError::Conflict`]. Returns the write's
    /// revision. One publish, not retried.
    pub async fn put_expiring(
        &self,
        bucket: &str,
        key: &str,
        payload: Bytes,
        ttl: std::time::Duration,
        expected_last: Option<u64>,
    ) -> Result<u64, KvError> {
        let mut msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload)
            .ttl(ttl);
        if let Some(last) = expected_last {
            msg = msg.expected_last_subject_sequence(last);
        }
        let ack = self
            .js
            .send_publish(format!("$KV.{bucket}.{key}"), msg)
            .await
            .map_err(|e| KvError::unavailable(key, e))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if wrong_last_sequence(&e) => Err(KvError::Conflict {
                key: key.to_owned(),
            }),
            Err(e) => Err(KvError::unavailable(key, e)),
        }
    }
}

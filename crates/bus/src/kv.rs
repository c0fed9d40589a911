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

/// A bucket of JSON records, read with their revision and changed by compare-and-set.
#[derive(Clone)]
pub struct Records {
    store: kv::Store,
    max_payload: usize,
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
    pub(crate) fn new(store: kv::Store, max_payload: usize) -> Self {
        Self { store, max_payload }
    }

    /// The raw store, for watchers.
    pub fn store(&self) -> &kv::Store {
        &self.store
    }

    /// The record at `key` with its revision, or `None` if absent or deleted.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>, KvError> {
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|e| KvError::unavailable(key, e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let value = decode(&e.value, self.max_payload.max(1 << 20)).map_err(|source| {
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

    /// Creates `key`; fails with [`KvError::Exists`] if it holds a value.
    pub async fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<u64, KvError> {
        match self.store.create(key, encode(key, value)?).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Err(KvError::Exists {
                key: key.to_owned(),
            }),
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
        match self.store.update(key, encode(key, value)?, revision).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(KvError::Conflict {
                key: key.to_owned(),
            }),
            Err(e) => Err(KvError::unavailable(key, e)),
        }
    }

    /// Deletes `key`, only if its revision is still `revision` when given.
    pub async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), KvError> {
        match self.store.delete_expect_revision(key, revision).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {
                Err(KvError::Conflict {
                    key: key.to_owned(),
                })
            }
            Err(e) => Err(KvError::unavailable(key, e)),
        }
    }
}

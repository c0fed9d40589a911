//! Task signatures: how a worker knows, without a round trip, that a task message is
//! one an orchestrator dispatched.
//!
//! Each `serve` process makes an Ed25519 key pair (an nkey) when it starts and
//! registers the public key in the session-records bucket at `signer.<public key>`, a
//! key only `serve` may write (DESIGN §9).
//!
//! The tasks one orchestrator step dispatches together (a plan's first
//! `session.max_in_flight`, usually) are signed as one **batch**, with one signature:
//! - each message's digest is hex of the first 16 bytes of SHA-256 over
//!   `<subject>\n<payload>`, the bytes as published ([`message_digest`]);
//! - the batch is the digests joined by `,`, in dispatch order;
//! - the signature is Ed25519 over `flotilla-batch-v1\n<batch>`.
//!
//! Every task of the batch carries three headers: `Flotilla-Signer` (the public key),
//! `Flotilla-Signed-Batch` (the batch) and `Flotilla-Signature` (hex of the signature).
//! A worker checks that its message's own digest is in the batch, and the signature
//! against a key it found registered (looked up once per signer and cached). A task that
//! passes needs no read of the session record: the orchestrator signed exactly this
//! instruction and allowance for this attempt of this session's task.
//!
//! A [`Verifier`] remembers the batches whose signature it checked (a bounded set), and
//! the workers of one process share one: the other tasks of a batch cost a hash each,
//! not a signature check. So a step's tasks cost `serve` one signature, and a process
//! running every role one check.
//!
//! A task without a signature, or with one that does not check out, is not refused for
//! that alone: the worker falls back to checking it against the session's task table
//! (one read), which is what every task cost before signatures. A forgery therefore
//! meets exactly the check it met before, and a task of an older `serve` (signed by
//! another scheme, or not at all) still runs during an upgrade.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use crate::kv::{KvError, Records};

pub use flotilla_protocol::SignerRecord;

/// The bucket key of `public_key`'s registration.
pub fn signer_key(public_key: &str) -> String {
    format!("signer.{public_key}")
}

/// Bytes of SHA-256 a message digest keeps (128 bits: finding a second message with a
/// signed digest takes about 2^128 hashes).
const DIGEST_BYTES: usize = 16;
/// The most messages a batch may name (a session plans a handful of tasks).
pub const MAX_BATCH: usize = 64;
/// What the signature covers ahead of the batch (domain separation).
const BATCH_DOMAIN: &[u8] = b"flotilla-batch-v1\n";

/// A message's digest in a signed batch: hex of the first 16 bytes of SHA-256 over
/// `<subject>\n<payload>`.
pub fn message_digest(subject: &str, payload: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(subject.as_bytes());
    h.update(b"\n");
    h.update(payload);
    hex(&h.finalize()[..DIGEST_BYTES])
}

/// The bytes a batch's signature covers.
fn signed_bytes(batch: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(BATCH_DOMAIN.len() + batch.len());
    b.extend_from_slice(BATCH_DOMAIN);
    b.extend_from_slice(batch.as_bytes());
    b
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One signature over a batch of messages: the three header values every message of
/// the batch carries. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SignedBatch {
    signer: Arc<str>,
    batch: Arc<str>,
    signature: Arc<str>,
}

impl SignedBatch {
    /// Sets `Flotilla-Signer`, `Flotilla-Signed-Batch` and `Flotilla-Signature`.
    pub fn add_headers(&self, headers: &mut async_nats::HeaderMap) {
        use flotilla_protocol::headers;
        headers.insert(headers::SIGNER, &*self.signer);
        headers.insert(headers::SIGNED_BATCH, &*self.batch);
        headers.insert(headers::SIGNATURE, &*self.signature);
    }

    /// The batch (the digests joined by `,`).
    pub fn batch(&self) -> &str {
        &self.batch
    }

    /// The signature (hex).
    pub fn signature(&self) -> &str {
        &self.signature
    }
}

/// A process's signing key. Cheap to clone.
#[derive(Clone)]
pub struct Signer {
    key: Arc<nkeys::KeyPair>,
    public: Arc<str>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A new random key pair.
    pub fn generate() -> Self {
        let key = nkeys::KeyPair::new_service();
        let public = key.public_key().into();
        Self {
            key: Arc::new(key),
            public,
        }
    }

    /// The public key.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// One signature over the messages (`(subject, payload)`, the bytes as published)
    /// dispatched together; `None` if there are none, more than [`MAX_BATCH`], or the
    /// key cannot sign (it always can: it holds its seed).
    pub fn sign_batch<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Option<SignedBatch> {
        let digests: Vec<String> = messages
            .into_iter()
            .map(|(subject, payload)| message_digest(subject, payload))
            .collect();
        if digests.is_empty() || digests.len() > MAX_BATCH {
            return None;
        }
        let batch = digests.join(",");
        let signature = self.key.sign(&signed_bytes(&batch)).ok()?;
        Some(SignedBatch {
            signer: self.public.clone(),
            batch: batch.into(),
            signature: hex(&signature).into(),
        })
    }

    /// Registers the public key in `records` as `agent_id`'s (a put: a restart of the
    /// same key, or a refresh before the bucket's max age, overwrites it).
    pub async fn register(&self, records: &Records, agent_id: &str) -> Result<(), KvError> {
        let rec = SignerRecord {
            v: 1,
            public_key: self.public.to_string(),
            agent_id: agent_id.to_owned(),
            since_ms: flotilla_protocol::epoch_ms(std::time::SystemTime::now()),
        };
        records
            .put(&signer_key(&self.public), &rec)
            .await
            .map(|_| ())
    }
}

/// Why a task's signature does not vouch for it.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The message carries no signature headers: check it the slow way.
    #[error("not signed")]
    Unsigned,
    /// The signer is not registered: check it the slow way.
    #[error("signed by an unregistered key {0}")]
    UnknownSigner(String),
    /// The signature does not match the message: check it the slow way.
    #[error("the signature does not match the message")]
    Mismatch,
    /// The registry could not be read: retry later.
    #[error(transparent)]
    Unavailable(#[from] KvError),
}

/// How many checked batches a [`Verifier`] remembers per generation (two generations
/// are kept: about 100 KB at most).
const VOUCHED_PER_GENERATION: usize = 2048;

/// The batches whose signature was checked: a two-generation set of SHA-256 over
/// `(signer, signature, batch)`. When the current generation is full it becomes the
/// previous one and the oldest is dropped, so memory stays bounded and a batch's tasks,
/// which arrive together, find it.
#[derive(Default)]
struct Vouched {
    current: HashSet<[u8; 32]>,
    previous: HashSet<[u8; 32]>,
}

impl Vouched {
    fn key(signer: &str, signature: &str, batch: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [signer, signature, batch] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.current.contains(key) || self.previous.contains(key)
    }

    fn insert(&mut self, key: [u8; 32]) {
        if self.current.len() >= VOUCHED_PER_GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key);
    }
}

/// Checks task signatures against the registered signers. Cheap to clone; clones share
/// the keys found (cached for the process's life) and the batches checked.
#[derive(Clone)]
pub struct Verifier {
    records: Records,
    known: Arc<Mutex<HashMap<String, Arc<nkeys::KeyPair>>>>,
    /// Held while a signer is looked up, so that the handlers that meet a new signer
    /// together (a burst of its first tasks) make one read, not one each.
    looking_up: Arc<tokio::sync::Mutex<()>>,
    vouched: Arc<Mutex<Vouched>>,
    /// Held while a signature is checked (see [`Verifier::verify`]).
    checking: Arc<tokio::sync::Mutex<()>>,
    /// Ed25519 checks made (each batch's first task; the rest find it vouched for).
    checks: Arc<AtomicU64>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("checks", &self.checks())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier reading registrations from `records` (the session-records bucket).
    pub fn new(records: Records) -> Self {
        Self {
            records,
            known: Arc::default(),
            looking_up: Arc::default(),
            vouched: Arc::default(),
            checking: Arc::default(),
            checks: Arc::default(),
        }
    }

    /// A verifier that shares this one's keys and checked batches but reads
    /// registrations from `records` (another connection of the same process: the
    /// workers of one process share a verifier, each through its own connection).
    pub fn sharing(&self, records: Records) -> Self {
        Self {
            records,
            ..self.clone()
        }
    }

    /// Ed25519 checks made so far by this verifier and those sharing it.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// `Ok` when `batch` names this message's digest, `signature` (hex) is `signer`'s
    /// over `batch`, and `signer` is registered. The first message of a signer costs one
    /// read (from the stream leader when a replica has not seen the registration yet);
    /// later ones none. The first message of a batch costs one Ed25519 check; the
    /// others a hash.
    pub async fn verify(
        &self,
        subject: &str,
        payload: &[u8],
        signed: Signed<'_>,
    ) -> Result<(), SignatureError> {
        let (Some(signer), Some(batch), Some(signature)) =
            (signed.signer, signed.batch, signed.signature)
        else {
            return Err(SignatureError::Unsigned);
        };
        let digest = message_digest(subject, payload);
        if !batch.split(',').take(MAX_BATCH).any(|d| d == digest) {
            return Err(SignatureError::Mismatch);
        }
        let vouched = Vouched::key(signer, signature, batch);
        if self.is_vouched(&vouched) {
            return Ok(());
        }
        let key = self.key_of(signer).await?;
        let sig = unhex(signature).ok_or(SignatureError::Mismatch)?;
        // A batch's tasks arrive together: the first to get here checks the signature
        // while the others wait for it and then find the batch vouched for, instead of
        // each checking it at the same time. Only the check (tens of microseconds of
        // CPU) is under the lock, never a read.
        let _checking = self.checking.lock().await;
        if self.is_vouched(&vouched) {
            return Ok(());
        }
        self.checks.fetch_add(1, Ordering::Relaxed);
        key.verify(&signed_bytes(batch), &sig)
            .map_err(|_| SignatureError::Mismatch)?;
        self.vouched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(vouched);
        Ok(())
    }

    fn is_vouched(&self, key: &[u8; 32]) -> bool {
        self.vouched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    /// `signer`'s key, if it is registered (cached once found).
    async fn key_of(&self, signer: &str) -> Result<Arc<nkeys::KeyPair>, SignatureError> {
        let cached = || {
            self.known
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(signer)
                .cloned()
        };
        if let Some(k) = cached() {
            return Ok(k);
        }
        // Held to the end of the call on a miss (the key is cached by then).
        let _looking_up = self.looking_up.lock().await;
        if let Some(k) = cached() {
            return Ok(k);
        }
        let registered = self
            .records
            .get_current::<SignerRecord>(&signer_key_checked(signer)?, |_| true)
            .await?;
        match registered {
            Some((rec, _)) if rec.public_key == signer => {
                let key = nkeys::KeyPair::from_public_key(signer)
                    .map_err(|_| SignatureError::UnknownSigner(signer.to_owned()))?;
                let key = Arc::new(key);
                self.known
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(signer.to_owned(), key.clone());
                Ok(key)
            }
            _ => Err(SignatureError::UnknownSigner(signer.to_owned())),
        }
    }
}

/// A message's signature headers (`Flotilla-Signer`, `Flotilla-Signed-Batch`,
/// `Flotilla-Signature`), each `None` when absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signed<'a> {
    /// `Flotilla-Signer`.
    pub signer: Option<&'a str>,
    /// `Flotilla-Signed-Batch`.
    pub batch: Option<&'a str>,
    /// `Flotilla-Signature`.
    pub signature: Option<&'a str>,
}

impl<'a> Signed<'a> {
    /// The headers of a message, looked up with `header`.
    pub fn from_headers(header: impl Fn(&str) -> Option<&'a str>) -> Self {
        use flotilla_protocol::headers;
        Self {
            signer: header(headers::SIGNER),
            batch: header(headers::SIGNED_BATCH),
            signature: header(headers::SIGNATURE),
        }
    }
}

/// The registration key of `signer`, if `signer` can be one (one subject token).
fn signer_key_checked(signer: &str) -> Result<String, SignatureError> {
    let ok = !signer.is_empty()
        && signer.len() <= 64
        && signer.bytes().all(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(signer_key(signer))
    } else {
        Err(SignatureError::UnknownSigner(
            signer.chars().take(80).collect(),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn a_batch_signature_covers_each_subject_and_payload() {
        let s = Signer::generate();
        let msgs: [(&str, &[u8]); 3] = [("a.b", b"{}"), ("a.c", b"{}"), ("a.b", b"{ }")];
        let signed = s.sign_batch(msgs).unwrap();
        let digests: Vec<&str> = signed.batch().split(',').collect();
        assert_eq!(digests.len(), 3);
        for ((subject, payload), d) in msgs.iter().zip(&digests) {
            assert_eq!(message_digest(subject, payload), *d);
            assert_eq!(d.len(), 2 * DIGEST_BYTES);
        }
        assert_ne!(digests[0], digests[1], "the subject is covered");
        assert_ne!(digests[0], digests[2], "the payload is covered");
        let sig = unhex(signed.signature()).unwrap();
        let public = nkeys::KeyPair::from_public_key(s.public_key()).unwrap();
        assert!(public.verify(&signed_bytes(signed.batch()), &sig).is_ok());
        let other = s.sign_batch([msgs[0], msgs[1]]).unwrap();
        assert!(public.verify(&signed_bytes(other.batch()), &sig).is_err());
        assert!(s.sign_batch([]).is_none());
        let many = vec![("a.b", &b"{}"[..]); MAX_BATCH + 1];
        assert!(s.sign_batch(many).is_none());
    }

    #[test]
    fn the_vouched_set_is_bounded_and_keeps_the_last_generation() {
        let mut v = Vouched::default();
        let key = |i: usize| Vouched::key("S", &i.to_string(), "b");
        for i in 0..3 * VOUCHED_PER_GENERATION {
            v.insert(key(i));
        }
        assert!(v.current.len() + v.previous.len() <= 2 * VOUCHED_PER_GENERATION);
        assert!(v.contains(&key(3 * VOUCHED_PER_GENERATION - 1)));
        assert!(v.contains(&key(2 * VOUCHED_PER_GENERATION)));
        assert!(!v.contains(&key(0)), "the oldest generation is dropped");
        // The parts are length-prefixed: moving a byte across a boundary is another key.
        assert_ne!(Vouched::key("S", "ab", "c"), Vouched::key("S", "a", "bc"));
    }
}

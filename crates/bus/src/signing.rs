//! Task signatures: how a worker knows, without a round trip, that a task message is
//! one an orchestrator dispatched.
//!
//! Each `serve` process makes an Ed25519 key pair (an nkey) when it starts and
//! registers the public key in the session-records bucket at `signer.<public key>`, a
//! key only `serve` may write (DESIGN §9). Every task it dispatches carries two headers:
//! `Flotilla-Signer` (the public key) and `Flotilla-Signature` (hex of the signature over
//! `<subject>\n<payload>`, the bytes as published). A worker checks the signature
//! against a key it found registered (looked up once per signer and cached), so a
//! correctly signed task needs no read of the session record: the orchestrator signed
//! exactly this instruction and allowance for this attempt of this session's task.
//!
//! A task without a signature, or with one that does not check out, is not refused for
//! that alone: the worker falls back to checking it against the session's task table
//! (one read), which is what every task cost before signatures. A forgery therefore
//! meets exactly the check it met before, and a task of an older, unsigned `serve` still
//! runs during an upgrade.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::kv::{KvError, Records};

pub use flotilla_protocol::SignerRecord;

/// The bucket key of `public_key`'s registration.
pub fn signer_key(public_key: &str) -> String {
    format!("signer.{public_key}")
}

/// The bytes a signature covers.
fn signed_bytes(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(subject.len() + 1 + payload.len());
    b.extend_from_slice(subject.as_bytes());
    b.push(b'\n');
    b.extend_from_slice(payload);
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

    /// The signature (hex) of a message to `subject` with `payload`; `None` if the key
    /// cannot sign (it always can: it holds its seed).
    pub fn sign(&self, subject: &str, payload: &[u8]) -> Option<String> {
        self.key
            .sign(&signed_bytes(subject, payload))
            .ok()
            .map(|s| hex(&s))
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

/// Checks task signatures against the registered signers. Cheap to clone; the keys
/// found are cached for the process's life.
#[derive(Clone)]
pub struct Verifier {
    records: Records,
    known: Arc<Mutex<HashMap<String, Arc<nkeys::KeyPair>>>>,
    /// Held while a signer is looked up, so that the handlers that meet a new signer
    /// together (a burst of its first tasks) make one read, not one each.
    looking_up: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier reading registrations from `records` (the session-records bucket).
    pub fn new(records: Records) -> Self {
        Self {
            records,
            known: Arc::default(),
            looking_up: Arc::default(),
        }
    }

    /// `Ok` when `signature` (hex) is `signer`'s over `subject` and `payload`, and
    /// `signer` is registered. The first message of a signer costs one read (from the
    /// stream leader when a replica has not seen the registration yet); later ones none.
    pub async fn verify(
        &self,
        subject: &str,
        payload: &[u8],
        signer: Option<&str>,
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        let (Some(signer), Some(signature)) = (signer, signature) else {
            return Err(SignatureError::Unsigned);
        };
        let cached = || {
            self.known
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(signer)
                .cloned()
        };
        // Held to the end of the call on a miss (the key is cached by then).
        let _looking_up = match cached() {
            Some(_) => None,
            None => Some(self.looking_up.lock().await),
        };
        let key = match cached() {
            Some(k) => k,
            None => {
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
                        key
                    }
                    _ => return Err(SignatureError::UnknownSigner(signer.to_owned())),
                }
            }
        };
        let sig = unhex(signature).ok_or(SignatureError::Mismatch)?;
        key.verify(&signed_bytes(subject, payload), &sig)
            .map_err(|_| SignatureError::Mismatch)
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
    fn a_signature_covers_subject_and_payload() {
        let s = Signer::generate();
        let sig = unhex(&s.sign("a.b", b"{}").unwrap()).unwrap();
        let public = nkeys::KeyPair::from_public_key(s.public_key()).unwrap();
        assert!(public.verify(&signed_bytes("a.b", b"{}"), &sig).is_ok());
        assert!(public.verify(&signed_bytes("a.c", b"{}"), &sig).is_err());
        assert!(public.verify(&signed_bytes("a.b", b"{ }"), &sig).is_err());
    }
}

//! Span and trace ids for W3C trace context.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_protocol::TraceParent;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 random-looking bits (SipHash with a per-call random key over a counter): enough
/// for span ids, which only need to be unlikely to collide within a trace.
pub fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// A fresh root trace context.
pub fn new_root() -> TraceParent {
    let hi = random_u64() as u128;
    let lo = random_u64() as u128;
    TraceParent::root((hi << 64) | lo, random_u64())
}

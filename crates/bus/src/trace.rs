//! W3C trace context across processes, and its link to OpenTelemetry.
//!
//! Every message carries a `traceparent`. A handler's span takes the message's context
//! as its parent ([`set_parent`]), and what the handler sends carries the handler's own
//! span ([`outgoing`]), so an exporting fleet reports one session as one trace with
//! correct parent links across admission, `serve` and every agent process. Without an
//! OpenTelemetry layer installed (the binary installs one only when export is
//! configured) these are cheap no-ops and a hop's context is a child of the one it
//! received, with a fresh span id.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_protocol::TraceParent;
pub use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

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

/// `tp` as an OpenTelemetry context whose (remote) span is `tp`'s.
pub fn remote_context(tp: &TraceParent) -> opentelemetry::Context {
    let sc = SpanContext::new(
        TraceId::from_bytes(tp.trace_id.to_be_bytes()),
        SpanId::from_bytes(tp.span_id.to_be_bytes()),
        TraceFlags::new(tp.flags),
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

/// Makes `span` (not yet entered) a child of the sender's span `parent` in the
/// exported trace. A no-op without an OpenTelemetry layer or without a parent.
pub fn set_parent(span: &tracing::Span, parent: Option<TraceParent>) {
    if let Some(tp) = parent {
        // Fails only when the span is disabled or already started: then it simply
        // keeps the parent it has.
        let _ = span.set_parent(remote_context(&tp));
    }
}

/// The exported context of the current span, if there is one.
pub fn current() -> Option<TraceParent> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| TraceParent {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        flags: sc.trace_flags().to_u8(),
    })
}

/// The context a message sent now carries: the current span's, when it is exported
/// and in the same trace as `inherited` (so the receiver's span is a child of the
/// sender's); otherwise a child of `inherited` with a fresh span id, or a new root.
pub fn outgoing(inherited: Option<TraceParent>) -> TraceParent {
    match (current(), inherited) {
        (Some(cur), Some(t)) if cur.trace_id == t.trace_id => cur,
        (Some(cur), None) => cur,
        (_, Some(t)) => t.child(random_u64()),
        (None, None) => new_root(),
    }
}

/// Records `name` with `attributes` as an event of the current span in the exported
/// trace (compare-and-set conflicts, takeovers, budget stops). Not logged: the
/// callers log what an operator reads, at the level it deserves.
pub fn span_event(name: &'static str, attributes: Vec<KeyValue>) {
    tracing::Span::current().add_event(name, attributes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_exporter_a_hop_keeps_the_trace_with_a_new_span() {
        let t = new_root();
        let out = outgoing(Some(t));
        assert_eq!(out.trace_id, t.trace_id);
        assert_ne!(out.span_id, t.span_id);
        assert_ne!(outgoing(None).trace_id, t.trace_id);
    }

    #[test]
    fn remote_context_round_trips_the_ids() {
        let t = new_root();
        let cx = remote_context(&t);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_valid() && sc.is_sampled());
        assert_eq!(u128::from_be_bytes(sc.trace_id().to_bytes()), t.trace_id);
        assert_eq!(u64::from_be_bytes(sc.span_id().to_bytes()), t.span_id);
    }
}

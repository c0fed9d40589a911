//! W3C trace context (`traceparent`), carried in a NATS header on every message.
//!
//! A session gets one trace id when it opens; every message of the session carries it
//! with the span id of the hop that sent it, so a tracing backend can stitch the
//! orchestrator, the workers and the client into one trace.

use std::fmt;

/// A parsed `traceparent` header value: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace id (never zero).
    pub trace_id: u128,
    /// The parent span id (never zero).
    pub span_id: u64,
    /// Trace flags (`01` = sampled).
    pub flags: u8,
}

/// The header value was not a valid version-00 `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {0:?}")]
pub struct InvalidTraceParent(pub String);

impl TraceParent {
    /// A new root context from random bits (any non-zero values).
    pub fn root(trace_bits: u128, span_bits: u64) -> Self {
        Self {
            trace_id: trace_bits.max(1),
            span_id: span_bits.max(1),
            flags: 1,
        }
    }

    /// The same trace with a new span id: the context a hop sends onwards.
    pub fn child(&self, span_bits: u64) -> Self {
        Self {
            span_id: span_bits.max(1),
            ..*self
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Result<Self, InvalidTraceParent> {
        let bad = || InvalidTraceParent(s.chars().take(80).collect());
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [ver, trace, span, flags] = parts.as_slice() else {
            return Err(bad());
        };
        let is_hex = |t: &str, n: usize| {
            t.len() == n
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if *ver != "00" || !is_hex(trace, 32) || !is_hex(span, 16) || !is_hex(flags, 2) {
            return Err(bad());
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| bad())?;
        let span_id = u64::from_str_radix(span, 16).map_err(|_| bad())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| bad())?;
        if trace_id == 0 || span_id == 0 {
            return Err(bad());
        }
        Ok(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id as 32 lowercase hex digits (for log fields).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_child_keeps_trace() {
        let root = TraceParent::root(0xabc, 0x12);
        let s = root.to_string();
        assert_eq!(s, "00-00000000000000000000000000000abc-0000000000000012-01");
        assert_eq!(TraceParent::parse(&s).unwrap(), root);
        let child = root.child(7);
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "",
            "01-00000000000000000000000000000abc-0000000000000012-01",
            "00-00000000000000000000000000000000-0000000000000012-01",
            "00-0000000000000000000000000000ABC-0000000000000012-01",
            "00-abc-12-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad}");
        }
    }
}

//! Every wire decoder against hostile bytes: arbitrary bytes, mutations of valid
//! messages, deeply nested JSON and huge numbers. No input may panic, and every
//! rejection carries one of the closed set of decode codes. Thousands of cases per
//! message type (`PROPTEST_CASES` raises it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

use flotilla_protocol::{
    AcquireRequest, AgentHistory, ErrorCode, InboxMessage, OpenSession, Presence, SessionId,
    SessionRecord, SettleRequest, TaskRecord, ToolCall, ToolReply, decode,
};
use proptest::prelude::*;
use serde::de::DeserializeOwned;

const LIMIT: usize = 64 * 1024;

/// The codes a decoder may answer with.
const DECODE_CODES: [ErrorCode; 4] = [
    ErrorCode::Malformed,
    ErrorCode::UnknownField,
    ErrorCode::UnsupportedVersion,
    ErrorCode::Oversized,
];

/// Decodes `bytes` as `T`: it must not panic, and a rejection must carry a decode code.
fn must_not_panic<T: DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
    match std::panic::catch_unwind(|| decode::<T>(bytes, LIMIT).map(|_| ())) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            prop_assert!(DECODE_CODES.contains(&e.code()), "{e:?}");
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
        Err(_) => Err(TestCaseError::fail(format!(
            "decoder panicked on {:?}",
            String::from_utf8_lossy(bytes)
        ))),
    }
}

/// A valid message of each type the wire carries (the cases are mutations of these).
fn samples() -> Vec<(&'static str, String)> {
    let sid = SessionId::parse("s-123").unwrap();
    let record = SessionRecord::planning(
        sid,
        "compare three vector databases".into(),
        vec!["research".parse().unwrap(), "writing".parse().unwrap()],
        3,
        17,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        1_763_820_000_000,
    );
    vec![
        ("open", r#"{"v":1,"task":"compare three vector databases","session_id":"my-id-123","roles":["research","analysis","writing"]}"#.into()),
        ("start", r#"{"kind":"start","v":1,"session_id":"s-123"}"#.into()),
        ("task", r#"{"kind":"task","v":1,"session_id":"s-123","task_id":"t1","role":"research","attempt":2,"instruction":"find sources","context":"the user's task","feedback":"no artifacts","allowance":5000}"#.into()),
        ("result", r#"{"kind":"result","v":1,"session_id":"s-123","task_id":"t1","role":"research","attempt":1,"outcome":{"status":"failed","reason":"no sources"},"attempt_tokens":420}"#.into()),
        ("clarification", r#"{"kind":"result","v":1,"session_id":"s-123","task_id":"t2","role":"analysis","attempt":1,"outcome":{"status":"clarify","question":"which databases?"}}"#.into()),
        ("acquire", r#"{"v":1,"model":"gpt-4o-mini","tokens":2100}"#.into()),
        ("settle", r#"{"v":1,"model":"gpt-4o-mini","permit":"42.17","granted_ms":1763820000000,"reserved":2100,"used":640,"rate_limited_ms":2000}"#.into()),
        ("tool_call", r#"{"v":1,"tool":"lookup","arguments":{"q":"nats","n":[1,2.5,null,true]},"session_id":"s-123","task_id":"t1","idempotency_key":"k-1"}"#.into()),
        ("tool_ok", r#"{"status":"ok","v":1,"result":{"text":"NATS"}}"#.into()),
        ("tool_error", r#"{"status":"error","v":1,"message":"down","retryable":true}"#.into()),
        ("presence", r#"{"v":1,"agent_id":"research-42","role":"research","ping_subject":"flotilla.agent.research-42.ping","started_ms":1,"renewed_ms":2,"in_flight":[{"session_id":"s-123","task_id":"t1","role":"research","attempt":1,"ack_subject":"$JS.ACK.x","since_ms":1,"progress_ms":2}]}"#.into()),
        ("task_record", r#"{"v":1,"session_id":"s-123","task_id":"t1","role":"research","attempt":1,"state":"done","holder":"research-42","holders":1,"output":{"summary":"found it","artifacts":[{"name":"a","kind":"note","content":"c"}]},"outcome":{"status":"completed"},"updated_ms":5}"#.into()),
        ("history", r#"{"v":1,"attempt":1,"turns_taken":1,"tokens":300,"summary":"","recent":[]}"#.into()),
        ("session_record", serde_json::to_string(&record).unwrap()),
    ]
}

/// Runs the decoder of the type `name` is a sample of.
fn decode_as(name: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    match name {
        "open" => must_not_panic::<OpenSession>(bytes),
        "start" | "task" | "result" | "clarification" => must_not_panic::<InboxMessage>(bytes),
        "acquire" => must_not_panic::<AcquireRequest>(bytes),
        "settle" => must_not_panic::<SettleRequest>(bytes),
        "tool_call" => must_not_panic::<ToolCall>(bytes),
        "tool_ok" | "tool_error" => must_not_panic::<ToolReply>(bytes),
        "presence" => must_not_panic::<Presence>(bytes),
        "task_record" => must_not_panic::<TaskRecord>(bytes),
        "history" => must_not_panic::<AgentHistory>(bytes),
        "session_record" => must_not_panic::<SessionRecord>(bytes),
        other => panic!("no decoder for {other}"),
    }
}

fn decodes_ok(name: &str, bytes: &[u8]) -> bool {
    match name {
        "open" => decode::<OpenSession>(bytes, LIMIT).is_ok(),
        "start" | "task" | "result" | "clarification" => {
            decode::<InboxMessage>(bytes, LIMIT).is_ok()
        }
        "acquire" => decode::<AcquireRequest>(bytes, LIMIT).is_ok(),
        "settle" => decode::<SettleRequest>(bytes, LIMIT).is_ok(),
        "tool_call" => decode::<ToolCall>(bytes, LIMIT).is_ok(),
        "tool_ok" | "tool_error" => decode::<ToolReply>(bytes, LIMIT).is_ok(),
        "presence" => decode::<Presence>(bytes, LIMIT).is_ok(),
        "task_record" => decode::<TaskRecord>(bytes, LIMIT).is_ok(),
        "history" => decode::<AgentHistory>(bytes, LIMIT).is_ok(),
        "session_record" => decode::<SessionRecord>(bytes, LIMIT).is_ok(),
        _ => false,
    }
}

#[test]
fn the_samples_are_valid() {
    for (name, json) in samples() {
        assert!(decodes_ok(name, json.as_bytes()), "{name}: {json}");
    }
}

/// One way to damage a message.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite the byte at a position.
    Flip(usize, u8),
    /// Delete a range.
    Delete(usize, usize),
    /// Insert bytes at a position.
    Insert(usize, Vec<u8>),
    /// Repeat a range in place.
    Duplicate(usize, usize),
    /// Replace the n-th number with a hostile one.
    Number(usize, &'static str),
    /// Replace the n-th string value with another string.
    Text(usize, String),
    /// Cut the message short.
    Truncate(usize),
}

const HOSTILE_NUMBERS: [&str; 10] = [
    "18446744073709551616",
    "-1",
    "1e999",
    "-1e999",
    "0.5",
    "99999999999999999999999999999999999999999999999999",
    "4294967296",
    "-0",
    "1E+2",
    "NaN",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), 0usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (
            any::<usize>(),
            prop::collection::vec(
                prop_oneof![
                    Just(b'{'),
                    Just(b'}'),
                    Just(b'['),
                    Just(b'"'),
                    Just(b','),
                    Just(b':'),
                    Just(b'\\'),
                    Just(0u8),
                    Just(0xff),
                    any::<u8>()
                ],
                1..8
            )
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        (0usize..8, prop::sample::select(HOSTILE_NUMBERS.to_vec()))
            .prop_map(|(i, n)| Mutation::Number(i, n)),
        (
            0usize..12,
            prop_oneof![
                Just(String::new()),
                Just("x".repeat(70_000)),
                Just("a.b.>".to_owned()),
                Just("\u{0000}\u{ffff}é".to_owned()),
                "[a-z0-9_.*>-]{0,40}"
            ]
        )
            .prop_map(|(i, s)| Mutation::Text(i, s)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match m {
        Mutation::Flip(i, b) => {
            if !bytes.is_empty() {
                let i = i % bytes.len();
                bytes[i] = *b;
            }
        }
        Mutation::Delete(i, n) => {
            let i = i % len;
            let end = (i + n).min(bytes.len());
            if i < end {
                bytes.drain(i..end);
            }
        }
        Mutation::Insert(i, b) => {
            let i = i % (bytes.len() + 1);
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Duplicate(i, n) => {
            let i = i % len;
            let end = (i + n).min(bytes.len());
            if i < end {
                let copy = bytes[i..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
        Mutation::Number(n, value) => replace_nth(bytes, *n, is_number_start, value),
        Mutation::Text(n, value) => {
            let quoted = serde_json::to_string(value).unwrap();
            replace_nth(bytes, *n, |b| b == b'"', &quoted)
        }
        Mutation::Truncate(i) => bytes.truncate(i % len),
    }
}

fn is_number_start(b: u8) -> bool {
    b.is_ascii_digit() || b == b'-'
}

/// Replaces the `n`-th token starting with a byte `starts` accepts (a number, or a
/// quoted string) with `value`.
fn replace_nth(bytes: &mut Vec<u8>, n: usize, starts: impl Fn(u8) -> bool, value: &str) {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let b = text.as_bytes();
    let mut seen = 0;
    let mut i = 0;
    while i < b.len() {
        if starts(b[i]) && (i == 0 || matches!(b[i - 1], b':' | b'[' | b',' | b' ')) {
            let end = if b[i] == b'"' {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                (j + 1).min(b.len())
            } else {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_digit() || b"+-.eE".contains(&b[j])) {
                    j += 1;
                }
                j
            };
            if seen == n {
                let mut out = text.as_bytes()[..i].to_vec();
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(&text.as_bytes()[end..]);
                *bytes = out;
                return;
            }
            seen += 1;
            i = end;
        } else {
            i += 1;
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for (name, _) in samples() {
            decode_as(name, &bytes)?;
        }
    }

    #[test]
    fn arbitrary_json_values_never_panic(json in arbitrary_json()) {
        let bytes = json.to_string().into_bytes();
        for (name, _) in samples() {
            decode_as(name, &bytes)?;
        }
    }

    #[test]
    fn mutated_messages_never_panic(
        which in 0usize..14,
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let all = samples();
        let (name, json) = &all[which % all.len()];
        let mut bytes = json.clone().into_bytes();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decode_as(name, &bytes)?;
    }
}

/// Any JSON value, nested a few levels.
fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|n| serde_json::json!(n)),
        "[a-z_]{0,12}".prop_map(serde_json::Value::String),
        Just(serde_json::json!(1)),
        Just(serde_json::json!("v")),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("v".to_owned()),
                    Just("kind".to_owned()),
                    Just("session_id".to_owned()),
                    Just("status".to_owned()),
                    "[a-z_]{1,10}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn deep_nesting_and_huge_numbers_are_rejected_with_a_code() {
    for depth in [64, 200, 10_000, 60_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        for nested in [&arrays, &objects] {
            for (name, json) in samples() {
                // As the whole message, and as the value of its first field.
                decode_as(name, nested.as_bytes()).unwrap();
                let inside = json.replacen("\"v\":1", &format!("\"v\":{nested}"), 1);
                decode_as(name, inside.as_bytes()).unwrap();
                let deep_field = json.replacen('}', &format!(",\"deep\":{nested}}}"), 1);
                decode_as(name, deep_field.as_bytes()).unwrap();
            }
        }
    }
    let task = r#"{"kind":"task","v":1,"session_id":"s-123","task_id":"t1","role":"research","attempt":ATTEMPT,"instruction":"i","context":"c"}"#;
    for n in HOSTILE_NUMBERS {
        let bytes = task.replace("ATTEMPT", n);
        let err = decode::<InboxMessage>(bytes.as_bytes(), LIMIT).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Malformed, "{n}: {err}");
    }
    // Over the limit: refused unread.
    let big = format!(r#"{{"v":1,"task":"{}"}}"#, "x".repeat(LIMIT));
    assert_eq!(
        decode::<OpenSession>(big.as_bytes(), LIMIT)
            .unwrap_err()
            .code(),
        ErrorCode::Oversized
    );
}

//! Decoding what every hop decodes: an inbox message (strict, size-limited JSON into
//! typed ids) and a session record, and encoding them back.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flotilla_protocol::{
    DEFAULT_MAX_PAYLOAD, InboxMessage, ResultMessage, Role, SessionId, TaskId, TaskMessage,
    TaskOutcome, V1, decode,
};

fn bench(c: &mut Criterion) {
    let task = InboxMessage::Task(TaskMessage {
        v: V1,
        session_id: SessionId::parse("FjJFchsntpAGgViSNwzvjy").unwrap(),
        task_id: TaskId::parse("t3").unwrap(),
        role: Role::parse("research").unwrap(),
        attempt: 1,
        instruction: "As the research specialist, handle your part of: compare three \
                      open-source vector databases for a 50M-document search product"
            .into(),
        context: "compare three open-source vector databases for a 50M-document search product"
            .into(),
        feedback: None,
        clarification: None,
        questions_closed: false,
        allowance: Some(58_192),
    });
    let result = InboxMessage::Result(ResultMessage {
        v: V1,
        session_id: SessionId::parse("FjJFchsntpAGgViSNwzvjy").unwrap(),
        task_id: TaskId::parse("t3").unwrap(),
        role: Role::parse("research").unwrap(),
        attempt: 1,
        outcome: TaskOutcome::Completed,
        spend: None,
        memory: None,
        attempt_tokens: Some(1_200),
    });
    for (name, msg) in [("task", task), ("result", result)] {
        let bytes = serde_json::to_vec(&msg).unwrap();
        let mut g = c.benchmark_group(format!("inbox {name} message"));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function("decode", |b| {
            b.iter(|| decode::<InboxMessage>(black_box(&bytes), DEFAULT_MAX_PAYLOAD).unwrap())
        });
        g.bench_function("encode", |b| {
            b.iter(|| serde_json::to_vec(black_box(&msg)).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

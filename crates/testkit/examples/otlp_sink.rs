//! An OTLP trace sink for benchmarks: the testkit's receiver on random loopback ports,
//! printing its endpoints and, every second, how many spans it has received.
//!
//! `cargo run --release -p flotilla-testkit --example otlp_sink`

#![allow(clippy::expect_used)] // a tool: failures should stop it

use std::time::Duration;

#[tokio::main]
async fn main() {
    let r = flotilla_testkit::OtlpReceiver::start()
        .await
        .expect("receiver starts");
    println!("http {}", r.http_endpoint());
    println!("grpc {}", r.grpc_endpoint());
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = r.span_count();
        if n != last {
            println!("spans {n}");
            last = n;
        }
        if std::env::var_os("OTLP_SINK_SUMMARY").is_some() && n > 0 && n == last {
            let mut by_name = std::collections::BTreeMap::<String, (usize, usize, usize)>::new();
            for s in r.spans() {
                let e = by_name.entry(s.name).or_default();
                e.0 += 1;
                e.1 += s.events.len();
                e.2 += s.attributes.len();
            }
            println!("name: spans, events, attributes {by_name:?}");
        }
    }
}

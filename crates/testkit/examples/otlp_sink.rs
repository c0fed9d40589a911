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
        let n = r.spans().len();
        if n != last {
            println!("spans {n}");
            last = n;
        }
    }
}

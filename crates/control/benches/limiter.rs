//! The rate limiter leader's hot path: one permit decision and its settlement on a
//! sliding window, with the window full of earlier grants (the steady state of a
//! fleet over its limits).

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use flotilla_agent::ModelLimits;
use flotilla_control::limiter::RateWindow;

fn window_full_of(grants: u64) -> (RateWindow, u64) {
    let limits = ModelLimits {
        rpm: grants * 2,
        tpm: grants * 2_000,
    };
    let mut w = RateWindow::new(limits, Duration::from_secs(60), 0.2);
    // Spread `grants` over the minute, as a busy fleet would.
    let mut now = 0;
    for _ in 0..grants {
        now += 60_000 / grants;
        w.try_acquire(now, 500).unwrap();
    }
    (w, now)
}

fn bench(c: &mut Criterion) {
    for grants in [1_000u64, 10_000] {
        c.bench_function(
            &format!("acquire+settle, {grants} grants in the window"),
            |b| {
                let (mut w, mut now) = window_full_of(grants);
                b.iter(|| {
                    now += 1;
                    match w.try_acquire(black_box(now), black_box(500)) {
                        Ok(at) => w.settle(now, at, 500, 420),
                        Err(d) => {
                            black_box(d);
                        }
                    }
                })
            },
        );
        c.bench_function(&format!("denied, {grants} grants in the window"), |b| {
            let (mut w, now) = window_full_of(grants);
            // Fill to the cap, then time the refusal with its wait computation.
            while w.try_acquire(now, 500).is_ok() {}
            b.iter(|| black_box(w.try_acquire(black_box(now), black_box(500))))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Micro-benchmarks of the handoff state codec (inside the blackout: the source encodes, the
//! successor decodes and validates). `cargo bench -p tapir-state`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn codec(c: &mut Criterion) {
    let snapshot = tapir_state::example_snapshot();
    let blob = tapir_state::try_encode(&snapshot).expect("encode");
    c.bench_function("state encode (2 pairs, in-flight heads)", |b| {
        b.iter(|| black_box(tapir_state::encode(black_box(&snapshot))))
    });
    c.bench_function("state decode + validate", |b| {
        b.iter(|| black_box(tapir_state::decode(black_box(&blob)).expect("decode")))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);

//! Keyring lookups on the delivery path: the active epoch (in the snapshot), a retired epoch in
//! the LRU, and a retired epoch that has to be unwrapped again from the state directory.

use std::hint::black_box;

use cipherbus::envelope::{DataKey, RootKey};
use cipherbus::keyring::Keyring;
use criterion::{criterion_group, criterion_main, Criterion};

fn lookups(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    // A one-entry LRU, so alternating between two retired epochs always misses.
    let ring = Keyring::open(RootKey::from_bytes([3; 32]), Some(dir.path()), 1).unwrap();
    for epoch in 2..=4 {
        ring.stage(epoch, DataKey::generate().unwrap()).unwrap();
        ring.activate(epoch).unwrap();
    }
    let snap = ring.snapshot();
    let mut g = c.benchmark_group("keyring_lookup");
    g.bench_function("active", |b| {
        b.iter(|| black_box(ring.lookup(&snap, black_box(4)).is_ok()))
    });
    ring.lookup(&snap, 3).unwrap();
    g.bench_function("retired_lru_hit", |b| {
        b.iter(|| black_box(ring.lookup(&snap, black_box(3)).is_ok()))
    });
    let mut flip = false;
    g.bench_function("retired_lru_miss_unwrap_from_disk", |b| {
        b.iter(|| {
            flip = !flip;
            let epoch = if flip { 2 } else { 3 };
            black_box(ring.lookup(&snap, epoch).is_ok())
        })
    });
    g.bench_function("snapshot_load", |b| {
        b.iter(|| black_box(ring.snapshot().generation))
    });
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);

//! Envelope seal/open cost per message, with RustCrypto's
//! XChaCha20-Poly1305 as the baseline.
//!
//! The batched benches run once per AEAD path this CPU has (`seal_batch64/ifma/128`), and
//! once on the audited default (`seal_batch64/audited/128`), which does not batch.
//!
//! Run with `cargo bench --bench envelope`.

use std::time::Duration;

use bytes::BytesMut;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use cipherbus::envelope::{
    AeadBackend, Batch, BatchPath, DataKey, Header, Opener, Sealer, OVERHEAD,
};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 4] = [128, 1024, 16 * 1024, 64 * 1024];
const SUBJECT: &[u8] = b"orders.eu.new";

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| i as u8).collect()
}

fn seal(c: &mut Criterion) {
    let key = DataKey::from_bytes([7; 32]);
    let mut g = c.benchmark_group("seal");
    for size in SIZES {
        let pt = payload(size);
        let mut sealer = Sealer::new(1, &key).expect("random prefix");
        let mut out = BytesMut::with_capacity(size + OVERHEAD);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &pt, |b, pt| {
            b.iter(|| {
                out.clear();
                sealer
                    .seal_into(Some(SUBJECT), black_box(pt), &mut out)
                    .expect("seal");
                black_box(&out);
            })
        });
    }
    g.finish();
}

fn open(c: &mut Criterion) {
    let key = DataKey::from_bytes([7; 32]);
    let mut g = c.benchmark_group("open");
    for size in SIZES {
        let mut sealer = Sealer::new(1, &key).expect("random prefix");
        let mut env = BytesMut::new();
        sealer
            .seal_into(Some(SUBJECT), &payload(size), &mut env)
            .expect("seal");
        let mut opener = Opener::new();
        let mut out = BytesMut::with_capacity(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &env, |b, env| {
            b.iter(|| {
                out.clear();
                let header = Header::parse(black_box(env)).expect("header");
                opener
                    .open_into(&key, &header, env, SUBJECT, false, &mut out)
                    .expect("open");
                black_box(&out);
            })
        });
    }
    g.finish();
}

/// Messages per batch in the batched benches: what one 32 KiB read holds at 512 B.
const BATCH: usize = 64;
const BATCH_SIZES: [usize; 3] = [128, 1024, 4000];

/// How a bench finishes its batch. A default batch is the audited backend, which seals and
/// opens each message as it is queued, so every batched path is pinned by name here.
#[derive(Clone, Copy)]
enum Kind {
    /// The default: aws-lc-rs one message at a time, nothing deferred. The baseline.
    Audited,
    /// The batched backend choosing its own path for each pass, as a session does.
    Batched,
    /// The batched backend on one path.
    Pinned(BatchPath),
}

impl Kind {
    /// The audited baseline, then every path this CPU runs (and `Batched` if `auto`).
    fn all(auto: bool) -> Vec<Kind> {
        let mut kinds = vec![Kind::Audited];
        if auto {
            kinds.push(Kind::Batched);
        }
        kinds.extend(
            BatchPath::ALL
                .into_iter()
                .filter(|p| p.available())
                .map(Kind::Pinned),
        );
        kinds
    }

    /// The name in the benchmark id: `audited`, `batched`, `ifma`, `radix26`, `scalar`, `held`.
    fn name(self) -> String {
        match self {
            Kind::Audited => AeadBackend::Audited.name().to_owned(),
            Kind::Batched => AeadBackend::Batched.name().to_owned(),
            Kind::Pinned(p) => format!("{p:?}").to_lowercase(),
        }
    }

    fn batch(self) -> Batch {
        match self {
            Kind::Audited => Batch::default(),
            Kind::Batched => Batch::new(AeadBackend::Batched),
            Kind::Pinned(p) => Batch::pinned(p).expect("only available paths are listed"),
        }
    }
}

/// Sealing `BATCH` messages queued together and finished in one pass, as a session does
/// with the messages of one read, on each path. Throughput counts all of them. Passes end
/// with `seal_with`, as in the sessions, so `held` runs under the sealer's key.
fn seal_batch(c: &mut Criterion) {
    let key = DataKey::from_bytes([7; 32]);
    let mut g = c.benchmark_group("seal_batch64");
    for size in BATCH_SIZES {
        let pt = payload(size);
        let mut sealer = Sealer::new(1, &key).expect("random prefix");
        let mut out = BytesMut::with_capacity(BATCH * (size + OVERHEAD));
        g.throughput(Throughput::Bytes((BATCH * size) as u64));
        for kind in Kind::all(false) {
            let mut batch = kind.batch();
            g.bench_with_input(BenchmarkId::new(kind.name(), size), &pt, |b, pt| {
                b.iter(|| {
                    out.clear();
                    for _ in 0..BATCH {
                        sealer
                            .seal_deferred(Some(SUBJECT), black_box(pt), &mut out, &mut batch)
                            .expect("queued");
                    }
                    batch.seal_with(&mut out, &sealer).expect("sealed");
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

/// Batches as a session at a low rate sees them: one read, a few messages.
const SMALL_BATCHES: [usize; 4] = [1, 2, 4, 8];

/// Sealing a few 128-byte messages queued together; throughput counts all of them. `batched`
/// finishes the batch as the sessions do (one or two messages go one by one under the
/// sealer's key, more through the vector passes); the pinned paths show what each choice
/// costs, and `audited` what the default backend does.
fn seal_small_batch(c: &mut Criterion) {
    let key = DataKey::from_bytes([7; 32]);
    let mut g = c.benchmark_group("seal_small_batch");
    let pt = payload(128);
    let mut sealer = Sealer::new(1, &key).expect("random prefix");
    let mut out = BytesMut::with_capacity(8 * (128 + OVERHEAD));
    for n in SMALL_BATCHES {
        g.throughput(Throughput::Elements(n as u64));
        for kind in Kind::all(true) {
            let mut batch = kind.batch();
            g.bench_function(BenchmarkId::new(kind.name(), n), |b| {
                b.iter(|| {
                    out.clear();
                    for _ in 0..n {
                        sealer
                            .seal_deferred(Some(SUBJECT), black_box(&pt), &mut out, &mut batch)
                            .expect("queued");
                    }
                    batch.seal_with(&mut out, &sealer).expect("sealed");
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

/// Opening `BATCH` envelopes in one pass, on each path.
fn open_batch(c: &mut Criterion) {
    let key = DataKey::from_bytes([7; 32]);
    let mut g = c.benchmark_group("open_batch64");
    for size in BATCH_SIZES {
        let mut sealer = Sealer::new(1, &key).expect("random prefix");
        let envs: Vec<BytesMut> = (0..BATCH)
            .map(|_| {
                let mut env = BytesMut::new();
                sealer
                    .seal_into(Some(SUBJECT), &payload(size), &mut env)
                    .expect("seal");
                env
            })
            .collect();
        let mut opener = Opener::new();
        let mut out = BytesMut::with_capacity(BATCH * size);
        g.throughput(Throughput::Bytes((BATCH * size) as u64));
        for kind in Kind::all(false) {
            let mut batch = kind.batch();
            g.bench_function(BenchmarkId::new(kind.name(), size), |b| {
                b.iter(|| {
                    out.clear();
                    for env in &envs {
                        let header = Header::parse(black_box(env)).expect("header");
                        opener
                            .open_deferred(&key, &header, env, SUBJECT, false, &mut out, &mut batch)
                            .expect("queued");
                    }
                    let mut refused = 0;
                    batch.open_with(&mut out, &opener, |_| refused += 1);
                    assert_eq!(refused, 0);
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

/// RustCrypto XChaCha20-Poly1305 sealing the same sizes with a 45-byte AAD
/// (header plus subject), for comparison.
fn rustcrypto_baseline(c: &mut Criterion) {
    let cipher = XChaCha20Poly1305::new(&[7u8; 32].into());
    let nonce = XNonce::from([9u8; 24]);
    let aad = [1u8; 32 + SUBJECT.len()];
    let mut g = c.benchmark_group("rustcrypto_xchacha20poly1305_seal");
    for size in SIZES {
        let mut buf = payload(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                let tag = cipher
                    .encrypt_in_place_detached(&nonce, &aad, black_box(&mut buf))
                    .expect("seal");
                black_box(tag);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = seal, open, seal_batch, open_batch, seal_small_batch, rustcrypto_baseline
}
criterion_main!(benches);

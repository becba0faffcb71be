//! Parse and encode throughput of `cipherbus::proto` over recorded streams of `PUB` ops (agent
//! side) and `MSG` ops (server side), with small and large payloads.
//!
//! `parse` takes the whole stream from one buffer; `parse_reads` feeds it in 32 KiB pieces, as
//! socket reads would arrive; `encode` writes the parsed ops back out canonically.

use std::hint::black_box;

use bytes::{Buf, Bytes, BytesMut};
use cipherbus::proto::{
    encode_client_op, encode_server_op, ClientOp, ClientParser, ServerOp, ServerParser,
};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

/// Roughly this many bytes per recorded stream.
const STREAM_BYTES: usize = 1 << 20;
const PAYLOAD_SIZES: [usize; 2] = [128, 16 * 1024];
const READ_SIZE: usize = 32 * 1024;
const MAX_PAYLOAD: usize = 1 << 20;

fn payload(size: usize, seed: usize) -> Bytes {
    (0..size)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn op_count(size: usize) -> usize {
    (STREAM_BYTES / (size + 48)).max(1)
}

/// A recorded agent stream: publishes on a few subjects, every fourth one a request.
fn pub_stream(size: usize) -> (Vec<ClientOp>, Bytes) {
    let ops: Vec<ClientOp> = (0..op_count(size))
        .map(|i| ClientOp::Pub {
            subject: Bytes::from(format!("orders.eu.{}", i % 16)),
            reply: (i % 4 == 0).then(|| Bytes::from(format!("_INBOX.Zx9Hq2LmP0aB.{i}"))),
            payload: payload(size, i),
        })
        .collect();
    let mut wire = BytesMut::new();
    for op in &ops {
        encode_client_op(op, &mut wire);
    }
    (ops, wire.freeze())
}

/// A recorded server stream: deliveries to a few subscriptions, every fourth with a reply.
fn msg_stream(size: usize) -> (Vec<ServerOp>, Bytes) {
    let ops: Vec<ServerOp> = (0..op_count(size))
        .map(|i| ServerOp::Msg {
            subject: Bytes::from(format!("orders.eu.{}", i % 16)),
            sid: Bytes::from(format!("{}", 1 + i % 3)),
            reply: (i % 4 == 0).then(|| Bytes::from(format!("_INBOX.Zx9Hq2LmP0aB.{i}"))),
            payload: payload(size, i),
        })
        .collect();
    let mut wire = BytesMut::new();
    for op in &ops {
        encode_server_op(op, &mut wire);
    }
    (ops, wire.freeze())
}

fn parse_client(buf: &mut BytesMut, p: &mut ClientParser) -> usize {
    let (mut n, mut used) = (0, 0);
    while let Some((op, len)) = p
        .parse(&buf[used..], MAX_PAYLOAD)
        .expect("recorded stream is valid")
    {
        black_box(&op);
        used += len;
        n += 1;
    }
    buf.advance(used);
    n
}

fn parse_server(buf: &mut BytesMut, p: &mut ServerParser) -> usize {
    let (mut n, mut used) = (0, 0);
    while let Some((op, len)) = p
        .parse(&buf[used..], MAX_PAYLOAD)
        .expect("recorded stream is valid")
    {
        black_box(&op);
        used += len;
        n += 1;
    }
    buf.advance(used);
    n
}

fn bench_pub(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto/pub");
    for size in PAYLOAD_SIZES {
        let (ops, wire) = pub_stream(size);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse", size), &wire, |b, wire| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| {
                    let n = parse_client(buf, &mut ClientParser::new());
                    assert_eq!(n, ops.len());
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("parse_reads", size), &wire, |b, wire| {
            b.iter(|| {
                let mut p = ClientParser::new();
                let mut buf = BytesMut::with_capacity(READ_SIZE * 2);
                let mut n = 0;
                for read in wire.chunks(READ_SIZE) {
                    buf.extend_from_slice(read);
                    n += parse_client(&mut buf, &mut p);
                }
                assert_eq!(n, ops.len());
            })
        });
        g.bench_with_input(BenchmarkId::new("encode", size), &ops, |b, ops| {
            let mut out = BytesMut::with_capacity(wire.len());
            b.iter(|| {
                out.clear();
                for op in ops {
                    encode_client_op(op, &mut out);
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn bench_msg(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto/msg");
    for size in PAYLOAD_SIZES {
        let (ops, wire) = msg_stream(size);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse", size), &wire, |b, wire| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| {
                    let n = parse_server(buf, &mut ServerParser::new());
                    assert_eq!(n, ops.len());
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("parse_reads", size), &wire, |b, wire| {
            b.iter(|| {
                let mut p = ServerParser::new();
                let mut buf = BytesMut::with_capacity(READ_SIZE * 2);
                let mut n = 0;
                for read in wire.chunks(READ_SIZE) {
                    buf.extend_from_slice(read);
                    n += parse_server(&mut buf, &mut p);
                }
                assert_eq!(n, ops.len());
            })
        });
        g.bench_with_input(BenchmarkId::new("encode", size), &ops, |b, ops| {
            let mut out = BytesMut::with_capacity(wire.len());
            b.iter(|| {
                out.clear();
                for op in ops {
                    encode_server_op(op, &mut out);
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_pub, bench_msg);
criterion_main!(benches);

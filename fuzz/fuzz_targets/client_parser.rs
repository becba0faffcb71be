//! Arbitrary bytes from an agent: parsing never panics, does not depend on how the bytes are
//! split into reads (one cut the input picks, and one byte per read), keeps its buffer contract
//! (an op never claims more bytes than it was given, and a wait is for at least one more), and every op it yields survives a canonical encode and re-parse
//! unchanged.

#![no_main]

use bytes::{Buf, Bytes, BytesMut};
use cipherbus::proto::{encode_client_op, ClientOp, ClientParser, ProtoError};
use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: usize = 64 * 1024;

fn parse_reads(reads: &[&[u8]]) -> (Vec<ClientOp>, Option<ProtoError>) {
    let mut parser = ClientParser::new();
    let mut buf = BytesMut::new();
    let mut ops = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        let mut used = 0;
        loop {
            let rest = &buf[used..];
            match parser.parse(rest, MAX_PAYLOAD) {
                Ok(Some((op, len))) => {
                    assert!(len > 0 && len <= rest.len(), "took {len} of {}", rest.len());
                    ops.push(op.map(Bytes::copy_from_slice));
                    used += len;
                }
                Ok(None) => {
                    assert_ne!(parser.needed(), Some(0));
                    break;
                }
                Err(err) => return (ops, Some(err)),
            }
        }
        buf.advance(used);
    }
    (ops, None)
}

fn encode(ops: &[ClientOp]) -> BytesMut {
    let mut out = BytesMut::new();
    for op in ops {
        encode_client_op(op, &mut out);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (ops, err) = parse_reads(&[data]);

    // The same bytes in two reads, split at a point the input picks.
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (a, b) = data.split_at(cut);
    assert_eq!(
        parse_reads(&[a, b]),
        (ops.clone(), err),
        "split at {cut}"
    );

    // One byte per read: every split point at once (bounded, as each read may rescan the line).
    if data.len() <= 1024 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(parse_reads(&bytes), (ops.clone(), err), "one byte per read");
    }

    // Round trip through the canonical form, which is a fixed point.
    let wire = encode(&ops);
    let (again, err) = parse_reads(&[&wire]);
    assert_eq!(err, None);
    assert_eq!(again, ops);
    assert_eq!(encode(&again), wire);
});

//! Arbitrary bytes from an agent: parsing never panics, does not depend on how the bytes are
//! split into reads (one cut the input picks, and one byte per read), keeps its buffer contract
//! when it asks for more, and every op it yields survives a canonical encode and re-parse
//! unchanged.

#![no_main]

use bytes::BytesMut;
use cipherbus::proto::{encode_client_op, ClientOp, ClientParser, ProtoError};
use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: usize = 64 * 1024;

fn parse_reads(reads: &[&[u8]]) -> (Vec<ClientOp>, Option<ProtoError>) {
    let mut parser = ClientParser::new();
    let mut buf = BytesMut::new();
    let mut ops = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            let before = buf.clone();
            match parser.parse(&mut buf, MAX_PAYLOAD) {
                Ok(Some(op)) => ops.push(op),
                Ok(None) => {
                    // The buffer contract: untouched, unless a complete PUB/HPUB/MSG/HMSG line
                    // was taken, after which only payload is left and the parser says how much
                    // more it needs.
                    if buf != before {
                        assert!(before.ends_with(&buf), "consumed more than a line");
                        assert!(parser.needed().is_some(), "consumed without a payload due");
                    }
                    assert_ne!(parser.needed(), Some(0));
                    break;
                }
                Err(err) => return (ops, Some(err)),
            }
        }
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
        (ops.clone(), err.clone()),
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

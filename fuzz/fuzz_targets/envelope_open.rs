//! Opening envelopes: the opener accepts exactly the envelopes the sealer made, on the subject
//! they were bound to, under the key that made them.
//!
//! Two kinds of input, picked by the low bit of the first byte:
//! - even: seal a chosen plaintext on a chosen subject, then apply chosen mutations to the
//!   envelope, the subject or the key. Open must succeed with the original plaintext when the
//!   net result is unchanged, and fail whenever anything differs, even with the right key.
//! - odd: `[len][subject; len][envelope...]` straight from the fuzzer. Open may only succeed
//!   if the bytes are exactly what the sealer would have produced for that header.
//!
//! On every failure, the output buffer is left exactly as it was. Every open and every seal is
//! also done the batched way (`open_deferred`/`seal_deferred` then one `Batch` pass, as the
//! sessions do), which must give the same result byte for byte.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use cipherbus::envelope::{
    derive_epoch1, is_envelope, Batch, DataKey, EnvelopeError, Header, Opener, RootKey, Sealer,
    HEADER_LEN, MAGIC,
};
use libfuzzer_sys::fuzz_target;

/// The root key of the vectors in docs/ENVELOPE.md, so the published envelopes are seeds.
const VECTOR_KEK: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,
];

/// Bytes already in the output buffer, which a failed open must not touch.
const SENTINEL: &[u8] = b"kept";

#[derive(Debug, Arbitrary)]
enum Mutation {
    FlipBit {
        at: u16,
        bit: u8,
    },
    SetByte {
        at: u16,
        value: u8,
    },
    Truncate {
        len: u16,
    },
    Append(Vec<u8>),
    Insert {
        at: u16,
        byte: u8,
    },
    Remove {
        at: u16,
    },
    /// Rewrites the epoch field of the header.
    Epoch(u32),
    /// Opens on another subject.
    Subject(Vec<u8>),
    /// Opens under another key.
    OtherKey,
}

#[derive(Debug, Arbitrary)]
struct Sealed {
    subject: Vec<u8>,
    plaintext: Vec<u8>,
    bound: bool,
    epoch: u32,
    prefix: [u8; 16],
    counter: u64,
    mutations: Vec<Mutation>,
}

fn key() -> DataKey {
    derive_epoch1(&RootKey::from_bytes(VECTOR_KEK))
}

fn other_key() -> DataKey {
    DataKey::from_bytes([0x5a; 32])
}

/// Parses the header and opens into a buffer that already holds [`SENTINEL`].
fn open(
    opener: &mut Opener,
    key: &DataKey,
    envelope: &[u8],
    subject: &[u8],
    allow_unbound: bool,
) -> Result<Vec<u8>, EnvelopeError> {
    let header = Header::parse(envelope)?;
    let mut out = BytesMut::from(SENTINEL);
    let result = opener.open_into(key, &header, envelope, subject, allow_unbound, &mut out);
    let batched = open_batched(opener, key, &header, envelope, subject, allow_unbound);
    match (&result, &batched) {
        (Ok(()), Ok(pt)) => assert_eq!(&out[SENTINEL.len()..], &pt[..], "batched open differs"),
        (Err(a), Err(b)) => assert_eq!(a, b, "batched open failed differently"),
        _ => panic!("batched open disagrees: {result:?} vs {batched:?}"),
    }
    match result {
        Ok(()) => {
            assert_eq!(
                &out[..SENTINEL.len()],
                SENTINEL,
                "open overwrote the buffer"
            );
            Ok(out[SENTINEL.len()..].to_vec())
        }
        Err(e) => {
            assert_eq!(&out[..], SENTINEL, "failed open changed the buffer ({e:?})");
            Err(e)
        }
    }
}

/// The same open as the sessions do it: queued behind another message, then one batch pass.
/// A failed tag is reported by the pass, and the queued bytes are zeroed.
fn open_batched(
    opener: &mut Opener,
    key: &DataKey,
    header: &Header,
    envelope: &[u8],
    subject: &[u8],
    allow_unbound: bool,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut batch = Batch::default();
    let mut out = BytesMut::from(SENTINEL);
    opener.open_deferred(
        key,
        header,
        envelope,
        subject,
        allow_unbound,
        &mut out,
        &mut batch,
    )?;
    let queued = batch.len();
    let mut failed = Vec::new();
    batch.open(&mut out, |i| failed.push(i));
    assert_eq!(
        &out[..SENTINEL.len()],
        SENTINEL,
        "batched open overwrote the buffer"
    );
    let text = &out[SENTINEL.len()..];
    if failed.is_empty() {
        Ok(text.to_vec())
    } else {
        assert_eq!((failed, queued), (vec![0], 1));
        assert!(
            text.iter().all(|&b| b == 0),
            "refused bytes were not zeroed"
        );
        Err(EnvelopeError::Auth)
    }
}

/// Seals with a sealer at `prefix` and `counter`, once at once and once batched (behind
/// bytes already in the buffer); both must give the same envelope.
fn seal(
    epoch: u32,
    key: &DataKey,
    prefix: [u8; 16],
    counter: u64,
    subject: Option<&[u8]>,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = BytesMut::new();
    Sealer::with_prefix(epoch, key, prefix, counter)
        .seal_into(subject, plaintext, &mut out)
        .expect("sealing a fuzz-sized message cannot fail");
    let mut batch = Batch::default();
    let mut queued = BytesMut::from(SENTINEL);
    Sealer::with_prefix(epoch, key, prefix, counter)
        .seal_deferred(subject, plaintext, &mut queued, &mut batch)
        .expect("queueing a fuzz-sized message cannot fail");
    batch.seal(&mut queued).expect("every queued range fits");
    assert_eq!(&queued[..SENTINEL.len()], SENTINEL);
    assert_eq!(&queued[SENTINEL.len()..], &out[..], "batched seal differs");
    out.to_vec()
}

fn sealed_then_mutated(input: Sealed) {
    let key = key();
    let counter = input.counter.min(u64::MAX - 1);
    let bound_to = input.bound.then_some(&input.subject[..]);
    let original = seal(
        input.epoch,
        &key,
        input.prefix,
        counter,
        bound_to,
        &input.plaintext,
    );
    assert_eq!(original.len(), input.plaintext.len() + 48);

    // The unmodified envelope opens, through a fresh opener and again from its cache.
    let mut cached = Opener::with_capacity(2);
    for _ in 0..2 {
        let pt = open(&mut cached, &key, &original, &input.subject, !input.bound);
        assert_eq!(pt.as_deref(), Ok(&input.plaintext[..]));
    }
    if !input.bound {
        // Unbound envelopes need the caller's permission, and then open on any subject.
        assert_eq!(
            open(&mut cached, &key, &original, &input.subject, false),
            Err(EnvelopeError::Unbound)
        );
        let pt = open(&mut cached, &key, &original, b"elsewhere", true);
        assert_eq!(pt.as_deref(), Ok(&input.plaintext[..]));
    }

    let mut envelope = original.clone();
    let mut subject = input.subject.clone();
    let mut other = false;
    for m in &input.mutations {
        let len = envelope.len();
        match *m {
            Mutation::FlipBit { at, bit } if len > 0 => {
                envelope[usize::from(at) % len] ^= 1 << (bit % 8);
            }
            Mutation::SetByte { at, value } if len > 0 => envelope[usize::from(at) % len] = value,
            Mutation::Truncate { len: to } => envelope.truncate(usize::from(to)),
            Mutation::Append(ref more) => envelope.extend_from_slice(more),
            Mutation::Insert { at, byte } => envelope.insert(usize::from(at) % (len + 1), byte),
            Mutation::Remove { at } if len > 0 => {
                envelope.remove(usize::from(at) % len);
            }
            Mutation::Epoch(epoch) if len >= 8 => {
                envelope[4..8].copy_from_slice(&epoch.to_be_bytes());
            }
            Mutation::Subject(ref s) => subject.clone_from(s),
            Mutation::OtherKey => other = true,
            _ => {}
        }
    }
    // An unbound envelope does not depend on the subject, so only a bound one is changed by it.
    let modified = envelope != original || (input.bound && subject != input.subject) || other;
    let open_key = if other { other_key() } else { key.clone() };

    for opener in [&mut cached, &mut Opener::new()] {
        let got = open(opener, &open_key, &envelope, &subject, true);
        if modified {
            assert!(got.is_err(), "a modified envelope opened: {got:?}");
        } else {
            assert_eq!(got.as_deref(), Ok(&input.plaintext[..]));
        }
    }
    // As the session does it: the header's epoch picks the key.
    if let Ok(header) = Header::parse(&envelope) {
        let by_epoch = if header.epoch == input.epoch && !other {
            key.clone()
        } else {
            DataKey::from_bytes([header.epoch as u8; 32])
        };
        let got = open(&mut Opener::new(), &by_epoch, &envelope, &subject, true);
        assert_eq!(got.is_ok(), !modified, "{got:?}");
    }
}

fn raw(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (subject, envelope) = rest.split_at(usize::from(n).min(rest.len()));
    let header = match Header::parse(envelope) {
        Ok(h) => h,
        Err(e) => {
            assert_eq!(
                e == EnvelopeError::NotEnvelope,
                !is_envelope(envelope),
                "{e:?}"
            );
            return;
        }
    };
    assert_eq!(envelope[0], MAGIC);
    assert_eq!(header.encode()[..], envelope[..HEADER_LEN]);
    let key = key();
    for k in [&key, &other_key()] {
        let Ok(pt) = open(&mut Opener::new(), k, envelope, subject, true) else {
            continue;
        };
        // Only a genuine envelope opens: resealing its plaintext under the header's nonce
        // must give back exactly the same bytes.
        assert!(k == &key, "opened under a key that never sealed anything");
        let bound_to = header.subject_bound().then_some(subject);
        let (prefix, counter) = (header.nonce_prefix(), header.counter());
        let again = seal(header.epoch, k, prefix, counter, bound_to, &pt);
        assert_eq!(again, envelope, "an envelope the sealer never made opened");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(input) = Sealed::arbitrary_take_rest(Unstructured::new(rest)) {
            sealed_then_mutated(input);
        }
    } else {
        raw(rest);
    }
});

//! Opening envelopes: the opener accepts exactly the envelopes the sealer made, on the subject
//! they were bound to, under the key that made them.
//!
//! Two kinds of input, picked by the low bit of the first byte:
//! - even: seal a chosen plaintext on a chosen subject, for the default scope (version 1) or a
//!   chosen key scope (version 2), then apply chosen mutations to the envelope, the subject or
//!   the key, among them relabelling the envelope into another scope or version. Open must
//!   succeed with the original plaintext when the net result is unchanged, and fail whenever
//!   anything differs, even with the right key.
//! - odd: `[len][subject; len][envelope...]` straight from the fuzzer. Open may only succeed
//!   if the bytes are exactly what the sealer would have produced for that header.
//!
//! On every failure, the output buffer is left exactly as it was. Every open and every seal is
//! also done the deferred way (`open_deferred`/`seal_deferred` then one `Batch` pass, as the
//! sessions do), which must give the same result byte for byte. The other seven bits of the
//! first byte pick the [`Way`] that batch runs: the batched backend choosing its path (for one
//! or two messages, one by one under the keys the sealer or opener holds), the audited default
//! (nothing deferred), or one batched path pinned (IFMA, radix 2^26, aws-lc under the batch's
//! own keys, aws-lc under held keys). A deferred open shares its pass with a genuine envelope
//! of the other version queued before it, which must open whatever happens to the fuzzed one.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use cipherbus::envelope::{
    derive_epoch1, is_envelope, AeadBackend, Batch, BatchPath, DataKey, EnvelopeError, Header,
    Opener, RootKey, ScopeId, Sealer, BATCH_BELOW, HEADER_LEN, HEADER_LEN_V2, MAGIC, OVERHEAD,
    OVERHEAD_V2, VERSION_1, VERSION_2,
};
use libfuzzer_sys::fuzz_target;

/// The root key of the vectors in docs/ENVELOPE.md, so the published envelopes are seeds.
const VECTOR_KEK: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,
];

/// Bytes already in the output buffer, which a failed open must not touch.
const SENTINEL: &[u8] = b"kept";

/// The plaintext of the genuine envelope queued before the fuzzed one. Not a multiple of 16
/// bytes, so its Poly1305 lane ends in a partial block.
const COMPANION: &[u8] = b"the message before it in the same read";

/// One way to finish the envelopes of a read.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// `Batch::default()`: the audited backend, which defers nothing.
    Audited,
    /// The batched backend choosing its path for each pass, as a session does.
    Batched,
    /// The batched backend on one path.
    Pinned(BatchPath),
}

impl Way {
    /// The way `n` names. One way per input rather than all six: running every way on every
    /// input made the target about eight times slower. A path this CPU lacks runs as the
    /// batched backend would here, so an input names the same way on every machine.
    fn pick(n: u8) -> Way {
        const WAYS: [Way; 6] = [
            Way::Batched,
            Way::Audited,
            Way::Pinned(BatchPath::Ifma),
            Way::Pinned(BatchPath::Radix26),
            Way::Pinned(BatchPath::Scalar),
            Way::Pinned(BatchPath::Held),
        ];
        match WAYS[usize::from(n) % WAYS.len()] {
            Way::Pinned(p) if !p.available() => Way::Batched,
            way => way,
        }
    }

    fn batch(self) -> Batch {
        match self {
            Way::Audited => Batch::default(),
            Way::Batched => Batch::new(AeadBackend::Batched),
            Way::Pinned(p) => Batch::pinned(p).expect("only available paths are picked"),
        }
    }
}

/// The scope of the version-2 companion of a version-1 envelope.
const COMPANION_SCOPE: &str = "payments";

/// A genuine envelope for the same key, epoch and nonce prefix as `header`, bound to
/// `subject`: it shares the opener's cached subkey with the envelope under test, so the
/// batched backend still takes the held-keys path for the pair. It is of the other version
/// (version 2 beside a version-1 envelope, version 1 beside a version-2 one), so every pass
/// mixes headers of 32 and 40 bytes.
fn companion(key: &DataKey, header: &Header, subject: &[u8]) -> (Header, Vec<u8>) {
    // Another counter than the header's; `u64::MAX` is never a sealer's counter.
    let counter = match header.counter() {
        0 => 1,
        c => c - 1,
    };
    let scope = match header.scope {
        Some(_) => None,
        None => Some(ScopeId::of(COMPANION_SCOPE)),
    };
    let mut out = BytesMut::new();
    Sealer::scoped_with_prefix(header.epoch, key, scope, header.nonce_prefix(), counter)
        .seal_into(Some(subject), COMPANION, &mut out)
        .expect("sealing a short message cannot fail");
    let envelope = out.to_vec();
    (
        Header::parse(&envelope).expect("a sealed header parses"),
        envelope,
    )
}

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
    /// Relabels the envelope: `Some(id)` makes it version 2 of scope `id` (replacing the id of
    /// a version-2 envelope, inserting one after the nonce of a version-1 envelope), `None`
    /// makes it version 1 (dropping the id of a version-2 envelope).
    Relabel(Option<[u8; 8]>),
}

/// Applies [`Mutation::Relabel`] to `envelope`, as far as its length allows.
fn relabel(envelope: &mut Vec<u8>, to: Option<[u8; 8]>) {
    if envelope.len() < HEADER_LEN {
        return;
    }
    let v2 = envelope[1] == VERSION_2 && envelope.len() >= HEADER_LEN_V2;
    match (to, v2) {
        (Some(id), true) => envelope[HEADER_LEN..HEADER_LEN_V2].copy_from_slice(&id),
        (Some(id), false) => {
            envelope[1] = VERSION_2;
            envelope.splice(HEADER_LEN..HEADER_LEN, id);
        }
        (None, true) => {
            envelope[1] = VERSION_1;
            envelope.drain(HEADER_LEN..HEADER_LEN_V2);
        }
        (None, false) => envelope[1] = VERSION_1,
    }
}

#[derive(Debug, Arbitrary)]
struct Sealed {
    subject: Vec<u8>,
    plaintext: Vec<u8>,
    bound: bool,
    epoch: u32,
    prefix: [u8; 16],
    counter: u64,
    /// `Some`: sealed as version 2 for the scope of this id; `None`: version 1.
    scope: Option<[u8; 8]>,
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
    way: Way,
    key: &DataKey,
    envelope: &[u8],
    subject: &[u8],
    allow_unbound: bool,
) -> Result<Vec<u8>, EnvelopeError> {
    let header = Header::parse(envelope)?;
    let mut out = BytesMut::from(SENTINEL);
    let result = opener.open_into(key, &header, envelope, subject, allow_unbound, &mut out);
    let batched = open_batched(opener, way, key, &header, envelope, subject, allow_unbound);
    match (&result, &batched) {
        (Ok(()), Ok(pt)) => assert_eq!(
            &out[SENTINEL.len()..],
            &pt[..],
            "{way:?}: batched open differs"
        ),
        (Err(a), Err(b)) => assert_eq!(a, b, "{way:?}: batched open failed differently"),
        _ => panic!("{way:?}: batched open disagrees: {result:?} vs {batched:?}"),
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

/// The same open as the sessions do it, `way`: queued behind bytes already in the buffer and
/// behind a genuine envelope, then one pass with the opener's keys. A failed tag is reported
/// by the pass for that message alone, and its queued bytes are zeroed.
fn open_batched(
    opener: &mut Opener,
    way: Way,
    key: &DataKey,
    header: &Header,
    envelope: &[u8],
    subject: &[u8],
    allow_unbound: bool,
) -> Result<Vec<u8>, EnvelopeError> {
    let before = companion(key, header, subject);
    let mut batch = way.batch();
    let mut out = BytesMut::from(SENTINEL);
    opener
        .open_deferred(
            key, &before.0, &before.1, subject, false, &mut out, &mut batch,
        )
        .expect("a genuine envelope is queued");
    let start = out.len();
    let result = opener.open_deferred(
        key,
        header,
        envelope,
        subject,
        allow_unbound,
        &mut out,
        &mut batch,
    );
    if result.is_err() {
        assert_eq!(
            out.len(),
            start,
            "{way:?}: a refused open wrote to the buffer"
        );
    }
    let queued = batch.len();
    // The audited backend opens at once; the batched one defers what is short enough.
    let deferred = batch.defers() && envelope.len() < BATCH_BELOW + header.overhead();
    assert_eq!(
        queued,
        usize::from(batch.defers()) + usize::from(deferred && result.is_ok()),
        "{way:?}: deferred the wrong messages"
    );
    let mut failed = Vec::new();
    batch.open_with(&mut out, opener, |i| failed.push(i));
    assert_eq!(
        &out[..SENTINEL.len()],
        SENTINEL,
        "{way:?}: batched open overwrote the buffer"
    );
    assert_eq!(
        &out[SENTINEL.len()..start],
        COMPANION,
        "{way:?}: the envelope before it did not open"
    );
    result?;
    let text = &out[start..];
    if failed.is_empty() {
        Ok(text.to_vec())
    } else {
        assert_eq!((failed, queued), (vec![1], 2), "{way:?}");
        assert!(
            text.iter().all(|&b| b == 0),
            "{way:?}: refused bytes were not zeroed"
        );
        Err(EnvelopeError::Auth)
    }
}

/// Seals with a sealer for `scope` at `prefix` and `counter`, once at once and once deferred
/// `way` (behind bytes already in the buffer); both must give the same envelope.
#[allow(clippy::too_many_arguments)]
fn seal(
    way: Way,
    epoch: u32,
    key: &DataKey,
    scope: Option<ScopeId>,
    prefix: [u8; 16],
    counter: u64,
    subject: Option<&[u8]>,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = BytesMut::new();
    Sealer::scoped_with_prefix(epoch, key, scope, prefix, counter)
        .seal_into(subject, plaintext, &mut out)
        .expect("sealing a fuzz-sized message cannot fail");
    let mut batch = way.batch();
    let mut queued = BytesMut::from(SENTINEL);
    let mut sealer = Sealer::scoped_with_prefix(epoch, key, scope, prefix, counter);
    sealer
        .seal_deferred(subject, plaintext, &mut queued, &mut batch)
        .expect("queueing a fuzz-sized message cannot fail");
    let deferred = batch.defers() && plaintext.len() < BATCH_BELOW;
    assert_eq!(batch.len(), usize::from(deferred), "{way:?}");
    // With the sealer's key, as the sessions finish a pass: the held-keys path uses it.
    batch
        .seal_with(&mut queued, &sealer)
        .expect("every queued range fits");
    assert_eq!(&queued[..SENTINEL.len()], SENTINEL, "{way:?}");
    assert_eq!(
        &queued[SENTINEL.len()..],
        &out[..],
        "{way:?}: batched seal differs"
    );
    out.to_vec()
}

fn sealed_then_mutated(input: Sealed, way: Way) {
    let key = key();
    let counter = input.counter.min(u64::MAX - 1);
    let bound_to = input.bound.then_some(&input.subject[..]);
    let scope = input.scope.map(ScopeId);
    let original = seal(
        way,
        input.epoch,
        &key,
        scope,
        input.prefix,
        counter,
        bound_to,
        &input.plaintext,
    );
    let overhead = if scope.is_some() {
        OVERHEAD_V2
    } else {
        OVERHEAD
    };
    assert_eq!(original.len(), input.plaintext.len() + overhead);
    let header = Header::parse(&original).expect("a sealed envelope parses");
    assert_eq!(header.scope, scope);
    assert_eq!(header.overhead(), overhead);

    // The unmodified envelope opens, through a fresh opener and again from its cache.
    let mut cached = Opener::with_capacity(2);
    for _ in 0..2 {
        let pt = open(
            &mut cached,
            way,
            &key,
            &original,
            &input.subject,
            !input.bound,
        );
        assert_eq!(pt.as_deref(), Ok(&input.plaintext[..]));
    }
    if !input.bound {
        // Unbound envelopes need the caller's permission, and then open on any subject.
        assert_eq!(
            open(&mut cached, way, &key, &original, &input.subject, false),
            Err(EnvelopeError::Unbound)
        );
        let pt = open(&mut cached, way, &key, &original, b"elsewhere", true);
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
            Mutation::Relabel(to) => relabel(&mut envelope, to),
            _ => {}
        }
    }
    // An unbound envelope does not depend on the subject, so only a bound one is changed by it.
    let modified = envelope != original || (input.bound && subject != input.subject) || other;
    let open_key = if other { other_key() } else { key.clone() };

    for opener in [&mut cached, &mut Opener::new()] {
        let got = open(opener, way, &open_key, &envelope, &subject, true);
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
        let got = open(
            &mut Opener::new(),
            way,
            &by_epoch,
            &envelope,
            &subject,
            true,
        );
        assert_eq!(got.is_ok(), !modified, "{got:?}");
    }
}

fn raw(data: &[u8], way: Way) {
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
    assert_eq!(header.encode()[..], envelope[..header.header_len()]);
    assert_eq!(header.scope.is_some(), envelope[1] == VERSION_2);
    let key = key();
    for k in [&key, &other_key()] {
        let Ok(pt) = open(&mut Opener::new(), way, k, envelope, subject, true) else {
            continue;
        };
        // Only a genuine envelope opens: resealing its plaintext under the header's nonce
        // must give back exactly the same bytes.
        assert!(k == &key, "opened under a key that never sealed anything");
        let bound_to = header.subject_bound().then_some(subject);
        let (prefix, counter) = (header.nonce_prefix(), header.counter());
        let again = seal(
            way,
            header.epoch,
            k,
            header.scope,
            prefix,
            counter,
            bound_to,
            &pt,
        );
        assert_eq!(again, envelope, "an envelope the sealer never made opened");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let way = Way::pick(mode >> 1);
    if mode & 1 == 0 {
        if let Ok(input) = Sealed::arbitrary_take_rest(Unstructured::new(rest)) {
            sealed_then_mutated(input, way);
        }
    } else {
        raw(rest, way);
    }
});

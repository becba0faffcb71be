//! Cross-cutting tests: RustCrypto interop, property tests over seal/open,
//! tamper and truncation resistance, and the published test vectors.

use bytes::BytesMut;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use proptest::prelude::*;

use super::wrap::wrap_key_with_nonce;
use super::*;

const DOC: &str = include_str!("../../docs/ENVELOPE.md");

fn seal(s: &mut Sealer, subject: Option<&[u8]>, pt: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    s.seal_into(subject, pt, &mut out).unwrap();
    assert_eq!(out.len(), pt.len() + OVERHEAD);
    out.to_vec()
}

/// Opens with a fresh opener, checking that failures append nothing.
fn open(
    key: &DataKey,
    env: &[u8],
    subject: &[u8],
    allow_unbound: bool,
) -> Result<Vec<u8>, EnvelopeError> {
    let h = Header::parse(env)?;
    let mut out = BytesMut::from(&b"pre"[..]);
    let r = Opener::new().open_into(key, &h, env, subject, allow_unbound, &mut out);
    match r {
        Ok(()) => Ok(out[3..].to_vec()),
        Err(e) => {
            assert_eq!(&out[..], b"pre", "failed open must not append");
            Err(e)
        }
    }
}

fn rustcrypto_open(key: &[u8; 32], env: &[u8], subject: Option<&[u8]>) -> Vec<u8> {
    let h = Header::parse(env).unwrap();
    let mut aad = env[..HEADER_LEN].to_vec();
    if let Some(s) = subject {
        aad.extend_from_slice(s);
    }
    let tag_at = env.len() - TAG_LEN;
    let mut buf = env[HEADER_LEN..tag_at].to_vec();
    XChaCha20Poly1305::new(key.into())
        .decrypt_in_place_detached(
            XNonce::from_slice(&h.nonce),
            &aad,
            &mut buf,
            env[tag_at..].into(),
        )
        .expect("RustCrypto opens our envelope");
    buf
}

fn rustcrypto_seal(
    key: &[u8; 32],
    epoch: u32,
    nonce: [u8; 24],
    subject: Option<&[u8]>,
    pt: &[u8],
) -> Vec<u8> {
    let header = Header {
        version: VERSION_1,
        suite: SUITE_XCHACHA20_POLY1305,
        flags: if subject.is_some() {
            FLAG_SUBJECT_BOUND
        } else {
            0
        },
        epoch,
        nonce,
        scope: None,
    }
    .encode();
    let mut aad = header.to_vec();
    if let Some(s) = subject {
        aad.extend_from_slice(s);
    }
    let mut buf = pt.to_vec();
    let tag = XChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut buf)
        .unwrap();
    let mut env = header.to_vec();
    env.extend_from_slice(&buf);
    env.extend_from_slice(&tag);
    env
}

fn subject_strategy() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..40))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn ours_opens_with_rustcrypto(
        key in any::<[u8; 32]>(),
        prefix in any::<[u8; 16]>(),
        counter in 0u64..u64::MAX - 1,
        epoch in any::<u32>(),
        subject in subject_strategy(),
        pt in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let dk = DataKey::from_bytes(key);
        let mut s = Sealer::with_prefix(epoch, &dk, prefix, counter);
        let env = seal(&mut s, subject.as_deref(), &pt);
        let h = Header::parse(&env).unwrap();
        prop_assert_eq!(h.epoch, epoch);
        prop_assert_eq!(h.nonce_prefix(), prefix);
        prop_assert_eq!(h.counter(), counter);
        prop_assert_eq!(rustcrypto_open(&key, &env, subject.as_deref()), pt);
    }

    #[test]
    fn rustcrypto_opens_with_ours(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 24]>(),
        epoch in any::<u32>(),
        subject in subject_strategy(),
        pt in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let env = rustcrypto_seal(&key, epoch, nonce, subject.as_deref(), &pt);
        let dk = DataKey::from_bytes(key);
        let got = open(&dk, &env, subject.as_deref().unwrap_or(b"ignored"), subject.is_none());
        prop_assert_eq!(got, Ok(pt));
    }

    #[test]
    fn seal_open_round_trip(
        key in any::<[u8; 32]>(),
        epoch in any::<u32>(),
        subject in prop::collection::vec(any::<u8>(), 0..40),
        msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..5),
    ) {
        let dk = DataKey::from_bytes(key);
        let mut s = Sealer::new(epoch, &dk).unwrap();
        let mut o = Opener::new();
        for pt in &msgs {
            let env = seal(&mut s, Some(&subject), pt);
            let h = Header::parse(&env).unwrap();
            let mut out = BytesMut::new();
            o.open_into(&dk, &h, &env, &subject, false, &mut out).unwrap();
            prop_assert_eq!(&out[..], &pt[..]);
        }
        prop_assert_eq!(o.cached(), 1);
    }

    #[test]
    fn any_bit_flip_fails(
        key in any::<[u8; 32]>(),
        bound in any::<bool>(),
        pt in prop::collection::vec(any::<u8>(), 0..64),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let dk = DataKey::from_bytes(key);
        let mut s = Sealer::new(1, &dk).unwrap();
        let subject: Option<&[u8]> = if bound { Some(b"orders.new") } else { None };
        let mut env = seal(&mut s, subject, &pt);
        let i = pos.index(env.len());
        env[i] ^= 1 << bit;
        prop_assert!(open(&dk, &env, b"orders.new", true).is_err(), "flip at {} bit {}", i, bit);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        key in any::<[u8; 32]>(),
        bytes in prop::collection::vec(any::<u8>(), 0..100),
        magic in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if magic && !bytes.is_empty() {
            bytes[0] = MAGIC;
            if bytes.len() > 3 {
                bytes[1] = VERSION_1;
                bytes[2] = SUITE_XCHACHA20_POLY1305;
            }
        }
        let dk = DataKey::from_bytes(key);
        prop_assert!(open(&dk, &bytes, b"s", true).is_err());
    }
}

#[test]
fn every_single_bit_flip_fails_exhaustively() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::new(5, &dk).unwrap();
    for subject in [Some(&b"orders.new"[..]), None] {
        let env = seal(&mut s, subject, b"a short message");
        assert!(open(&dk, &env, b"orders.new", true).is_ok());
        for i in 0..env.len() {
            for bit in 0..8 {
                let mut bad = env.clone();
                bad[i] ^= 1 << bit;
                assert!(open(&dk, &bad, b"orders.new", true).is_err(), "{i}/{bit}");
            }
        }
    }
}

/// Both AEAD backends (short and long messages) interoperate with RustCrypto in both
/// directions, on each side of the size threshold and far past it.
#[test]
fn both_backends_match_rustcrypto_across_the_size_threshold() {
    let key = [0x5a; 32];
    let dk = DataKey::from_bytes(key);
    for len in [0usize, 1, 4095, 4096, 4097, 16 * 1024, 200_000] {
        let pt: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let mut s = Sealer::with_prefix(9, &dk, [len as u8; 16], len as u64);
        let env = seal(&mut s, Some(b"big.subject"), &pt);
        assert_eq!(
            rustcrypto_open(&key, &env, Some(b"big.subject")),
            pt,
            "len {len}"
        );
        let theirs = rustcrypto_seal(&key, 9, [len as u8 ^ 0xff; 24], Some(b"big.subject"), &pt);
        assert_eq!(
            open(&dk, &theirs, b"big.subject", false),
            Ok(pt.clone()),
            "len {len}"
        );
        let mut flipped = theirs.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(
            open(&dk, &flipped, b"big.subject", false).is_err(),
            "len {len}"
        );
    }
}

#[test]
fn moved_to_another_subject_fails() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::new(5, &dk).unwrap();
    let env = seal(&mut s, Some(b"orders.new"), b"m");
    assert_eq!(open(&dk, &env, b"orders.new", false), Ok(b"m".to_vec()));
    for other in [&b"orders.old"[..], b"orders.new.x", b"orders.ne", b""] {
        assert_eq!(open(&dk, &env, other, false), Err(EnvelopeError::Auth));
        assert_eq!(open(&dk, &env, other, true), Err(EnvelopeError::Auth));
    }
}

#[test]
fn stripping_the_bound_flag_fails() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::new(5, &dk).unwrap();
    let mut env = seal(&mut s, Some(b"orders.new"), b"m");
    env[3] &= !FLAG_SUBJECT_BOUND;
    assert_eq!(
        open(&dk, &env, b"orders.new", false),
        Err(EnvelopeError::Unbound)
    );
    assert_eq!(
        open(&dk, &env, b"orders.new", true),
        Err(EnvelopeError::Auth)
    );
}

#[test]
fn different_epoch_in_header_fails() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::new(5, &dk).unwrap();
    let env = seal(&mut s, Some(b"s"), b"m");
    for epoch in [4u32, 6, 0, u32::MAX] {
        let mut bad = env.clone();
        bad[4..8].copy_from_slice(&epoch.to_be_bytes());
        assert_eq!(Header::parse(&bad).unwrap().epoch, epoch);
        assert_eq!(open(&dk, &bad, b"s", false), Err(EnvelopeError::Auth));
    }
}

#[test]
fn wrong_key_fails() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::new(5, &dk).unwrap();
    let env = seal(&mut s, Some(b"s"), b"m");
    let other = DataKey::from_bytes([0x43; 32]);
    assert_eq!(open(&other, &env, b"s", false), Err(EnvelopeError::Auth));
}

#[test]
fn truncations_fail_without_panic() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::new(5, &dk).unwrap();
    let env = seal(&mut s, Some(b"s"), b"some plaintext here");
    for n in 0..env.len() {
        let r = open(&dk, &env[..n], b"s", false);
        let expected = match n {
            0 => EnvelopeError::NotEnvelope,
            n if n < OVERHEAD => EnvelopeError::Truncated,
            _ => EnvelopeError::Auth,
        };
        assert_eq!(r, Err(expected), "length {n}");
    }
    // A header that claims more than the bytes carry is caught by open_into
    // even when the caller passes a header parsed from somewhere else.
    let h = Header::parse(&env).unwrap();
    let mut out = BytesMut::new();
    assert_eq!(
        Opener::new().open_into(&dk, &h, &env[..OVERHEAD - 1], b"s", false, &mut out),
        Err(EnvelopeError::Truncated)
    );
}

#[test]
fn header_parse_errors() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::new(5, &dk).unwrap();
    let env = seal(&mut s, Some(b"s"), b"m");
    assert_eq!(
        Header::parse(b"{\"json\":1}"),
        Err(EnvelopeError::NotEnvelope)
    );
    assert_eq!(Header::parse(&[MAGIC]), Err(EnvelopeError::Truncated));
    let mut v = env.clone();
    v[1] = 3;
    assert_eq!(Header::parse(&v), Err(EnvelopeError::UnsupportedVersion(3)));
    assert_eq!(
        Header::parse(&v[..2]),
        Err(EnvelopeError::UnsupportedVersion(3))
    );
    // A version-1 envelope of one byte relabelled version 2 is too short for its header.
    let mut v = env.clone();
    v[1] = 2;
    assert_eq!(Header::parse(&v), Err(EnvelopeError::Truncated));
    let mut v = env.clone();
    v[2] = 7;
    assert_eq!(Header::parse(&v), Err(EnvelopeError::UnsupportedSuite(7)));
    let mut v = env.clone();
    v[3] = 0x81;
    assert_eq!(Header::parse(&v), Err(EnvelopeError::UnknownFlags(0x81)));
    let h = Header::parse(&env).unwrap();
    assert_eq!(h.encode()[..], env[..HEADER_LEN]);
    assert!(is_envelope(&env));
    assert!(!is_envelope(b""));
    assert!(!is_envelope(b"hello"));
    // 0xC1 is never valid UTF-8, so no text payload starts with it.
    assert!(std::str::from_utf8(&[MAGIC]).is_err());
    assert!(std::str::from_utf8(&[MAGIC, 0x81]).is_err());
}

// ---- Published test vectors (docs/ENVELOPE.md) ----

/// The `name value` lines of the vectors block in the docs.
fn doc_vectors() -> std::collections::HashMap<String, String> {
    let begin = DOC
        .find("<!-- vectors:begin -->")
        .expect("vectors block in docs");
    let end = DOC.find("<!-- vectors:end -->").expect("vectors block end");
    let mut map = std::collections::HashMap::new();
    for line in DOC[begin..end].lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("<!--") || line.starts_with("```") {
            continue;
        }
        let (name, value) = line.split_once(char::is_whitespace).expect("name value");
        let value = value.trim();
        let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(text) => hex::encode(text),
            None => value.to_string(),
        };
        assert!(
            map.insert(name.to_string(), value).is_none(),
            "duplicate {name}"
        );
    }
    map
}

fn hex32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

/// Everything the published vectors contain, computed from the fixed inputs.
fn computed_vectors(v: &std::collections::HashMap<String, String>) -> Vec<(&'static str, String)> {
    let kek = RootKey::from_bytes(hex32(&v["kek"]));
    let e1 = derive_epoch1(&kek);
    let ctl = derive_control_key(&kek);
    let prefix: [u8; 16] = hex::decode(&v["prefix"]).unwrap().try_into().unwrap();
    let counter: u64 = u64::from_str_radix(&v["counter"], 16).unwrap();
    let epoch: u32 = u32::from_str_radix(&v["epoch"], 16).unwrap();
    let subject = hex::decode(&v["subject"]).unwrap();
    let plaintext = hex::decode(&v["plaintext"]).unwrap();
    let mut s = Sealer::with_prefix(epoch, &e1, prefix, counter);
    let bound = seal(&mut s, Some(&subject), &plaintext);
    let unbound = seal(&mut s, None, &plaintext);
    let wrapped_key = DataKey::from_bytes(hex32(&v["wrap_data_key"]));
    let wrap_epoch = u32::from_str_radix(&v["wrap_epoch"], 16).unwrap();
    let wrap_nonce: [u8; 24] = hex::decode(&v["wrap_nonce"]).unwrap().try_into().unwrap();
    let wrapped = wrap_key_with_nonce(&kek, wrap_epoch, &wrapped_key, &wrap_nonce).unwrap();
    assert_eq!(unwrap_key(&kek, wrap_epoch, &wrapped).unwrap(), wrapped_key);

    vec![
        ("kek_fingerprint", kek.fingerprint()),
        ("epoch1_key", hex::encode(e1.bytes())),
        ("epoch1_fingerprint", e1.fingerprint()),
        ("control_key", hex::encode(ctl.bytes())),
        ("wrap_key", hex::encode(kdf::derive_wrap_key(&kek).bytes())),
        ("envelope", hex::encode(&bound)),
        ("unbound_envelope", hex::encode(&unbound)),
        ("wrapped", hex::encode(&wrapped)),
    ]
}

#[test]
fn published_vectors_match() {
    let v = doc_vectors();
    for (name, value) in computed_vectors(&v) {
        let doc = v
            .get(name)
            .unwrap_or_else(|| panic!("docs lack vector {name}"));
        assert_eq!(doc, &value, "vector {name}");
    }
    // The published envelopes also open, and open with RustCrypto.
    let kek = RootKey::from_bytes(hex32(&v["kek"]));
    let e1 = derive_epoch1(&kek);
    let subject = hex::decode(&v["subject"]).unwrap();
    let plaintext = hex::decode(&v["plaintext"]).unwrap();
    let env = hex::decode(&v["envelope"]).unwrap();
    assert_eq!(open(&e1, &env, &subject, false), Ok(plaintext.clone()));
    assert_eq!(rustcrypto_open(e1.bytes(), &env, Some(&subject)), plaintext);
    let unbound = hex::decode(&v["unbound_envelope"]).unwrap();
    assert_eq!(
        open(&e1, &unbound, &subject, false),
        Err(EnvelopeError::Unbound)
    );
    assert_eq!(
        open(&e1, &unbound, b"anything", true),
        Ok(plaintext.clone())
    );
    assert_eq!(rustcrypto_open(e1.bytes(), &unbound, None), plaintext);
}

/// Every way a session can run a read's envelopes: the audited default (`None`, nothing
/// deferred) and each batched path this CPU has.
fn batch_kinds() -> Vec<Option<BatchPath>> {
    std::iter::once(None)
        .chain(
            BatchPath::ALL
                .into_iter()
                .filter(|p| p.available())
                .map(Some),
        )
        .collect()
}

fn new_batch(kind: Option<BatchPath>) -> Batch {
    kind.map_or_else(Batch::default, |p| Batch::pinned(p).expect("available"))
}

/// Subjects as long as a control line allows (4096 bytes and more, up to the server's longer
/// limit on lines it sends), through the deferred (batched) seal and open, both ways against
/// RustCrypto.
#[test]
fn long_subjects_seal_and_open_in_batches() {
    for kind in batch_kinds() {
        // More than the small-batch fallback, so the vector kernels run where the CPU has them.
        const BATCHED: usize = 24;
        let key = [7u8; 32];
        let dk = DataKey::from_bytes(key);
        for len in [
            0usize, 1, 15, 16, 17, 63, 64, 65, 255, 256, 1000, 4090, 4096, 4100, 8192,
        ] {
            let subject = vec![b'l'; len];
            for pt_len in [1usize, 5, 100] {
                let pt = vec![0x5a; pt_len];
                let mut sealer = Sealer::new(3, &dk).unwrap();
                let mut out = BytesMut::new();
                let mut batch = new_batch(kind);
                for _ in 0..BATCHED {
                    sealer
                        .seal_deferred(Some(&subject), &pt, &mut out, &mut batch)
                        .unwrap();
                }
                batch.seal_with(&mut out[..], &sealer).unwrap();
                let one = pt_len + OVERHEAD;
                for env in out.chunks(one) {
                    assert_eq!(
                        rustcrypto_open(&key, env, Some(&subject)),
                        pt,
                        "{kind:?}: subject of {len} bytes, payload of {pt_len}"
                    );
                }
                // And opened again in a batch, as the session opens deliveries.
                let mut opened = BytesMut::new();
                let mut opener = Opener::new();
                let mut batch = new_batch(kind);
                for env in out.chunks(one) {
                    let h = Header::parse(env).unwrap();
                    opener
                        .open_deferred(&dk, &h, env, &subject, false, &mut opened, &mut batch)
                        .unwrap();
                }
                let mut failed = Vec::new();
                batch.open_with(&mut opened[..], &opener, |i| failed.push(i));
                assert!(failed.is_empty(), "subject of {len} bytes: {failed:?}");
                assert_eq!(
                    &opened[..],
                    &pt.repeat(BATCHED)[..],
                    "subject of {len} bytes"
                );
            }
        }
    }
}

/// Subjects and payloads of mixed lengths, as in one read of deliveries, opened in one batch.
#[test]
fn a_batch_of_mixed_subjects_and_payloads_opens_in_a_batch() {
    for kind in batch_kinds() {
        let key = [12u8; 32];
        let dk = DataKey::from_bytes(key);
        let shapes: &[&[(usize, usize)]] = &[
            &[(4094, 5), (10, 2048)],
            &[(4094, 5), (10, 2048), (4095, 5)],
            &[(4094, 5), (10, 2048), (4095, 5), (3, 3)],
            &[(10, 2048), (4094, 5), (3, 3), (4095, 5), (1, 1000)],
            &[(200, 5), (10, 2048), (300, 5)],
        ];
        for shape in shapes {
            let envelopes: Vec<(Vec<u8>, Vec<u8>)> = shape
                .iter()
                .enumerate()
                .map(|(i, &(slen, plen))| {
                    let subject = vec![b's'; slen];
                    let env =
                        rustcrypto_seal(&key, 5, [i as u8; 24], Some(&subject), &vec![0x44; plen]);
                    (subject, env)
                })
                .collect();
            let mut opener = Opener::new();
            let mut batch = new_batch(kind);
            let mut out = BytesMut::new();
            for (subject, env) in &envelopes {
                let h = Header::parse(env).unwrap();
                opener
                    .open_deferred(&dk, &h, env, subject, false, &mut out, &mut batch)
                    .unwrap();
            }
            let mut failed = Vec::new();
            batch.open_with(&mut out[..], &opener, |i| failed.push(i));
            assert!(
                failed.is_empty(),
                "{kind:?}, shape {shape:?}: {failed:?} failed"
            );
            let want: Vec<u8> = shape.iter().flat_map(|&(_, p)| vec![0x44; p]).collect();
            assert_eq!(&out[..], &want[..], "shape {shape:?}");
        }
    }
}

/// Random batches (one to thirty messages) whose subjects run up to past the control line
/// limit, sealed together, each opened by RustCrypto.
#[test]
fn random_batches_with_long_subjects_match_rustcrypto() {
    for kind in batch_kinds() {
        let key = [13u8; 32];
        let dk = DataKey::from_bytes(key);
        let mut x: u64 = 0x1234_5678;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for round in 0..400 {
            let jobs = 1 + next(30);
            let mut sealer = Sealer::new(5, &dk).unwrap();
            let mut out = BytesMut::new();
            let mut batch = new_batch(kind);
            let mut spans = Vec::new();
            for _ in 0..jobs {
                let slen = match next(4) {
                    0 => next(5000),
                    1 => 4090 + next(10),
                    _ => next(40),
                };
                let plen = 1 + next(2100);
                let start = out.len();
                let subject = vec![b'a' + next(26) as u8; slen];
                sealer
                    .seal_deferred(Some(&subject), &vec![0x55; plen], &mut out, &mut batch)
                    .unwrap();
                spans.push((start, out.len(), subject));
            }
            batch.seal_with(&mut out[..], &sealer).unwrap();
            for (start, end, subject) in &spans {
                assert_eq!(
                    rustcrypto_open(&key, &out[*start..*end], Some(subject)),
                    vec![0x55; end - start - OVERHEAD],
                    "{kind:?}, round {round}: subject {} bytes",
                    subject.len()
                );
            }
        }
    }
}

/// Deliveries sealed by several proxies (one subkey each) opened in one batch.
#[test]
fn a_batch_from_many_sealers_opens() {
    for kind in batch_kinds() {
        let key = [14u8; 32];
        let dk = DataKey::from_bytes(key);
        for sealers in 1..12usize {
            for slen in [3usize, 4094] {
                let subject = vec![b'l'; slen];
                let mut envs = Vec::new();
                for i in 0..sealers * 2 {
                    let mut s =
                        Sealer::with_prefix(5, &dk, [(i % sealers) as u8 + 1; 16], i as u64);
                    let mut out = BytesMut::new();
                    s.seal_into(Some(&subject), b"hello", &mut out).unwrap();
                    envs.push(out.to_vec());
                }
                let mut opener = Opener::new();
                let mut batch = new_batch(kind);
                let mut out = BytesMut::new();
                for env in &envs {
                    let h = Header::parse(env).unwrap();
                    opener
                        .open_deferred(&dk, &h, env, &subject, false, &mut out, &mut batch)
                        .unwrap();
                }
                let mut failed = Vec::new();
                batch.open_with(&mut out[..], &opener, |i| failed.push(i));
                assert!(
                    failed.is_empty(),
                    "{kind:?}: {sealers} sealers, subject {slen}: {failed:?}"
                );
                assert_eq!(&out[..], &b"hello".repeat(envs.len())[..]);
            }
        }
    }
}

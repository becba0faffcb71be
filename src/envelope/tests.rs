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
    assert_eq!(out.len(), pt.len() + s.overhead());
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

/// Opens `env` with RustCrypto, taking the header length from the version byte (32 bytes for
/// version 1, 40 for version 2) rather than from `Header`.
fn rustcrypto_open(key: &[u8; 32], env: &[u8], subject: Option<&[u8]>) -> Vec<u8> {
    let h = Header::parse(env).unwrap();
    let header_len = match env[1] {
        1 => 32,
        2 => 40,
        v => panic!("version {v}"),
    };
    let mut aad = env[..header_len].to_vec();
    if let Some(s) = subject {
        aad.extend_from_slice(s);
    }
    let tag_at = env.len() - TAG_LEN;
    let mut buf = env[header_len..tag_at].to_vec();
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
    rustcrypto_seal_scoped(key, epoch, nonce, None, subject, pt)
}

/// Seals with RustCrypto under a header written out byte by byte as docs/ENVELOPE.md lays it
/// out: version 1 without a scope, version 2 with its id after the nonce.
fn rustcrypto_seal_scoped(
    key: &[u8; 32],
    epoch: u32,
    nonce: [u8; 24],
    scope: Option<[u8; 8]>,
    subject: Option<&[u8]>,
    pt: &[u8],
) -> Vec<u8> {
    let version = if scope.is_some() { 2 } else { 1 };
    let flags = if subject.is_some() { 1 } else { 0 };
    let mut header = vec![0xC1, version, 1, flags];
    header.extend_from_slice(&epoch.to_be_bytes());
    header.extend_from_slice(&nonce);
    if let Some(id) = scope {
        header.extend_from_slice(&id);
    }
    let mut aad = header.clone();
    if let Some(s) = subject {
        aad.extend_from_slice(s);
    }
    let mut buf = pt.to_vec();
    let tag = XChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut buf)
        .unwrap();
    let mut env = header;
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
        v2 in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if magic && !bytes.is_empty() {
            bytes[0] = MAGIC;
            if bytes.len() > 3 {
                bytes[1] = if v2 { VERSION_2 } else { VERSION_1 };
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
    let v2 = v2_vector_inputs(v);
    let mut s =
        Sealer::scoped_with_prefix(v2.epoch, &v2.key, Some(v2.scope), v2.prefix, v2.counter);
    let v2_bound = seal(&mut s, Some(&v2.subject), &v2.plaintext);
    let v2_unbound = seal(&mut s, None, &v2.plaintext);

    vec![
        ("kek_fingerprint", kek.fingerprint()),
        ("epoch1_key", hex::encode(e1.bytes())),
        ("epoch1_fingerprint", e1.fingerprint()),
        ("control_key", hex::encode(ctl.bytes())),
        ("wrap_key", hex::encode(kdf::derive_wrap_key(&kek).bytes())),
        ("envelope", hex::encode(&bound)),
        ("unbound_envelope", hex::encode(&unbound)),
        ("wrapped", hex::encode(&wrapped)),
        ("v2_scope_id", v2.scope.to_string()),
        ("v2_envelope", hex::encode(&v2_bound)),
        ("v2_unbound_envelope", hex::encode(&v2_unbound)),
    ]
}

/// The fixed inputs of the version-2 vectors.
struct V2Inputs {
    scope: ScopeId,
    key: DataKey,
    epoch: u32,
    prefix: [u8; 16],
    counter: u64,
    subject: Vec<u8>,
    plaintext: Vec<u8>,
}

fn v2_vector_inputs(v: &std::collections::HashMap<String, String>) -> V2Inputs {
    let scope = String::from_utf8(hex::decode(&v["v2_scope"]).unwrap()).unwrap();
    V2Inputs {
        scope: ScopeId::of(&scope),
        key: DataKey::from_bytes(hex32(&v["v2_key"])),
        epoch: u32::from_str_radix(&v["v2_epoch"], 16).unwrap(),
        prefix: hex::decode(&v["v2_prefix"]).unwrap().try_into().unwrap(),
        counter: u64::from_str_radix(&v["v2_counter"], 16).unwrap(),
        subject: hex::decode(&v["v2_subject"]).unwrap(),
        plaintext: hex::decode(&v["v2_plaintext"]).unwrap(),
    }
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

    // Version 2: the key is the epoch-1 key above; the envelopes name their scope, open, and
    // open with RustCrypto; RustCrypto seals the same bytes.
    let v2 = v2_vector_inputs(&v);
    assert_eq!(v["v2_key"], v["epoch1_key"]);
    let env = hex::decode(&v["v2_envelope"]).unwrap();
    let h = Header::parse(&env).unwrap();
    assert_eq!((h.version, h.scope), (VERSION_2, Some(v2.scope)));
    assert_eq!(
        (h.epoch, h.nonce_prefix(), h.counter()),
        (v2.epoch, v2.prefix, v2.counter)
    );
    assert_eq!(
        open(&v2.key, &env, &v2.subject, false),
        Ok(v2.plaintext.clone())
    );
    assert_eq!(
        open(&v2.key, &env, b"payments.other", true),
        Err(EnvelopeError::Auth)
    );
    assert_eq!(
        rustcrypto_open(v2.key.bytes(), &env, Some(&v2.subject)),
        v2.plaintext
    );
    assert_eq!(
        rustcrypto_seal_scoped(
            v2.key.bytes(),
            v2.epoch,
            h.nonce,
            Some(v2.scope.0),
            Some(&v2.subject),
            &v2.plaintext
        ),
        env
    );
    let unbound = hex::decode(&v["v2_unbound_envelope"]).unwrap();
    let h = Header::parse(&unbound).unwrap();
    assert_eq!((h.scope, h.counter()), (Some(v2.scope), v2.counter + 1));
    assert_eq!(
        open(&v2.key, &unbound, &v2.subject, false),
        Err(EnvelopeError::Unbound)
    );
    assert_eq!(
        open(&v2.key, &unbound, b"anything", true),
        Ok(v2.plaintext.clone())
    );
    assert_eq!(
        rustcrypto_open(v2.key.bytes(), &unbound, None),
        v2.plaintext
    );
    assert_eq!(
        rustcrypto_seal_scoped(
            v2.key.bytes(),
            v2.epoch,
            h.nonce,
            Some(v2.scope.0),
            None,
            &v2.plaintext
        ),
        unbound
    );
    // Read through the batched backend as well.
    for kind in batch_kinds() {
        assert_eq!(
            open_batched(kind, &v2.key, &env, &v2.subject, false),
            Ok(v2.plaintext.clone())
        );
        assert_eq!(
            open_batched(kind, &v2.key, &unbound, b"anything", true),
            Ok(v2.plaintext.clone())
        );
    }
}

/// Prints the published vectors as the code computes them; run with `--ignored --nocapture`
/// to regenerate the block in docs/ENVELOPE.md after a deliberate change of inputs.
#[test]
#[ignore]
fn print_vectors() {
    for (name, value) in computed_vectors(&doc_vectors()) {
        println!("{name:<19} {value}");
    }
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

// ---- Version 2: envelopes that name a key scope ----

/// The scope the version-2 tests seal for.
fn payments() -> ScopeId {
    ScopeId::of("payments")
}

/// `env`, a version-2 envelope, relabelled version 1: the scope id dropped, the version byte 1.
fn v2_as_v1(env: &[u8]) -> Vec<u8> {
    assert_eq!(env[1], VERSION_2);
    let mut out = env[..HEADER_LEN].to_vec();
    out[1] = VERSION_1;
    out.extend_from_slice(&env[HEADER_LEN_V2..]);
    out
}

/// `env`, a version-1 envelope, relabelled version 2 of scope `id`: the id inserted after the
/// nonce, the version byte 2.
fn v1_as_v2(env: &[u8], id: ScopeId) -> Vec<u8> {
    assert_eq!(env[1], VERSION_1);
    let mut out = env[..HEADER_LEN].to_vec();
    out[1] = VERSION_2;
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&env[HEADER_LEN..]);
    out
}

/// Opens `env` the deferred way on a batch of `kind`: queued with `open_deferred`, then one
/// pass. A tag the pass refuses is `Auth`, with the message's bytes zeroed.
fn open_batched(
    kind: Option<BatchPath>,
    key: &DataKey,
    env: &[u8],
    subject: &[u8],
    allow_unbound: bool,
) -> Result<Vec<u8>, EnvelopeError> {
    let h = Header::parse(env)?;
    let mut opener = Opener::new();
    let mut batch = new_batch(kind);
    let mut out = BytesMut::from(&b"pre"[..]);
    let r = opener.open_deferred(key, &h, env, subject, allow_unbound, &mut out, &mut batch);
    if let Err(e) = r {
        assert_eq!(&out[..], b"pre", "{kind:?}: a refused open wrote");
        assert!(batch.is_empty());
        return Err(e);
    }
    let mut failed = Vec::new();
    batch.open_with(&mut out[..], &opener, |i| failed.push(i));
    assert_eq!(&out[..3], b"pre", "{kind:?}");
    if failed.is_empty() {
        Ok(out[3..].to_vec())
    } else {
        assert_eq!(failed, vec![0], "{kind:?}");
        assert!(out[3..].iter().all(|&b| b == 0), "{kind:?}: not zeroed");
        Err(EnvelopeError::Auth)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Our version-2 envelopes open with RustCrypto under `AAD = header[0..40] || subject`.
    #[test]
    fn v2_ours_opens_with_rustcrypto(
        key in any::<[u8; 32]>(),
        prefix in any::<[u8; 16]>(),
        counter in 0u64..u64::MAX - 1,
        epoch in any::<u32>(),
        scope in any::<[u8; 8]>(),
        subject in subject_strategy(),
        pt in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let dk = DataKey::from_bytes(key);
        let mut s = Sealer::scoped_with_prefix(epoch, &dk, Some(ScopeId(scope)), prefix, counter);
        let env = seal(&mut s, subject.as_deref(), &pt);
        prop_assert_eq!(env.len(), pt.len() + OVERHEAD_V2);
        prop_assert_eq!(&env[..2], &[MAGIC, VERSION_2][..]);
        prop_assert_eq!(&env[HEADER_LEN..HEADER_LEN_V2], &scope[..]);
        let h = Header::parse(&env).unwrap();
        prop_assert_eq!(h.version, VERSION_2);
        prop_assert_eq!(h.scope, Some(ScopeId(scope)));
        prop_assert_eq!(h.epoch, epoch);
        prop_assert_eq!(h.nonce_prefix(), prefix);
        prop_assert_eq!(h.counter(), counter);
        prop_assert_eq!(h.subject_bound(), subject.is_some());
        prop_assert_eq!(rustcrypto_open(&key, &env, subject.as_deref()), pt);
    }

    /// Version-2 envelopes RustCrypto seals (header written out byte by byte) open with ours.
    #[test]
    fn v2_rustcrypto_opens_with_ours(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 24]>(),
        epoch in any::<u32>(),
        scope in any::<[u8; 8]>(),
        subject in subject_strategy(),
        pt in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let env = rustcrypto_seal_scoped(&key, epoch, nonce, Some(scope), subject.as_deref(), &pt);
        prop_assert_eq!(Header::parse(&env).unwrap().scope, Some(ScopeId(scope)));
        let dk = DataKey::from_bytes(key);
        let got = open(&dk, &env, subject.as_deref().unwrap_or(b"ignored"), subject.is_none());
        prop_assert_eq!(got, Ok(pt));
    }

    /// A scoped sealer's messages open through one opener, which keeps one subkey for them.
    #[test]
    fn v2_seal_open_round_trip(
        key in any::<[u8; 32]>(),
        epoch in any::<u32>(),
        scope in "[a-z.]{0,20}",
        subject in prop::collection::vec(any::<u8>(), 0..40),
        msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..5),
    ) {
        let dk = DataKey::from_bytes(key);
        let id = ScopeId::of(&scope);
        let mut s = Sealer::scoped(epoch, &dk, Some(id)).unwrap();
        prop_assert_eq!(s.scope(), Some(id));
        prop_assert_eq!(s.overhead(), OVERHEAD_V2);
        let mut o = Opener::new();
        for pt in &msgs {
            let env = seal(&mut s, Some(&subject), pt);
            let h = Header::parse(&env).unwrap();
            prop_assert_eq!(h.scope, Some(id));
            prop_assert_eq!(h.header_len(), HEADER_LEN_V2);
            prop_assert_eq!(h.overhead(), OVERHEAD_V2);
            let mut out = BytesMut::new();
            o.open_into(&dk, &h, &env, &subject, false, &mut out).unwrap();
            prop_assert_eq!(&out[..], &pt[..]);
        }
        prop_assert_eq!(o.cached(), 1);
    }
}

#[test]
fn scope_id_is_the_labelled_sha256_prefix() {
    use sha2::Digest as _;
    for name in ["payments", "", "orders", "payments.eu"] {
        let digest =
            sha2::Sha256::digest([&b"cipherbus-v2 scope-id"[..], name.as_bytes()].concat());
        assert_eq!(ScopeId::of(name).0[..], digest[..8], "{name:?}");
        assert_eq!(ScopeId::of(name).to_string(), hex::encode(&digest[..8]));
    }
    assert_eq!(SCOPE_ID_LABEL, b"cipherbus-v2 scope-id");
    assert_ne!(ScopeId::of("payments"), ScopeId::of("Payments"));
    assert_ne!(ScopeId::of("payments"), ScopeId::of("payments "));
}

/// Version 1 is the default scope: `Sealer::new` and `Sealer::scoped(.., None)` seal it, and a
/// scoped sealer seals version 2.
#[test]
fn sealers_pick_the_version_by_scope() {
    let dk = DataKey::from_bytes([0x42; 32]);
    for (mut s, version, overhead) in [
        (Sealer::new(5, &dk).unwrap(), VERSION_1, OVERHEAD),
        (Sealer::scoped(5, &dk, None).unwrap(), VERSION_1, OVERHEAD),
        (
            Sealer::scoped(5, &dk, Some(payments())).unwrap(),
            VERSION_2,
            OVERHEAD_V2,
        ),
    ] {
        assert_eq!(s.overhead(), overhead);
        let env = seal(&mut s, Some(b"s"), b"hello");
        assert_eq!(env[1], version);
        assert_eq!(env.len(), 5 + overhead);
        let h = Header::parse(&env).unwrap();
        assert_eq!(h.scope, s.scope());
        assert_eq!(h.overhead(), overhead);
        assert_eq!(open(&dk, &env, b"s", false), Ok(b"hello".to_vec()));
    }
    assert_eq!(MAX_OVERHEAD, 56);
    assert_eq!((HEADER_LEN_V2, OVERHEAD_V2), (40, 56));
}

/// Version 2 through the deferred calls on every batch kind, with payloads on both sides of
/// `BATCH_BELOW`, mixed with version-1 envelopes in one batch: the deferred seal gives the
/// same bytes as `seal_into`, RustCrypto opens each, and one deferred open pass gives back
/// every plaintext.
#[test]
fn v2_seals_and_opens_in_batches_with_v1() {
    let key = [21u8; 32];
    let dk = DataKey::from_bytes(key);
    let lens = [
        0usize,
        1,
        15,
        16,
        17,
        64,
        100,
        1000,
        BATCH_BELOW - 1,
        BATCH_BELOW,
        BATCH_BELOW + 1,
    ];
    for kind in batch_kinds() {
        for subject in [&b"payments.card"[..], &vec![b'p'; 4094][..]] {
            // Sealer 0 seals version 1, sealer 1 version 2, one message each in turn.
            let scopes = [None, Some(payments())];
            let mut sealers = scopes.map(|scope| {
                Sealer::scoped_with_prefix(8, &dk, scope, [scope.is_some() as u8 + 1; 16], 40)
            });
            let mut twins = scopes.map(|scope| {
                Sealer::scoped_with_prefix(8, &dk, scope, [scope.is_some() as u8 + 1; 16], 40)
            });
            let mut out = BytesMut::new();
            let mut batch = new_batch(kind);
            let mut expected = Vec::new();
            let mut spans = Vec::new();
            for (i, &len) in lens.iter().chain(lens.iter()).enumerate() {
                let which = i % 2;
                let pt: Vec<u8> = (0..len).map(|j| (j * 13 + i) as u8).collect();
                let start = out.len();
                sealers[which]
                    .seal_deferred(Some(subject), &pt, &mut out, &mut batch)
                    .unwrap();
                spans.push(start..out.len());
                expected.push((which, pt));
            }
            let short = expected
                .iter()
                .filter(|(_, pt)| pt.len() < BATCH_BELOW)
                .count();
            assert_eq!(batch.len(), if batch.defers() { short } else { 0 });
            batch.seal_with(&mut out[..], &sealers[1]).unwrap();
            let mut want = Vec::new();
            for (span, (which, pt)) in spans.iter().zip(&expected) {
                let env = &out[span.clone()];
                assert_eq!(
                    env,
                    &seal(&mut twins[*which], Some(subject), pt)[..],
                    "{kind:?}: deferred seal of {} bytes, version {}",
                    pt.len(),
                    which + 1
                );
                assert_eq!(env[1], [VERSION_1, VERSION_2][*which]);
                assert_eq!(rustcrypto_open(&key, env, Some(subject)), *pt, "{kind:?}");
                want.extend_from_slice(pt);
            }
            let mut opener = Opener::new();
            let mut batch = new_batch(kind);
            let mut opened = BytesMut::new();
            for span in &spans {
                let env = &out[span.clone()];
                let h = Header::parse(env).unwrap();
                opener
                    .open_deferred(&dk, &h, env, subject, false, &mut opened, &mut batch)
                    .unwrap();
            }
            let mut failed = Vec::new();
            batch.open_with(&mut opened[..], &opener, |i| failed.push(i));
            assert!(failed.is_empty(), "{kind:?}: {failed:?}");
            assert_eq!(&opened[..], &want[..], "{kind:?}");
        }
    }
}

/// Version-2 envelopes sealed by RustCrypto, one or two (the held-keys path) and many to a
/// batch, below `BATCH_BELOW`, open in one deferred pass.
#[test]
fn v2_from_rustcrypto_opens_in_batches() {
    let key = [22u8; 32];
    let dk = DataKey::from_bytes(key);
    for kind in batch_kinds() {
        for count in [1usize, 2, 3, 17] {
            let envs: Vec<Vec<u8>> = (0..count)
                .map(|i| {
                    let scope = ScopeId::of(&format!("scope{}", i % 3)).0;
                    rustcrypto_seal_scoped(
                        &key,
                        4,
                        [i as u8; 24],
                        Some(scope),
                        Some(b"a.b"),
                        &vec![i as u8; 10 * i],
                    )
                })
                .collect();
            let mut opener = Opener::new();
            let mut batch = new_batch(kind);
            let mut out = BytesMut::new();
            for env in &envs {
                let h = Header::parse(env).unwrap();
                opener
                    .open_deferred(&dk, &h, env, b"a.b", false, &mut out, &mut batch)
                    .unwrap();
            }
            assert_eq!(batch.len(), if batch.defers() { count } else { 0 });
            let mut failed = Vec::new();
            batch.open_with(&mut out[..], &opener, |i| failed.push(i));
            assert!(failed.is_empty(), "{kind:?}, {count}: {failed:?}");
            let want: Vec<u8> = (0..count).flat_map(|i| vec![i as u8; 10 * i]).collect();
            assert_eq!(&out[..], &want[..], "{kind:?}, {count}");
        }
    }
}

/// The scope id is in the AAD: an envelope relabelled into another scope, into version 1, or
/// from version 1 into a scope parses (its header is well formed) and then fails the tag
/// with `Auth`, bound or not, at once and in a batch.
#[test]
fn relabelled_envelopes_fail_to_open() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut v2 = Sealer::scoped(5, &dk, Some(payments())).unwrap();
    let mut v1 = Sealer::new(5, &dk).unwrap();
    for subject in [Some(&b"payments.card"[..]), None] {
        let unbound = subject.is_none();
        let on = subject.unwrap_or(b"payments.card");
        let scoped = seal(&mut v2, subject, b"charge 42");
        let plain = seal(&mut v1, subject, b"charge 42");
        assert_eq!(open(&dk, &scoped, on, unbound), Ok(b"charge 42".to_vec()));
        assert_eq!(open(&dk, &plain, on, unbound), Ok(b"charge 42".to_vec()));

        let mut relabelled = Vec::new();
        // Into another scope, and each byte of the id changed.
        let mut other = scoped.clone();
        other[HEADER_LEN..HEADER_LEN_V2].copy_from_slice(&ScopeId::of("orders").0);
        relabelled.push((other, VERSION_2, Some(ScopeId::of("orders"))));
        for i in HEADER_LEN..HEADER_LEN_V2 {
            let mut bad = scoped.clone();
            bad[i] ^= 0x80;
            let id = Header::parse(&bad).unwrap().scope;
            assert_ne!(id, Some(payments()));
            relabelled.push((bad, VERSION_2, id));
        }
        // Into the default scope: the id dropped, version 1.
        relabelled.push((v2_as_v1(&scoped), VERSION_1, None));
        // From the default scope into a named one: an id inserted, version 2.
        for name in ["payments", "orders", ""] {
            relabelled.push((
                v1_as_v2(&plain, ScopeId::of(name)),
                VERSION_2,
                Some(ScopeId::of(name)),
            ));
        }

        for (env, version, scope) in &relabelled {
            let h = Header::parse(env).expect("a relabelled header is well formed");
            assert_eq!((h.version, h.scope), (*version, *scope));
            for allow in [unbound, true] {
                assert_eq!(open(&dk, env, on, allow), Err(EnvelopeError::Auth), "{h:?}");
                for kind in batch_kinds() {
                    assert_eq!(
                        open_batched(kind, &dk, env, on, allow),
                        Err(EnvelopeError::Auth),
                        "{kind:?}: {h:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn v2_truncations_fail_without_panic() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::scoped(5, &dk, Some(payments())).unwrap();
    let env = seal(&mut s, Some(b"s"), b"some plaintext here");
    for n in 0..env.len() {
        let expected = match n {
            0 => EnvelopeError::NotEnvelope,
            // 48 to 55 bytes would be long enough for version 1.
            n if n < OVERHEAD_V2 => EnvelopeError::Truncated,
            _ => EnvelopeError::Auth,
        };
        if n < OVERHEAD_V2 {
            assert_eq!(Header::parse(&env[..n]), Err(expected), "length {n}");
        }
        assert_eq!(
            open(&dk, &env[..n], b"s", false),
            Err(expected),
            "length {n}"
        );
    }
    // A version-2 header given with fewer bytes than it needs is caught by open_into too.
    let h = Header::parse(&env).unwrap();
    for n in [OVERHEAD, OVERHEAD_V2 - 1] {
        let mut out = BytesMut::new();
        assert_eq!(
            Opener::new().open_into(&dk, &h, &env[..n], b"s", false, &mut out),
            Err(EnvelopeError::Truncated)
        );
        assert!(out.is_empty());
    }
}

/// `validate` ties the scope to the version: version 1 names none, version 2 names one. A
/// header that breaks the rule, or is not the envelope's own, is refused before the AEAD.
#[test]
fn scope_must_match_the_version() {
    let dk = DataKey::from_bytes([0x42; 32]);
    // Long enough that a version-1 envelope could carry a version-2 header.
    let pt = b"a message of more than eight bytes";
    let v1 = seal(&mut Sealer::new(5, &dk).unwrap(), Some(b"s"), pt);
    let v2 = seal(
        &mut Sealer::scoped(5, &dk, Some(payments())).unwrap(),
        Some(b"s"),
        pt,
    );
    let h1 = Header::parse(&v1).unwrap();
    let h2 = Header::parse(&v2).unwrap();
    assert_eq!(h1.validate(), Ok(()));
    assert_eq!(h2.validate(), Ok(()));
    assert_eq!(h2.encode()[..], v2[..HEADER_LEN_V2]);

    let v1_with_scope = Header {
        scope: Some(payments()),
        ..h1
    };
    let v2_without_scope = Header { scope: None, ..h2 };
    assert_eq!(v1_with_scope.validate(), Err(EnvelopeError::HeaderMismatch));
    assert_eq!(
        v2_without_scope.validate(),
        Err(EnvelopeError::HeaderMismatch)
    );
    // Unknown versions stay `version`, with or without a scope.
    for scope in [None, Some(payments())] {
        let h = Header {
            version: 3,
            scope,
            ..h2
        };
        assert_eq!(h.validate(), Err(EnvelopeError::UnsupportedVersion(3)));
    }

    let refused = [
        (v1_with_scope, &v1),
        (v2_without_scope, &v2),
        // Well-formed headers that are not the envelope's own.
        (
            Header {
                scope: Some(ScopeId::of("orders")),
                ..h2
            },
            &v2,
        ),
        (h2, &v1),
        (h1, &v2),
    ];
    for (h, env) in refused {
        for kind in batch_kinds() {
            let mut out = BytesMut::from(&b"pre"[..]);
            let mut batch = new_batch(kind);
            assert_eq!(
                Opener::new().open_deferred(&dk, &h, env, b"s", false, &mut out, &mut batch),
                Err(EnvelopeError::HeaderMismatch),
                "{kind:?}: {h:?}"
            );
            assert_eq!(&out[..], b"pre");
            assert!(batch.is_empty());
        }
        let mut out = BytesMut::new();
        assert_eq!(
            Opener::new().open_into(&dk, &h, env, b"s", false, &mut out),
            Err(EnvelopeError::HeaderMismatch),
            "{h:?}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn every_single_bit_flip_of_a_v2_envelope_fails() {
    let dk = DataKey::from_bytes([0x42; 32]);
    let mut s = Sealer::scoped(5, &dk, Some(payments())).unwrap();
    for subject in [Some(&b"payments.card"[..]), None] {
        let env = seal(&mut s, subject, b"a short message");
        assert!(open(&dk, &env, b"payments.card", true).is_ok());
        for i in 0..env.len() {
            for bit in 0..8 {
                let mut bad = env.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    open(&dk, &bad, b"payments.card", true).is_err(),
                    "{i}/{bit}"
                );
            }
        }
    }
}

//! Control messages: only what was sealed under the control key, at the control epoch, on the
//! subject it arrives on, decodes; and a decoded message survives encode and decode unchanged.
//!
//! The first byte picks the kind of input (modulo 3):
//! - 0: raw bytes as they would arrive on a control subject. They never decode.
//! - 1: arbitrary bytes sealed under the control key, as if a root-key holder sent them. They
//!   decode or are `Malformed`; whatever decodes re-encodes to a message that decodes equal.
//! - 2: a message built from the input, sealed with the real sealing code. It decodes equal, a
//!   second copy is a replay, and a mutated copy, another subject, another root key or a data
//!   epoch is refused.

#![no_main]

use arbitrary::{Result, Unstructured};
use cipherbus::control::message::{
    open, seal_message, Body, ControlError, ControlMessage, EpochInfo, ReplayGuard, CONTROL_EPOCH,
};
use cipherbus::envelope::{derive_control_key, DataKey, Opener, RootKey, Sealer};
use cipherbus::keyring::KeyState;
use libfuzzer_sys::fuzz_target;

const SUBJECT: &str = "cipherbus.ctl.announce";

fn control_key() -> DataKey {
    derive_control_key(&RootKey::from_bytes([1; 32]))
}

fn sealer(epoch: u32, key: &DataKey) -> Sealer {
    Sealer::with_prefix(epoch, key, [7; 16], 0)
}

fn key_state(u: &mut Unstructured) -> Result<KeyState> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => KeyState::Staged,
        1 => KeyState::Active,
        2 => KeyState::Retired,
        _ => KeyState::Destroyed,
    })
}

fn epochs(u: &mut Unstructured) -> Result<Vec<EpochInfo>> {
    let n = u.int_in_range(0..=4u8)?;
    (0..n)
        .map(|_| {
            Ok(EpochInfo {
                epoch: u.arbitrary()?,
                state: key_state(u)?,
                fingerprint: u.arbitrary()?,
                created: u.arbitrary()?,
                activated: u.arbitrary()?,
                wrapped: u.arbitrary()?,
                sealed_messages: u.arbitrary()?,
            })
        })
        .collect()
}

fn body(u: &mut Unstructured) -> Result<Body> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => Body::Stage {
            epoch: u.arbitrary()?,
            wrapped: u.arbitrary()?,
            fingerprint: u.arbitrary()?,
        },
        1 => Body::Ack {
            epoch: u.arbitrary()?,
        },
        2 => Body::Activate {
            epoch: u.arbitrary()?,
        },
        3 => Body::Destroy {
            epoch: u.arbitrary()?,
            reason: u.arbitrary()?,
        },
        4 => Body::Heartbeat {
            active: u.arbitrary()?,
            sealed_messages: u.arbitrary()?,
            sealed_bytes: u.arbitrary()?,
        },
        5 => Body::SyncRequest {},
        6 => Body::SyncReply { epochs: epochs(u)? },
        7 => Body::KeysRequest {},
        8 => Body::KeysReply { epochs: epochs(u)? },
        9 => Body::RevokeRequest {
            epoch: u.arbitrary()?,
            reason: u.arbitrary()?,
        },
        10 => Body::RevokeReply {
            active: u.arbitrary()?,
            error: u.arbitrary()?,
        },
        11 => Body::AuthorityHello {
            active: u.arbitrary()?,
            since_ms: u.arbitrary()?,
        },
        12 => Body::AuditEvent {
            entry: u.arbitrary()?,
        },
        13 => Body::RotateRequest {
            reason: u.arbitrary()?,
        },
        _ => Body::RotateReply {
            epoch: u.arbitrary()?,
            acked: u.arbitrary()?,
            laggards: u.arbitrary()?,
            error: u.arbitrary()?,
        },
    })
}

fn message(u: &mut Unstructured) -> Result<ControlMessage> {
    Ok(ControlMessage {
        from: u.arbitrary()?,
        seq: u.arbitrary()?,
        time_ms: u.arbitrary()?,
        body: body(u)?,
    })
}

/// Seals `msg` under the control key and checks it decodes to itself.
fn round_trip(key: &DataKey, msg: &ControlMessage) -> Vec<u8> {
    let sealed = seal_message(&mut sealer(CONTROL_EPOCH, key), SUBJECT, msg).unwrap();
    let opened = open(&mut Opener::new(), key, SUBJECT, &sealed);
    assert_eq!(opened.as_ref(), Ok(msg), "encode then decode changed it");
    sealed
}

fn raw(key: &DataKey, data: &[u8]) {
    let got = open(&mut Opener::new(), key, SUBJECT, data);
    assert!(got.is_err(), "unsealed bytes decoded: {got:?}");
    if data.first() != Some(&0xC1) {
        assert_eq!(got, Err(ControlError::NotSealed));
    }
}

fn sealed_json(key: &DataKey, data: &[u8]) {
    let mut sealer = sealer(CONTROL_EPOCH, key);
    let mut out = bytes::BytesMut::new();
    sealer
        .seal_into(Some(SUBJECT.as_bytes()), data, &mut out)
        .unwrap();
    match open(&mut Opener::new(), key, SUBJECT, &out) {
        Ok(msg) => {
            round_trip(key, &msg);
        }
        Err(e) => assert_eq!(e, ControlError::Malformed),
    }
}

fn structured(key: &DataKey, data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(msg) = message(&mut u) else {
        return;
    };
    let sealed = round_trip(key, &msg);

    let mut guard = ReplayGuard::default();
    assert_eq!(guard.check(&msg), Ok(()));
    assert_eq!(guard.check(&msg), Err(ControlError::Replayed));

    let mut opener = Opener::new();
    if let (Ok(at), Ok(bit)) = (u.arbitrary::<usize>(), u.int_in_range(0..=7u8)) {
        let mut bad = sealed.clone();
        bad[at % sealed.len()] ^= 1 << bit;
        assert!(open(&mut opener, key, SUBJECT, &bad).is_err());
    }
    let cut = u.arbitrary::<usize>().unwrap_or(0) % sealed.len();
    assert!(open(&mut opener, key, SUBJECT, &sealed[..cut]).is_err());

    assert_eq!(
        open(&mut opener, key, "cipherbus.ctl.other", &sealed),
        Err(ControlError::Forged)
    );
    let stranger = derive_control_key(&RootKey::from_bytes([2; 32]));
    assert_eq!(
        open(&mut opener, &stranger, SUBJECT, &sealed),
        Err(ControlError::Forged)
    );
    let data_epoch = u.arbitrary::<u32>().unwrap_or(1).max(1);
    let as_data = seal_message(&mut sealer(data_epoch, key), SUBJECT, &msg).unwrap();
    assert_eq!(
        open(&mut opener, key, SUBJECT, &as_data),
        Err(ControlError::WrongEpoch)
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = control_key();
    match mode % 3 {
        0 => raw(&key, rest),
        1 => sealed_json(&key, rest),
        _ => structured(&key, rest),
    }
});

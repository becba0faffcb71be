//! Every wrap is bound to its context (purpose, epoch, deployment), checked against the real
//! components: a key wrapped by SoftHSM through PKCS#11, or by OpenBao's Transit engine, does
//! not unwrap for another epoch, purpose or deployment, nor once damaged.

mod support;

use cipherbus::kek::{Kek, KekError, KekUri, WrapContext};
use support::kms::{Bao, SoftHsm};

fn bound_to_its_context(kek: &dyn Kek) {
    let ctx = WrapContext {
        purpose: "data-key",
        epoch: 2,
        scope: "cipherbus.ctl".into(),
    };
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).unwrap();
    let wrapped = kek.wrap(&ctx, &secret).unwrap();
    assert_eq!(*kek.unwrap(&ctx, &wrapped).unwrap(), secret);
    assert_ne!(
        kek.wrap(&ctx, &secret).unwrap(),
        wrapped,
        "a fresh IV per wrap"
    );
    let others = [
        WrapContext {
            epoch: 3,
            ..ctx.clone()
        },
        WrapContext {
            purpose: "seed",
            ..ctx.clone()
        },
        WrapContext {
            scope: "other.ctl".into(),
            ..ctx.clone()
        },
    ];
    for other in others {
        let r = kek.unwrap(&other, &wrapped);
        assert!(
            matches!(r, Err(KekError::Unwrap { .. })),
            "{} opened it for {other:?}",
            kek.describe()
        );
    }
    let mut damaged = wrapped.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x01;
    let r = kek.unwrap(&ctx, &damaged);
    assert!(matches!(r, Err(KekError::Unwrap { .. })), "{r:?}");
}

#[test]
fn a_wrapped_key_opens_only_for_its_own_epoch_purpose_and_deployment() {
    let hsm = SoftHsm::new("binding");
    hsm.create_aes_key("root");
    // SoftHSM reads its configuration from the environment when the module initializes; this
    // is the only test in this binary, and it sets it before opening the module.
    std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
    let pkcs11 = KekUri::parse(&hsm.uri("root")).unwrap().open_kek().unwrap();
    pkcs11.check().unwrap();
    bound_to_its_context(&*pkcs11);

    let bao = Bao::dev();
    bao.enable_transit();
    bao.create_key("cipherbus", "aes256-gcm96");
    let vault = cipherbus::kek::vault::VaultKek::new(
        &bao.addr,
        zeroize::Zeroizing::new(bao.token().to_owned()),
        "cipherbus",
        "transit",
        None,
        None,
    )
    .unwrap();
    vault.check().unwrap();
    bound_to_its_context(&vault);
}

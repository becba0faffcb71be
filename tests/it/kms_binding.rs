//! Every wrap is bound to its context (purpose, epoch, deployment), checked against the real
//! components: a key wrapped by SoftHSM through PKCS#11, or by OpenBao's Transit engine, does
//! not unwrap for another epoch, purpose or deployment, nor once damaged.

use crate::support::kms::{Bao, SoftHsm};
use cipherbus::kek::{Kek, KekError, KekUri, WrapContext};

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

/// The variable that hands the PKCS#11 leg its key's URI in the child process.
const PKCS11_URI: &str = "CIPHERBUS_TEST_BINDING_PKCS11_URI";

#[test]
fn a_wrapped_key_opens_only_for_its_own_epoch_purpose_and_deployment() {
    // SoftHSM finds its token directory only through SOFTHSM2_CONF, read when the module
    // initializes. Tests share this process, so the PKCS#11 leg runs in a child process of
    // this binary, with the variable set for that child alone.
    let hsm = SoftHsm::new("binding");
    hsm.create_aes_key("root");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kms_binding::pkcs11_leg",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(hsm.env())
        .env(PKCS11_URI, hsm.uri("root"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the PKCS#11 leg failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

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

/// The PKCS#11 leg of the test above, run by it in a process of its own.
#[test]
#[ignore = "run by a_wrapped_key_opens_only_for_its_own_epoch_purpose_and_deployment in a process of its own"]
fn pkcs11_leg() {
    let uri = std::env::var(PKCS11_URI).expect("started by the binding test");
    let pkcs11 = KekUri::parse(&uri).unwrap().open_kek().unwrap();
    pkcs11.check().unwrap();
    bound_to_its_context(&*pkcs11);
}

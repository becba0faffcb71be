//! The deployment seed of an HSM or KMS root, and where it is kept.
//!
//! This module owns the seed's record (`seed` in the keyring bucket): 32 random bytes wrapped
//! under the root, from which every process derives the control, audit and epoch-1 keys. A
//! deployment migrated from a file root has that file's key as its seed, so every derived key,
//! and the deployment's fingerprint, stay as they were.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{blocking, measured, with_retry, Kek, KekError, Root, WrapContext};
use crate::envelope::RootKey;

/// The bucket key that holds the wrapped seed.
pub const SEED_KEY: &str = "seed";

/// What the error says when the deployment has no seed yet.
pub const NO_SEED: &str = "holds no deployment seed yet";

/// How long a start waits for a KMS that does not answer before it gives up.
pub const START_RETRY: Duration = Duration::from_secs(10);

/// The seed as the bucket holds it. Ciphertext only: safe to copy and to back up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedSeed {
    pub version: u32,
    /// The seed was a file root's key (bound into the wrap, so it cannot be flipped).
    pub migrated: bool,
    /// The seed's fingerprint: the deployment's, as `keys` and the audit trail show it.
    pub fingerprint: String,
    /// Base64 of the backend's ciphertext.
    pub wrapped: String,
}

fn context(migrated: bool, scope: &str) -> WrapContext {
    WrapContext {
        purpose: if migrated { "migrated-seed" } else { "seed" },
        epoch: 0,
        scope: scope.to_owned(),
    }
}

impl WrappedSeed {
    /// Wraps `seed` under `kek`.
    pub fn wrap(
        kek: &dyn Kek,
        seed: &RootKey,
        migrated: bool,
        scope: &str,
    ) -> Result<Self, KekError> {
        let blob = measured("wrap", || {
            kek.wrap(&context(migrated, scope), seed.expose())
        })?;
        Ok(WrappedSeed {
            version: 1,
            migrated,
            fingerprint: seed.fingerprint(),
            wrapped: base64::engine::general_purpose::STANDARD.encode(blob),
        })
    }

    /// A new random seed, wrapped.
    pub fn generate(kek: &dyn Kek, scope: &str) -> Result<Self, KekError> {
        let seed = RootKey::generate().map_err(|_| KekError::Config {
            uri: kek.describe().to_owned(),
            why: "no randomness available".into(),
        })?;
        WrappedSeed::wrap(kek, &seed, false, scope)
    }

    /// The seed itself; the caller derives what it needs and drops it.
    pub fn unwrap(&self, kek: &dyn Kek, scope: &str) -> Result<RootKey, KekError> {
        let uri = || kek.describe().to_owned();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(&self.wrapped)
            .map_err(|_| KekError::Unwrap {
                uri: uri(),
                why: "the stored seed is not base64".into(),
            })?;
        let bytes = measured("unwrap", || {
            kek.unwrap(&context(self.migrated, scope), &blob)
        })?;
        let seed = RootKey::from_bytes(*bytes);
        if !crate::ct::eq_str(&seed.fingerprint(), &self.fingerprint) {
            return Err(KekError::Unwrap {
                uri: uri(),
                why: "the seed does not match its recorded fingerprint".into(),
            });
        }
        Ok(seed)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Invariant: a struct of strings, a bool and an integer always serializes.
        serde_json::to_vec(self).expect("the seed record serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("the stored seed is malformed: {e}"))
    }
}

/// Opens the root a `--kek` URI names. A file is read; an HSM or KMS root is checked, and its
/// seed read from the keyring bucket, or created there if `create` and the deployment has none.
/// A KMS that does not answer is retried for [`START_RETRY`]; every error is one sentence.
pub async fn open_root(
    uri: &super::KekUri,
    client: Option<&async_nats::Client>,
    prefix: &str,
    create: bool,
) -> Result<Arc<Root>, String> {
    if let super::KekUri::File(path) = uri {
        return Root::from_file(path)
            .map(Arc::new)
            .map_err(|e| e.to_string());
    }
    let kek = blocking(|| with_retry(START_RETRY, || uri.open_kek())).map_err(|e| e.to_string())?;
    blocking(|| with_retry(START_RETRY, || measured("check", || kek.check())))
        .map_err(|e| e.to_string())?;
    let client = client.ok_or_else(|| {
        format!(
            "{}: an HSM or KMS root keeps its wrapped deployment seed on the bus; no bus was given",
            kek.describe()
        )
    })?;
    let seed = load_or_create(client, prefix, &*kek, create).await?;
    blocking(|| with_retry(START_RETRY, || Root::from_seed(kek.clone(), &seed, prefix)))
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The deployment's wrapped seed from the keyring bucket; created there when there is none and
/// `create` allows it (two processes racing both end with the first one's).
pub async fn load_or_create(
    client: &async_nats::Client,
    prefix: &str,
    kek: &dyn Kek,
    create: bool,
) -> Result<WrappedSeed, String> {
    let bucket = crate::bus::keyring_bucket(prefix);
    let no_js = || {
        format!(
            "{}: an HSM or KMS root keeps its wrapped deployment seed in the JetStream bucket {bucket}, and this bus has no JetStream",
            kek.describe()
        )
    };
    let no_seed = || {
        format!(
            "the bucket {bucket} {NO_SEED}: start a proxy or the controller with --kek {} first",
            kek.describe()
        )
    };
    let kv = match crate::bus::open_bucket(client, bucket.clone(), create).await {
        Ok(kv) => kv,
        Err(e)
            if ["not enabled", "jetstream unavailable", "no responders"]
                .iter()
                .any(|m| e.to_lowercase().contains(m)) =>
        {
            return Err(no_js())
        }
        Err(e) if !create && e.contains("not found") => return Err(no_seed()),
        Err(e) => return Err(e),
    };
    let read = |v: Option<bytes::Bytes>| v.map(|b| WrappedSeed::from_json(&b)).transpose();
    if let Some(seed) = read(kv.get(SEED_KEY).await.map_err(|e| e.to_string())?)? {
        return Ok(seed);
    }
    if !create {
        return Err(no_seed());
    }
    let scope = prefix.to_owned();
    let fresh = blocking(|| with_retry(START_RETRY, || WrappedSeed::generate(kek, &scope)))
        .map_err(|e| e.to_string())?;
    match kv.create(SEED_KEY, fresh.to_json().into()).await {
        Ok(_) => {
            tracing::info!(bucket, fingerprint = %fresh.fingerprint, "created the deployment seed");
            Ok(fresh)
        }
        // Another process created it first: use that one.
        Err(_) => read(kv.get(SEED_KEY).await.map_err(|e| e.to_string())?)?
            .ok_or_else(|| format!("cannot write the deployment seed to {bucket}")),
    }
}

/// Writes `seed` to the bucket: only where there is none (`expect = None`), or over the
/// revision read (`rewrap`), so two writers cannot both win.
pub async fn store(
    client: &async_nats::Client,
    prefix: &str,
    seed: &WrappedSeed,
    expect: Option<u64>,
) -> Result<u64, String> {
    let bucket = crate::bus::keyring_bucket(prefix);
    let kv = crate::bus::open_bucket(client, bucket.clone(), true).await?;
    let r = match expect {
        None => kv
            .create(SEED_KEY, seed.to_json().into())
            .await
            .map_err(|e| e.to_string()),
        Some(rev) => kv
            .update(SEED_KEY, seed.to_json().into(), rev)
            .await
            .map_err(|e| e.to_string()),
    };
    r.map_err(|e| format!("cannot write the deployment seed to {bucket}: {e}"))
}

/// The stored seed and its revision.
pub async fn read(
    client: &async_nats::Client,
    prefix: &str,
) -> Result<Option<(WrappedSeed, u64)>, String> {
    let bucket = crate::bus::keyring_bucket(prefix);
    let kv = crate::bus::open_bucket(client, bucket, false).await?;
    match kv.entry(SEED_KEY).await.map_err(|e| e.to_string())? {
        Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
            Ok(Some((WrappedSeed::from_json(&e.value)?, e.revision)))
        }
        _ => Ok(None),
    }
}

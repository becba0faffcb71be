//! Names the deployment keeps on the bus, derived from its control prefix, and opening the
//! control bucket.
//!
//! This module owns the audit stream's name, the control bucket's name and keys, and how the
//! bucket is opened or created (replicas, storage). It knows nothing of what the bucket holds:
//! the key authority, the members and the deployment seed each read and write their own keys.

/// The stream that holds the audit trail of the deployment whose control prefix is `prefix`.
pub fn audit_stream_name(prefix: &str) -> String {
    let mut name: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    name.push_str("_AUDIT");
    name
}

/// The JetStream KV bucket that holds the keyring as the authority last wrote it, sealed.
pub fn keyring_bucket(prefix: &str) -> String {
    let mut name = audit_stream_name(prefix);
    name.truncate(name.len() - "_AUDIT".len());
    name.push_str("_KEYRING");
    name
}

/// The bucket key that holds the keyring, and the subject its value is sealed for.
pub const KEYRING_KEY: &str = "keyring";

/// The bucket key that holds the key authority's lease: its value is the holder's node id. It
/// sits in the keyring's bucket so that every keyring write can be conditioned on it.
pub const LEADER_KEY: &str = "leader";

/// Opens (or, with `create`, creates) the control bucket, replicated on up to three servers
/// where the bus is a cluster. Entries never expire: the lease lapses by its holder's silence,
/// not by age.
pub async fn open_bucket(
    client: &async_nats::Client,
    bucket: String,
    create: bool,
) -> Result<async_nats::jetstream::kv::Store, String> {
    use async_nats::jetstream::{kv, stream::StorageType};
    let js = async_nats::jetstream::new(client.clone());
    let first = match js.get_key_value(&bucket).await {
        Ok(kv) => return Ok(kv),
        Err(e) => e.to_string(),
    };
    if !create {
        return Err(format!("cannot open the control bucket {bucket} ({first})"));
    }
    let mut last = String::new();
    for replicas in [3, 1] {
        match js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                history: 1,
                num_replicas: replicas,
                storage: StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(kv) => return Ok(kv),
            // A lone server refuses three replicas; a cluster may have been faster to create it.
            Err(e) => {
                if let Ok(kv) = js.get_key_value(&bucket).await {
                    return Ok(kv);
                }
                last = e.to_string();
            }
        }
    }
    Err(format!(
        "cannot create the control bucket {bucket} ({last})"
    ))
}

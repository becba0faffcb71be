//! The envelope: how one message payload is sealed and opened.
//!
//! This module owns the version-1 and version-2 byte layouts, their AAD, the nonce scheme,
//! the key types and their derivation and wrapping. It is pure computation
//! over buffers: no I/O, no clocks, no locks, no logging, and it knows
//! nothing of NATS beyond "a payload and the subject it was published to".
//! Which key is active, which epochs exist and which subjects are encrypted
//! are decided elsewhere (keyring, policy); callers pass the key in.
//!
//! Version 1 layout (see docs/ENVELOPE.md for the full specification):
//!
//! ```text
//! magic(1)=0xC1 | version(1)=1 | suite(1)=1 | flags(1) | epoch(4, BE) | nonce(24) | ciphertext | tag(16)
//! ```
//!
//! Version 2 is version 1 with the 8-byte id of a key scope after the nonce (a 40-byte
//! header); version 1 is the default scope.
//!
//! `AAD = header || subject` when `FLAG_SUBJECT_BOUND` is set, else `AAD = header`.

mod aead;
mod error;
mod kdf;
mod keys;
mod multi;
mod open;
mod seal;
mod wrap;

#[cfg(test)]
mod tests;

pub use error::EnvelopeError;
pub use kdf::{
    derive_audit_key, derive_control_key, derive_epoch1, AUDIT_INFO, CONTROL_INFO, EPOCH1_INFO,
    HKDF_SALT, WRAP_INFO,
};
pub use keys::{
    DataKey, RootKey, DATA_FINGERPRINT_LABEL, FINGERPRINT_BYTES, KEY_LEN, ROOT_FINGERPRINT_LABEL,
};
pub use multi::{AeadBackend, Batch, Path as BatchPath, BATCH_BELOW};
pub use open::{Opener, DEFAULT_OPENER_CACHE};
pub use seal::Sealer;
pub use wrap::{unwrap_key, wrap_key, WrapKey, WRAPPED_LEN, WRAP_AAD_LABEL, WRAP_FORMAT_1};

/// First byte of every envelope. 0xC1 never occurs in UTF-8, so an envelope
/// can never be mistaken for text or JSON, nor text for an envelope.
pub const MAGIC: u8 = 0xC1;
/// The version byte of the layout with no scope (the default scope).
pub const VERSION_1: u8 = 1;
/// The version byte of the layout that names a key scope.
pub const VERSION_2: u8 = 2;
/// Cipher suite 1: XChaCha20-Poly1305 with a 24-byte nonce and 16-byte tag.
pub const SUITE_XCHACHA20_POLY1305: u8 = 1;
/// Flag bit: the subject is part of the AAD.
pub const FLAG_SUBJECT_BOUND: u8 = 0x01;
/// Every flag bit version 1 defines; any other bit is an error.
pub const KNOWN_FLAGS: u8 = FLAG_SUBJECT_BOUND;
/// Version-1 header length: magic(1) version(1) suite(1) flags(1) epoch(4) nonce(24).
pub const HEADER_LEN: usize = 32;
/// Length of a scope id.
pub const SCOPE_ID_LEN: usize = 8;
/// Version-2 header length: the version-1 fields, then the scope id.
pub const HEADER_LEN_V2: usize = HEADER_LEN + SCOPE_ID_LEN;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a version-1 envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Bytes a version-2 envelope adds to its plaintext.
pub const OVERHEAD_V2: usize = HEADER_LEN_V2 + TAG_LEN;
/// The most any envelope adds.
pub const MAX_OVERHEAD: usize = OVERHEAD_V2;
/// The label a scope's id is hashed under.
pub const SCOPE_ID_LABEL: &[u8] = b"cipherbus-v2 scope-id";

/// The id of a key scope, as a version-2 envelope carries it:
/// `SHA-256("cipherbus-v2 scope-id" || name)[0..8]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScopeId(pub [u8; SCOPE_ID_LEN]);

impl ScopeId {
    /// The id of the scope named `name`.
    pub fn of(name: &str) -> ScopeId {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(SCOPE_ID_LABEL);
        h.update(name.as_bytes());
        let d = h.finalize();
        let mut id = [0u8; SCOPE_ID_LEN];
        id.copy_from_slice(&d[..SCOPE_ID_LEN]);
        ScopeId(id)
    }
}

impl std::fmt::Display for ScopeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A header's wire bytes: 32 for version 1, 40 for version 2.
#[derive(Clone, Copy)]
pub struct EncodedHeader {
    bytes: [u8; HEADER_LEN_V2],
    len: usize,
}

impl std::ops::Deref for EncodedHeader {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

const NONCE_OFFSET: usize = 8;

/// The parsed header of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Layout version: [`VERSION_1`], or [`VERSION_2`] with a scope.
    pub version: u8,
    /// Cipher suite; [`SUITE_XCHACHA20_POLY1305`].
    pub suite: u8,
    /// Flag bits; only [`FLAG_SUBJECT_BOUND`] is defined.
    pub flags: u8,
    /// Epoch of the data key that sealed the envelope.
    pub epoch: u32,
    /// The XChaCha20 nonce: 16-byte sealer prefix then 8-byte BE counter.
    pub nonce: [u8; 24],
    /// The key scope (version 2 only); `None` is the default scope.
    pub scope: Option<ScopeId>,
}

impl Header {
    /// Parses and validates the header of `envelope`.
    ///
    /// Checks, in order: the magic byte ([`EnvelopeError::NotEnvelope`]), the
    /// version ([`EnvelopeError::UnsupportedVersion`]), that the envelope is
    /// at least its version's overhead ([`OVERHEAD`] or [`OVERHEAD_V2`]; [`EnvelopeError::Truncated`]), the suite
    /// and the flags. It does not authenticate anything.
    pub fn parse(envelope: &[u8]) -> Result<Header, EnvelopeError> {
        match envelope.first() {
            Some(&MAGIC) => {}
            _ => return Err(EnvelopeError::NotEnvelope),
        }
        let overhead = match envelope.get(1) {
            None => return Err(EnvelopeError::Truncated),
            Some(&VERSION_1) => OVERHEAD,
            Some(&VERSION_2) => OVERHEAD_V2,
            Some(&v) => return Err(EnvelopeError::UnsupportedVersion(v)),
        };
        if envelope.len() < overhead {
            return Err(EnvelopeError::Truncated);
        }
        let mut epoch = [0u8; 4];
        epoch.copy_from_slice(&envelope[4..NONCE_OFFSET]);
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&envelope[NONCE_OFFSET..HEADER_LEN]);
        let header = Header {
            version: envelope[1],
            suite: envelope[2],
            flags: envelope[3],
            epoch: u32::from_be_bytes(epoch),
            nonce,
            scope: (envelope[1] == VERSION_2).then(|| {
                let mut id = [0u8; SCOPE_ID_LEN];
                id.copy_from_slice(&envelope[HEADER_LEN..HEADER_LEN_V2]);
                ScopeId(id)
            }),
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks the fields a reader understands: a version-2 header names a scope, a version-1
    /// header does not.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        match (self.version, self.scope) {
            (VERSION_1, None) | (VERSION_2, Some(_)) => {}
            (VERSION_1 | VERSION_2, _) => return Err(EnvelopeError::HeaderMismatch),
            (v, _) => return Err(EnvelopeError::UnsupportedVersion(v)),
        }
        if self.suite != SUITE_XCHACHA20_POLY1305 {
            return Err(EnvelopeError::UnsupportedSuite(self.suite));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(EnvelopeError::UnknownFlags(self.flags));
        }
        Ok(())
    }

    /// The header bytes as they appear on the wire (and in the AAD).
    pub fn encode(&self) -> EncodedHeader {
        let mut out = [0u8; HEADER_LEN_V2];
        out[0] = MAGIC;
        out[1] = self.version;
        out[2] = self.suite;
        out[3] = self.flags;
        out[4..NONCE_OFFSET].copy_from_slice(&self.epoch.to_be_bytes());
        out[NONCE_OFFSET..HEADER_LEN].copy_from_slice(&self.nonce);
        let len = match self.scope {
            Some(id) => {
                out[HEADER_LEN..].copy_from_slice(&id.0);
                HEADER_LEN_V2
            }
            None => HEADER_LEN,
        };
        EncodedHeader { bytes: out, len }
    }

    /// The header's length on the wire.
    pub fn header_len(&self) -> usize {
        if self.scope.is_some() {
            HEADER_LEN_V2
        } else {
            HEADER_LEN
        }
    }

    /// Bytes the envelope adds to its plaintext.
    pub fn overhead(&self) -> usize {
        self.header_len() + TAG_LEN
    }

    /// Whether the subject is part of the AAD.
    pub fn subject_bound(&self) -> bool {
        self.flags & FLAG_SUBJECT_BOUND != 0
    }

    /// The sealer's random 16-byte nonce prefix.
    pub fn nonce_prefix(&self) -> [u8; 16] {
        aead::split_nonce(&self.nonce).0
    }

    /// The sealer's message counter (last 8 nonce bytes, big-endian).
    pub fn counter(&self) -> u64 {
        u64::from_be_bytes(aead::split_nonce(&self.nonce).1)
    }
}

/// What an envelope of this version adds to its plaintext, read from its version byte alone
/// (version 1's for anything else: [`Header::parse`] refuses what it cannot read).
pub fn overhead_of(envelope: &[u8]) -> usize {
    match envelope.get(1) {
        Some(&VERSION_2) => OVERHEAD_V2,
        _ => OVERHEAD,
    }
}

/// The scope id a version-2 envelope names, read without validating the rest.
pub fn scope_of(envelope: &[u8]) -> Option<ScopeId> {
    if envelope.get(1) != Some(&VERSION_2) {
        return None;
    }
    let mut id = [0u8; SCOPE_ID_LEN];
    id.copy_from_slice(envelope.get(HEADER_LEN..HEADER_LEN_V2)?);
    Some(ScopeId(id))
}

/// Whether `payload` claims to be an envelope (starts with [`MAGIC`]).
///
/// Cheap pre-check only; [`Header::parse`] does the real validation.
pub fn is_envelope(payload: &[u8]) -> bool {
    payload.first() == Some(&MAGIC)
}

//! cipherbus: a transparent encrypting proxy for NATS.
//!
//! Agents are unmodified NATS clients. They connect to cipherbus as if it were nats-server;
//! cipherbus keeps one upstream connection per agent, seals every payload the agent publishes
//! and opens every payload delivered to it. Anyone else on the bus sees only ciphertext.
//!
//! # Layout
//!
//! ```text
//! agent ──TCP──▶ server (listener) ─▶ session ─┬─ agent→upstream pump: proto::ClientParser ─▶ policy ─▶ envelope::Sealer ─▶ upstream
//!                                              └─ upstream→agent pump: proto::ServerParser ─▶ policy ─▶ envelope::Opener ─▶ agent
//!                                                                   ▲                               ▲
//!                                                 keyring snapshot (lock-free)              session::info rewrite
//! ```
//!
//! # Layers
//!
//! Modules stand in floors. Each imports only modules declared before it below, bottom to top,
//! and `tests/it/layers.rs` refuses any `crate::` import of a module above (unit tests aside).
//!
//! 1. [`process`]: facts about this process and machine (node id, host name, descriptor limit).
//! 2. [`ct`]: constant-time comparison of fingerprints and hashes.
//! 3. [`proto`]: NATS ops, incremental parsers and canonical encoders. No I/O.
//! 4. [`policy`]: ordered subject rules (`encrypt`, `plaintext`, `deny`).
//! 5. [`tls`]: the agent listener's and the upstream's TLS settings and certificate reloads.
//! 6. [`envelope`]: the sealed payload format, XChaCha20-Poly1305 (one message at a time, or
//!    the messages of one read together with AVX-512), key types and derivations.
//! 7. [`bus`]: the names the deployment keeps on the bus, and opening the control bucket.
//! 8. [`kek`]: the root (file, PKCS#11, Vault Transit, AWS KMS) and the deployment seed.
//! 9. [`audit`]: the hash-chained, authenticated audit log and its stream on the bus.
//! 10. [`config`]: the configuration file and flags, validated into typed values.
//! 11. [`keyring`]: epochs and their keys, the active snapshot, the retired LRU, the state
//!     directory.
//! 12. [`scope`]: which scope's keyring serves which subject.
//! 13. [`metrics`]: the Prometheus registry; the families of the floors below are registered
//!     into it here (the KMS's are owned by [`kek`]).
//! 14. [`control`]: the control plane, the key authority and the proxies' side of it.
//! 15. [`session`]: one agent connection: upstream dial, INFO rewrite, the two pumps.
//! 16. [`admin`]: the admin HTTP endpoint (`/metrics`, health).
//! 17. [`server`]: the listener, connection cap, reloads and shutdown.
//! 18. [`status`]: the fleet's status as `cipherbus status` shows it.
//!
//! The binary (`src/main.rs`) stands on top: the command line (`cli`) and the end-to-end
//! benchmark harness (`bench`) live there, outside the library, so no module of the proxy can
//! reach them.

// `envelope::multi` alone allows `unsafe`, for its AVX-512 kernels; see its module docs.
#![deny(unsafe_code)]

pub mod process;
pub mod ct;
pub mod proto;
pub mod policy;
pub mod tls;
pub mod envelope;
pub mod bus;
pub mod kek;
pub mod audit;
pub mod config;
pub mod keyring;
pub mod scope;
pub mod metrics;
pub mod control;
pub mod session;
pub mod admin;
pub mod server;
pub mod status;

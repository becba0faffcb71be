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
//! - [`proto`]: NATS ops, incremental parsers and canonical encoders. No I/O.
//! - [`envelope`]: the sealed payload format, XChaCha20-Poly1305 (one message at a time, or
//!   the messages of one read together with AVX-512), key types and derivations.
//! - [`keyring`]: epochs and their keys, the active snapshot, the retired LRU, the state directory.
//! - [`policy`]: ordered subject rules (`encrypt`, `plaintext`, `deny`).
//! - [`session`]: one agent connection: upstream dial, INFO rewrite, the two pumps.
//! - [`server`]: the listener, connection cap and shutdown.
//! - [`ct`]: constant-time comparison of fingerprints and hashes.
//! - [`config`], [`cli`], [`metrics`], [`admin`]: configuration, the command line, Prometheus
//!   metrics and the admin HTTP endpoint.

// `envelope::multi` alone allows `unsafe`, for its AVX-512 kernels; see its module docs.
#![deny(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod ct;
pub mod envelope;
pub mod kek;
pub mod keyring;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod scope;
pub mod server;
pub mod session;
pub mod status;
pub mod tls;

//! Multi-buffer IETF ChaCha20-Poly1305: the messages of one read batch sealed or opened
//! together, sixteen ChaCha20 blocks and eight Poly1305 chains at a time with AVX-512.
//!
//! This is the one module allowed `unsafe`: only to call `#[target_feature]` kernels after
//! the CPU features were detected at run time, and to move 64-byte values between arrays
//! and vector registers. Every unsafe block carries a `// Safety:` comment.

#![allow(unsafe_code)]

pub(crate) mod poly;

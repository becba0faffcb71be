//! The control plane: key announcements between the key authority and the proxies.
//!
//! - [`message`]: the sealed, replay-protected wire format.
//! - [`member`]: the proxy side, which applies announcements to its keyring live.
//! - [`authority`]: the key authority, the single writer of epochs.

pub mod authority;
pub mod member;
pub mod message;

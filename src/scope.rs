//! Key scopes at run time: the keyring of every scope this process holds, and which scope an
//! envelope belongs to.
//!
//! Index 0 is the default scope (the top-level root, version-1 envelopes); index `i + 1` is the
//! `i`-th `[[scope]]` of the config, the index a policy [`crate::policy::Decision`] names. A
//! scope not configured here has no keyring, so its envelopes are refused, never opened.

use std::sync::Arc;

use arc_swap::Guard;

use crate::envelope::ScopeId;
use crate::keyring::{Keyring, Snapshot};

/// The name the default scope has in metrics and operator output.
pub const DEFAULT_SCOPE: &str = "default";

/// One scope this process holds the root of.
#[derive(Debug)]
pub struct Held {
    pub name: &'static str,
    /// `None` for the default scope.
    pub id: Option<ScopeId>,
    pub keyring: Arc<Keyring>,
}

/// Every scope this process holds, default first.
#[derive(Debug)]
pub struct Scopes {
    held: Vec<Held>,
}

impl Scopes {
    /// Only the default scope.
    pub fn new(default: Arc<Keyring>) -> Self {
        Scopes {
            held: vec![Held {
                name: DEFAULT_SCOPE,
                id: None,
                keyring: default,
            }],
        }
    }

    /// Adds the next configured scope.
    pub fn push(&mut self, name: &'static str, id: ScopeId, keyring: Arc<Keyring>) {
        self.held.push(Held {
            name,
            id: Some(id),
            keyring,
        });
    }

    /// The default scope's keyring.
    pub fn default_keyring(&self) -> &Arc<Keyring> {
        &self.held[0].keyring
    }

    pub fn iter(&self) -> impl Iterator<Item = &Held> {
        self.held.iter()
    }

    pub fn get(&self, index: usize) -> Option<&Held> {
        self.held.get(index)
    }

    /// Whether any scope beside the default one is configured.
    pub fn named(&self) -> bool {
        self.held.len() > 1
    }

    /// The index of the scope an envelope names (`None`: version 1, the default scope), if
    /// this process holds it.
    pub fn index_of(&self, id: Option<ScopeId>) -> Option<usize> {
        match id {
            None => Some(0),
            Some(id) => self.held.iter().position(|h| h.id == Some(id)),
        }
    }

    /// Every scope's current keys, for one batch of messages.
    pub fn keys(&self) -> Keys<'_> {
        Keys {
            scopes: self,
            default: self.held[0].keyring.snapshot(),
            named: self.held[1..]
                .iter()
                .map(|h| h.keyring.snapshot())
                .collect(),
        }
    }
}

/// The snapshots of every held scope's keyring, taken together. Holding it pins those keys:
/// drop it before waiting on anything.
pub struct Keys<'a> {
    scopes: &'a Scopes,
    default: Guard<Arc<Snapshot>>,
    /// Empty (no allocation) when only the default scope is configured.
    named: Vec<Guard<Arc<Snapshot>>>,
}

impl Keys<'_> {
    /// Scope `index`'s keyring and snapshot.
    pub fn get(&self, index: usize) -> Option<(&Held, &Snapshot)> {
        let held = self.scopes.get(index)?;
        let snap = match index {
            0 => &self.default,
            i => self.named.get(i - 1)?,
        };
        Some((held, snap))
    }

    /// See [`Scopes::index_of`].
    pub fn index_of(&self, id: Option<ScopeId>) -> Option<usize> {
        self.scopes.index_of(id)
    }

    /// The default scope's snapshot.
    pub fn default_snapshot(&self) -> &Snapshot {
        &self.default
    }

    /// A number that changes whenever any scope's keyring changes (each generation only
    /// grows, so their sum does too).
    pub fn generation(&self) -> u64 {
        self.named
            .iter()
            .fold(self.default.generation, |g, s| g.wrapping_add(s.generation))
    }

    /// Takes the snapshots again (after a wait).
    pub fn refresh(&mut self) {
        self.default = self.scopes.held[0].keyring.snapshot();
        for (slot, held) in self.named.iter_mut().zip(&self.scopes.held[1..]) {
            *slot = held.keyring.snapshot();
        }
    }
}

//! Subject policy: an ordered list of rules mapping subject patterns to a mode.
//!
//! This module owns subject-pattern matching and the decision for a subject. It knows nothing
//! of sockets, keys or envelopes; the session asks it and acts on the answer.
//!
//! Order of evaluation, first match wins:
//! 1. the control prefix is denied to agents (not overridable, so a config can never open it);
//! 2. the operator's rules, in file order;
//! 3. the built-in plaintext rules for subjects nats-server itself parses ([`DEFAULT_PLAINTEXT`]);
//! 4. everything else is encrypted.
//!
//! An encrypted subject is then given its key scope: the first `[[scope]]` whose patterns match
//! it, else the default scope (index 0).

use serde::Deserialize;

/// Subjects the server parses or originates, so their payloads must stay readable to it.
pub const DEFAULT_PLAINTEXT: &[&str] = &[
    "$JS.API.>",
    "$JS.*.API.>",
    "$JS.ACK.>",
    "$JS.FC.>",
    "$JS.SNAPSHOT.>",
    "$JS.EVENT.>",
    "$SYS.>",
    "$SRV.>",
];

/// Default prefix of the control plane's subjects.
pub const DEFAULT_CONTROL_PREFIX: &str = "cipherbus.ctl";

/// What happens to payloads on a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Seal outbound, open inbound, refuse anything that does not open.
    Encrypt,
    /// Pass both ways untouched.
    Plaintext,
    /// Refuse the agent's publishes and subscriptions; never deliver.
    Deny,
}

/// The answer for one subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub mode: Mode,
    /// Whether sealed payloads are bound to their subject (see `docs/ENVELOPE.md`).
    pub bind_subject: bool,
    /// The key scope an `encrypt` subject is sealed under: 0 for the default scope, `i + 1`
    /// for the `i`-th configured scope.
    pub scope: u16,
}

/// One rule as written in the config file (`[[policy]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A NATS subject pattern (`*` one token, `>` the rest).
    pub subject: String,
    pub mode: Mode,
    /// Only for `encrypt`: set to `false` where the server rewrites subjects (mappings, stream
    /// transforms), so an envelope is not bound to the subject it was published on.
    #[serde(default = "default_true")]
    pub bind_subject: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid subject pattern {pattern:?}: {why}")]
    BadPattern { pattern: String, why: &'static str },
    #[error("rule for {pattern:?}: bind_subject = false only applies to mode \"encrypt\"")]
    BindOnNonEncrypt { pattern: String },
    #[error("scope {scope:?}: subject pattern {pattern:?} can never match: scope {earlier:?} takes every subject it matches ({covering:?})")]
    Shadowed {
        scope: String,
        pattern: String,
        earlier: String,
        covering: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(Box<[u8]>),
    Star,
    Rest,
}

/// A parsed subject pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    tokens: Vec<Token>,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let bad = |why| PolicyError::BadPattern {
            pattern: s.to_owned(),
            why,
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(bad("contains white space"));
        }
        let parts: Vec<&str> = s.split('.').collect();
        let mut tokens = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            tokens.push(match *part {
                "" => return Err(bad("empty token")),
                "*" => Token::Star,
                ">" if i + 1 == parts.len() => Token::Rest,
                ">" => return Err(bad("'>' must be the last token")),
                lit => Token::Literal(lit.as_bytes().into()),
            });
        }
        Ok(Pattern { tokens })
    }

    /// Whether a literal subject matches this pattern.
    pub fn matches(&self, subject: &[u8]) -> bool {
        let mut parts = subject.split(|&b| b == b'.');
        for token in &self.tokens {
            match (token, parts.next()) {
                (Token::Rest, Some(_)) => return true,
                (Token::Star, Some(_)) => {}
                (Token::Literal(l), Some(p)) if **l == *p => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }

    /// Whether every subject matched by `sub` (itself a pattern) is also matched by `self`.
    pub fn contains(&self, sub: &[u8]) -> bool {
        let mut parts = sub.split(|&b| b == b'.');
        for token in &self.tokens {
            match (token, parts.next()) {
                (Token::Rest, Some(_)) => return true,
                (Token::Star, Some(p)) if p != b">" => {}
                (Token::Literal(l), Some(p)) if **l == *p => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: Pattern,
    decision: Decision,
}

/// The compiled, ordered rule list.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    control_prefix: String,
    /// Each configured scope's patterns, in file order.
    scopes: Vec<Vec<Pattern>>,
    /// Which reload this policy came from (0 at start); caches of decisions compare it.
    revision: u64,
}

const ENCRYPT_BOUND: Decision = Decision {
    mode: Mode::Encrypt,
    bind_subject: true,
    scope: 0,
};

impl Policy {
    /// Builds the policy: control-prefix deny, then `rules`, then the built-in defaults.
    pub fn new(rules: &[RuleConfig], control_prefix: &str) -> Result<Self, PolicyError> {
        let mut compiled = Vec::with_capacity(rules.len() + DEFAULT_PLAINTEXT.len() + 3);
        let deny = Decision {
            mode: Mode::Deny,
            bind_subject: true,
            scope: 0,
        };
        let prefix = Pattern::parse(control_prefix)?;
        if prefix
            .tokens
            .iter()
            .any(|t| !matches!(t, Token::Literal(_)))
        {
            return Err(PolicyError::BadPattern {
                pattern: control_prefix.to_owned(),
                why: "the control prefix must not contain wildcards",
            });
        }
        compiled.push(Rule {
            pattern: prefix,
            decision: deny,
        });
        compiled.push(Rule {
            pattern: Pattern::parse(&format!("{control_prefix}.>"))?,
            decision: deny,
        });
        for r in rules {
            if !r.bind_subject && r.mode != Mode::Encrypt {
                return Err(PolicyError::BindOnNonEncrypt {
                    pattern: r.subject.clone(),
                });
            }
            compiled.push(Rule {
                pattern: Pattern::parse(&r.subject)?,
                decision: Decision {
                    mode: r.mode,
                    bind_subject: r.bind_subject,
                    scope: 0,
                },
            });
        }
        for s in DEFAULT_PLAINTEXT {
            compiled.push(Rule {
                pattern: Pattern::parse(s)?,
                decision: Decision {
                    mode: Mode::Plaintext,
                    bind_subject: true,
                    scope: 0,
                },
            });
        }
        Ok(Policy {
            rules: compiled,
            control_prefix: control_prefix.to_owned(),
            scopes: Vec::new(),
            revision: 0,
        })
    }

    /// Adds the key scopes, each a name and its subject patterns, in order. A pattern that an
    /// earlier scope's pattern covers entirely could never match, and is refused.
    pub fn with_scopes(mut self, scopes: &[(String, Vec<String>)]) -> Result<Self, PolicyError> {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (name, patterns) in scopes {
            let mut compiled = Vec::with_capacity(patterns.len());
            for p in patterns {
                let pattern = Pattern::parse(p)?;
                if let Some((earlier, covering)) = seen.iter().find(|(_, q)| {
                    Pattern::parse(q)
                        .is_ok_and(|q| q.contains(p.as_bytes()) || q.matches(p.as_bytes()))
                }) {
                    return Err(PolicyError::Shadowed {
                        scope: name.clone(),
                        pattern: p.clone(),
                        earlier: (*earlier).to_owned(),
                        covering: (*covering).to_owned(),
                    });
                }
                compiled.push(pattern);
            }
            for p in patterns {
                seen.push((name, p));
            }
            self.scopes.push(compiled);
        }
        Ok(self)
    }

    pub fn control_prefix(&self) -> &str {
        &self.control_prefix
    }

    /// Which reload this policy came from.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// This policy, as the one reload `revision` put in place.
    pub fn with_revision(mut self, revision: u64) -> Self {
        self.revision = revision;
        self
    }

    /// The decision for a literal subject (PUB, MSG). Falls back to encrypt, bound.
    pub fn decide(&self, subject: &[u8]) -> Decision {
        let mut d = self
            .rules
            .iter()
            .find(|r| r.pattern.matches(subject))
            .map_or(ENCRYPT_BOUND, |r| r.decision);
        if d.mode == Mode::Encrypt && !self.scopes.is_empty() {
            d.scope = self
                .scopes
                .iter()
                .position(|ps| ps.iter().any(|p| p.matches(subject)))
                .map_or(0, |i| u16::try_from(i + 1).unwrap_or(0));
        }
        d
    }

    /// Whether a subscription pattern lies entirely inside a `deny` rule, so the server would
    /// never be asked. Overlapping wildcards (`>`) are allowed; their denied deliveries are
    /// dropped one by one instead.
    pub fn sub_denied(&self, pattern: &[u8]) -> bool {
        self.rules
            .iter()
            .find(|r| r.pattern.contains(pattern) || r.pattern.matches(pattern))
            .is_some_and(|r| r.decision.mode == Mode::Deny)
    }
}

impl Default for Policy {
    fn default() -> Self {
        // The built-in rules are valid patterns; this is covered by the tests below.
        Policy::new(&[], DEFAULT_CONTROL_PREFIX).expect("built-in policy is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(subject: &str, mode: Mode) -> RuleConfig {
        RuleConfig {
            subject: subject.into(),
            mode,
            bind_subject: true,
        }
    }

    #[test]
    fn pattern_matching() {
        let p = Pattern::parse("a.*.c").unwrap();
        assert!(p.matches(b"a.b.c"));
        assert!(!p.matches(b"a.b"));
        assert!(!p.matches(b"a.b.c.d"));
        let p = Pattern::parse("a.>").unwrap();
        assert!(p.matches(b"a.b"));
        assert!(p.matches(b"a.b.c"));
        assert!(!p.matches(b"a"));
        assert!(Pattern::parse("a.>.b").is_err());
        assert!(Pattern::parse("a..b").is_err());
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("a b").is_err());
    }

    #[test]
    fn defaults() {
        let p = Policy::default();
        let mode = |s: &str| p.decide(s.as_bytes()).mode;
        assert_eq!(mode("orders.new"), Mode::Encrypt);
        assert_eq!(mode("_INBOX.abc.1"), Mode::Encrypt);
        assert_eq!(mode("$KV.cfg.key"), Mode::Encrypt);
        assert_eq!(mode("$JS.API.STREAM.INFO.S"), Mode::Plaintext);
        assert_eq!(mode("$JS.hub.API.STREAM.INFO.S"), Mode::Plaintext);
        assert_eq!(mode("$JS.ACK.S.C.1.1.1.1.0"), Mode::Plaintext);
        assert_eq!(mode("$JS.FC.S.x.y"), Mode::Plaintext);
        assert_eq!(mode("$SYS.REQ.SERVER.PING"), Mode::Plaintext);
        assert_eq!(mode("cipherbus.ctl"), Mode::Deny);
        assert_eq!(mode("cipherbus.ctl.announce"), Mode::Deny);
        assert_eq!(mode("cipherbus.other"), Mode::Encrypt);
    }

    #[test]
    fn operator_rules_cannot_open_the_control_prefix() {
        let p = Policy::new(
            &[
                rule("cipherbus.>", Mode::Plaintext),
                rule("public.>", Mode::Plaintext),
            ],
            DEFAULT_CONTROL_PREFIX,
        )
        .unwrap();
        assert_eq!(p.decide(b"cipherbus.ctl.x").mode, Mode::Deny);
        assert_eq!(p.decide(b"cipherbus.x").mode, Mode::Plaintext);
        assert_eq!(p.decide(b"public.news").mode, Mode::Plaintext);
    }

    #[test]
    fn sub_denied_only_when_contained() {
        let p = Policy::default();
        assert!(p.sub_denied(b"cipherbus.ctl.>"));
        assert!(p.sub_denied(b"cipherbus.ctl.*"));
        assert!(p.sub_denied(b"cipherbus.ctl"));
        assert!(!p.sub_denied(b">"));
        assert!(!p.sub_denied(b"cipherbus.>"));
        assert!(!p.sub_denied(b"orders.*"));
    }

    #[test]
    fn bind_subject_opt_out_only_for_encrypt() {
        let mut r = rule("mapped.>", Mode::Encrypt);
        r.bind_subject = false;
        let p = Policy::new(std::slice::from_ref(&r), DEFAULT_CONTROL_PREFIX).unwrap();
        assert!(!p.decide(b"mapped.x").bind_subject);
        r.mode = Mode::Plaintext;
        assert!(Policy::new(&[r], DEFAULT_CONTROL_PREFIX).is_err());
    }

    #[test]
    fn the_first_matching_scope_wins_and_shadowed_patterns_are_refused() {
        let scopes = |list: &[(&str, &[&str])]| -> Vec<(String, Vec<String>)> {
            list.iter()
                .map(|(n, ps)| (n.to_string(), ps.iter().map(|p| p.to_string()).collect()))
                .collect()
        };
        let p = Policy::new(&[rule("public.>", Mode::Plaintext)], DEFAULT_CONTROL_PREFIX)
            .unwrap()
            .with_scopes(&scopes(&[
                ("payments", &["payments.>", "ledger.*.events"]),
                ("ops", &["ops.>", "ledger.>"]),
            ]))
            .unwrap();
        assert_eq!(p.decide(b"payments.eu.new").scope, 1);
        assert_eq!(p.decide(b"ledger.eu.events").scope, 1);
        assert_eq!(p.decide(b"ledger.eu.other").scope, 2);
        assert_eq!(p.decide(b"ops.x").scope, 2);
        assert_eq!(p.decide(b"orders.new").scope, 0);
        // Plaintext and denied subjects have no scope.
        assert_eq!(p.decide(b"public.payments").scope, 0);
        assert_eq!(p.decide(b"cipherbus.ctl.x").scope, 0);

        let shadowed =
            Policy::default().with_scopes(&scopes(&[("a", &["tenant.>"]), ("b", &["tenant.b.>"])]));
        let err = shadowed.unwrap_err().to_string();
        assert!(err.contains("\"tenant.b.>\" can never match"), "{err}");
        assert!(err.contains("scope \"a\""), "{err}");
        let exact = Policy::default().with_scopes(&scopes(&[("a", &["x.y"]), ("b", &["x.*"])]));
        assert!(exact.is_ok(), "a later, wider pattern still matches");
        let same = Policy::default().with_scopes(&scopes(&[("a", &["x.*"]), ("b", &["x.y"])]));
        assert!(same.is_err());
    }

    #[test]
    fn control_prefix_must_be_literal() {
        assert!(Policy::new(&[], "ctl.*").is_err());
        assert!(Policy::new(&[], "").is_err());
    }
}

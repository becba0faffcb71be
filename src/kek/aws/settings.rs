//! Where an `aws-kms:` root's settings come from: static credentials from the environment or
//! the shared files, key references and regions, and the profile files themselves.

use super::*;

/// Static AWS credentials and where they were found. `Debug` shows the access key id (not a
/// secret: it names the key) and the source, never the secret key or the session token.
pub struct AwsCredentials {
    pub(super) access_key_id: String,
    pub(super) secret_access_key: Zeroizing<String>,
    pub(super) session_token: Option<Zeroizing<String>>,
    /// `the environment`, or `profile NAME of FILE`.
    pub(super) source: String,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("source", &self.source)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl AwsCredentials {
    /// Checks and trims credentials; refusals never show them.
    pub fn new(
        access_key_id: &str,
        secret_access_key: Zeroizing<String>,
        session_token: Option<Zeroizing<String>>,
        source: String,
    ) -> Result<AwsCredentials, String> {
        let visible = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        let access_key_id = access_key_id.trim();
        if !visible(access_key_id) {
            return Err(format!(
                "the access key id from {source} is empty or holds characters other than \
                 visible ASCII"
            ));
        }
        let secret = Zeroizing::new(secret_access_key.trim().to_owned());
        if !visible(&secret) {
            return Err(format!(
                "the secret access key from {source} is empty or holds characters other than \
                 visible ASCII"
            ));
        }
        let token = match session_token {
            Some(t) if t.trim().is_empty() => None,
            Some(t) => {
                let t = Zeroizing::new(t.trim().to_owned());
                if !visible(&t) {
                    return Err(format!(
                        "the session token from {source} holds characters other than visible \
                         ASCII"
                    ));
                }
                Some(t)
            }
            None => None,
        };
        Ok(AwsCredentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: secret,
            session_token: token,
            source,
        })
    }
}

/// What KEY names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyRef {
    KeyId,
    KeyArn {
        region: String,
    },
    /// `alias/NAME`: the only form `create` accepts.
    Alias,
    AliasArn {
        region: String,
    },
}

impl KeyRef {
    pub(super) fn parse(key: &str) -> Result<KeyRef, String> {
        let alias_name = |name: &str| {
            !name.is_empty()
                && name.len() <= 250
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
        };
        if key.len() > 2048 {
            return Err("the key name is longer than 2048 characters".into());
        }
        if let Some(rest) = key.strip_prefix("arn:") {
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(
                    "a KMS ARN is arn:PARTITION:kms:REGION:ACCOUNT:key/ID or …:alias/NAME".into(),
                );
            };
            let word = |s: &str| {
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            };
            if !word(partition)
                || service != "kms"
                || !valid_region(region)
                || account.len() != 12
                || !account.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(
                    "a KMS ARN is arn:PARTITION:kms:REGION:ACCOUNT:key/ID or …:alias/NAME".into(),
                );
            }
            let region = region.to_owned();
            if let Some(id) = resource.strip_prefix("key/") {
                if word(id) {
                    return Ok(KeyRef::KeyArn { region });
                }
            } else if let Some(name) = resource.strip_prefix("alias/") {
                if alias_name(name) {
                    return Ok(KeyRef::AliasArn { region });
                }
            }
            return Err(format!(
                "the ARN names {resource:?}, not key/ID or alias/NAME of letters, digits, / _ -"
            ));
        }
        if let Some(name) = key.strip_prefix("alias/") {
            return if alias_name(name) {
                Ok(KeyRef::Alias)
            } else {
                Err("an alias is alias/NAME, NAME of letters, digits, / _ - (at most 250)".into())
            };
        }
        if !key.is_empty()
            && key.len() <= 100
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Ok(KeyRef::KeyId);
        }
        Err("KEY is a key id, a key ARN, alias/NAME or an alias ARN".into())
    }

    pub(super) fn region(&self) -> Option<&str> {
        match self {
            KeyRef::KeyArn { region } | KeyRef::AliasArn { region } => Some(region),
            _ => None,
        }
    }
}

/// A region name, as it goes into a host name and the signature's scope.
pub(super) fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !r.starts_with('-')
        && !r.ends_with('-')
}

/// A shared config or credentials file, with where it is for messages.
pub(super) struct ProfileFile {
    pub(super) path: Option<PathBuf>,
    /// Zeroized when dropped: a credentials file holds secret keys.
    pub(super) text: Zeroizing<String>,
}

impl ProfileFile {
    /// Reads `explicit`, else `~/<default>`. A missing file is an empty one, as the AWS CLI
    /// takes it; one that exists and cannot be read is an error.
    pub(super) fn read(
        explicit: Option<String>,
        home: Option<&str>,
        default: &str,
    ) -> Result<Self, String> {
        let path = explicit
            .map(PathBuf::from)
            .or_else(|| home.map(|h| Path::new(h).join(default)));
        let Some(p) = &path else {
            return Ok(ProfileFile {
                path,
                text: Zeroizing::new(String::new()),
            });
        };
        match std::fs::read(p) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| format!("{} is not UTF-8", p.display()))?;
                Ok(ProfileFile {
                    text: Zeroizing::new(text.to_owned()),
                    path,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProfileFile {
                path,
                text: Zeroizing::new(String::new()),
            }),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    }

    pub(super) fn shown(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "(no file: HOME is not set)".into(),
        }
    }

    /// The properties of `profile`: in a config file (`prefixed`) its section is
    /// `[profile NAME]` or, for `default`, `[default]`; in a credentials file it is `[NAME]`.
    /// Repeated sections merge, later values winning. `None` when there is no such section.
    pub(super) fn profile(&self, profile: &str, prefixed: bool) -> Option<Vec<(&str, &str)>> {
        let mut found = false;
        let mut props: Vec<(&str, &str)> = Vec::new();
        let mut inside = false;
        for line in self.text.lines() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if let Some(header) = trimmed.strip_prefix('[') {
                let name = header.split(']').next().unwrap_or("").trim();
                inside = if prefixed {
                    match name.strip_prefix("profile") {
                        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim() == profile,
                        _ => name == "default" && profile == "default",
                    }
                } else {
                    name == profile
                };
                found |= inside;
                continue;
            }
            // An indented line continues a nested property (`s3 =` and the like).
            if !inside || line.starts_with([' ', '\t']) {
                continue;
            }
            if let Some((k, v)) = trimmed.split_once('=') {
                let k = k.trim();
                props.retain(|(old, _)| !old.eq_ignore_ascii_case(k));
                props.push((k, v.trim()));
            }
        }
        found.then_some(props)
    }
}

pub(super) fn prop<'a>(props: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    props
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
        .filter(|v| !v.is_empty())
}

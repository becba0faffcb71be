//! The operator's commands, answered by the key authority over the bus: `rotate`, `keys`,
//! `status`, `rewrap`, `migrate` and `revoke`.

use super::*;

pub(super) fn rotate(args: RotateArgs) -> ExitCode {
    use cipherbus::control::message::Body;
    let body = match ask_authority(
        args.authority,
        cipherbus::control::authority::rotate_subject,
        Body::RotateRequest {
            reason: args.reason,
        },
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match body {
        Body::RotateReply {
            epoch,
            acked,
            laggards,
            error: None,
        } => {
            println!("epoch {epoch} is active");
            println!(
                "acknowledged by {} proxies: {}",
                acked.len(),
                acked.join(", ")
            );
            if !laggards.is_empty() {
                println!("did not acknowledge in time: {}", laggards.join(", "));
            }
            ExitCode::SUCCESS
        }
        Body::RotateReply { error: Some(e), .. } => {
            eprintln!("cipherbus: rotation failed: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("cipherbus: the authority answered with something else");
            ExitCode::FAILURE
        }
    }
}

/// A connection for the operator commands, within `timeout`.
pub(super) async fn connect(
    tls: &cipherbus::tls::UpstreamFiles,
    upstreams: &[String],
    timeout: std::time::Duration,
) -> Result<async_nats::Client, String> {
    cipherbus::tls::install_default_provider();
    let opts = tls
        .apply(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?;
    let connect = opts.name("cipherbus-cli").connect(upstreams.to_vec());
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("cannot reach the bus: {e}")),
        Err(_) => Err("cannot reach the bus in time".to_owned()),
    }
}

/// What the operator commands need to reach the bus.
pub(super) struct Bus {
    pub(super) timeout: std::time::Duration,
    pub(super) upstreams: Vec<String>,
    pub(super) root: Arc<Root>,
    pub(super) tls: cipherbus::tls::UpstreamFiles,
    pub(super) prefix: String,
}

impl Bus {
    pub(super) fn from_args(args: AuthorityArgs) -> Result<Self, ExitCode> {
        let timeout = cipherbus::config::parse_duration(&args.timeout).ok_or_else(|| {
            fail(&format!(
                "--timeout {:?} is not a valid duration (examples: 30s, 2m)",
                args.timeout
            ))
        })?;
        let mut upstreams = Vec::new();
        let raw = if args.upstream.is_empty() {
            vec![cipherbus::config::DEFAULT_UPSTREAM.to_owned()]
        } else {
            args.upstream
        };
        for entry in &raw {
            for url in entry.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let u = cipherbus::config::parse_upstream(url).map_err(|e| fail(&e))?;
                let scheme = if u.tls { "tls" } else { "nats" };
                upstreams.push(format!("{scheme}://{u}"));
            }
        }
        let (uri, resolved_prefix) = match (args.resolved, args.kek, args.kek_file) {
            (Some((uri, prefix)), _, _) => (uri, Some(prefix)),
            (None, Some(k), _) => (KekUri::parse(&k).map_err(|e| fail(&e))?, None),
            (None, None, Some(f)) => (KekUri::File(f), None),
            (None, None, None) => return Err(fail(&"give --kek URI or --kek-file FILE")),
        };
        let t = args.tls;
        let tls = cipherbus::tls::UpstreamFiles {
            ca: t.upstream_ca,
            cert: t.upstream_cert,
            key: t.upstream_key,
            first: t.upstream_tls_first,
            server_name: t.upstream_server_name,
        };
        let prefix = match &args.scope {
            _ if resolved_prefix.is_some() => resolved_prefix.unwrap_or_default(),
            None => args.control_prefix,
            Some(name) if name == cipherbus::scope::DEFAULT_SCOPE => args.control_prefix,
            Some(name) => {
                let valid = !name.is_empty()
                    && name.len() <= cipherbus::config::MAX_SCOPE_NAME
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !valid {
                    return Err(fail(&format!("--scope {name:?} is not a scope name")));
                }
                format!("{}.scope.{name}", args.control_prefix)
            }
        };
        // An HSM or KMS root needs the bus for its deployment seed.
        let root = runtime()?
            .block_on(async {
                if uri.is_file() {
                    return cipherbus::kek::seed::open_root(&uri, None, "", false).await;
                }
                let client = connect(&tls, &upstreams, timeout).await?;
                cipherbus::kek::seed::open_root(&uri, Some(&client), &prefix, false).await
            })
            .map_err(|e| fail(&e))?;
        Ok(Bus {
            timeout,
            upstreams,
            root,
            tls,
            prefix,
        })
    }

    pub(super) async fn connect(&self) -> Result<async_nats::Client, String> {
        connect(&self.tls, &self.upstreams, self.timeout).await
    }

    /// The deployment's audit stream, verified.
    pub(super) async fn audit_stream(&self) -> Result<cipherbus::audit::Verified, String> {
        let client = self.connect().await?;
        let stream = cipherbus::audit::stream::AuditStream::existing(&client, &self.prefix)
            .await
            .map_err(|e| e.to_string())?;
        let lines = stream.lines().await.map_err(|e| e.to_string())?;
        let key = cipherbus::audit::AuditKey::from_root(&self.root);
        cipherbus::audit::verify_lines(&key, &format!("stream {}", stream.name()), lines)
            .map_err(|e| e.to_string())
    }
}

pub(super) fn ask_authority(
    args: AuthorityArgs,
    subject: impl FnOnce(&str) -> String,
    body: cipherbus::control::message::Body,
) -> Result<cipherbus::control::message::Body, ExitCode> {
    let Bus {
        timeout,
        upstreams,
        root,
        tls,
        prefix,
    } = Bus::from_args(args)?;
    let rt = runtime()?;
    let subject = subject(&prefix);
    let answer = rt.block_on(async {
        tokio::time::timeout(
            timeout,
            cipherbus::control::authority::request(upstreams, &root, &tls, subject, body),
        )
        .await
    });
    match answer {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => {
            eprintln!("cipherbus: {e}");
            Err(ExitCode::FAILURE)
        }
        Err(_) => {
            eprintln!(
                "cipherbus: no answer from the key authority within {timeout:?}; is `cipherbus controller` or `run --controller` running on this bus?"
            );
            Err(ExitCode::FAILURE)
        }
    }
}

/// How long `status` waits for the authority (less with a shorter --timeout).
pub(super) const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) fn status(
    args: AuthorityArgs,
    config: Option<&Path>,
    json: bool,
    watch: bool,
) -> ExitCode {
    use std::io::IsTerminal;
    // Each scope asked of its own authority under its own root.
    let mut scopes = Vec::new();
    match config {
        Some(file) => match every_scope(&args, file) {
            Ok(every) => {
                for (name, one) in every {
                    match Bus::from_args(one) {
                        Ok(b) => scopes.push((name.to_owned(), b)),
                        Err(code) => return code,
                    }
                }
            }
            Err(code) => return code,
        },
        None => {
            let name = args
                .scope
                .clone()
                .unwrap_or_else(|| cipherbus::scope::DEFAULT_SCOPE.to_owned());
            match Bus::from_args(args) {
                Ok(b) => scopes.push((name, b)),
                Err(code) => return code,
            }
        }
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let terminal = std::io::stdout().is_terminal();
    rt.block_on(async {
        // Every scope is on the same bus: one connection asks them all.
        let client = match scopes[0].1.connect().await {
            Ok(c) => c,
            Err(e) => return fail(&e),
        };
        let mut sealers = Vec::new();
        for (_, bus) in &scopes {
            match cipherbus::control::message::ControlSealer::new(
                cipherbus::process::node_id("cli"),
                bus.root.control_key(),
            ) {
                Ok(s) => sealers.push(s),
                Err(e) => return fail(&e),
            }
        }
        loop {
            if watch && terminal && !json {
                // Home and clear: this look replaces the last one.
                print!("\x1b[H\x1b[2J");
            }
            let mut failed = false;
            for (i, ((name, bus), sealer)) in scopes.iter().zip(&mut sealers).enumerate() {
                let wait = bus.timeout.min(STATUS_WAIT);
                let control_key = bus.root.control_key();
                let look =
                    cipherbus::status::look(&client, sealer, control_key, &bus.prefix, wait).await;
                if json {
                    println!("{}", cipherbus::status::json(name, &bus.prefix, &look));
                } else {
                    if i > 0 {
                        println!();
                    }
                    print!("{}", cipherbus::status::table(name, &bus.prefix, &look));
                }
                if let Some(e) = &look.error {
                    failed = true;
                    if !watch {
                        eprintln!("cipherbus: scope {name}: {e}");
                    }
                }
            }
            if !watch {
                return if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                };
            }
            if !json {
                println!();
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                _ = wait_for_signal() => return ExitCode::SUCCESS,
            }
        }
    })
}

pub(super) fn rewrap(args: AuthorityArgs) -> ExitCode {
    use cipherbus::control::message::Body;
    let body = match ask_authority(
        args,
        cipherbus::control::authority::rewrap_subject,
        Body::RewrapRequest {},
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match body {
        Body::RewrapReply {
            rewrapped,
            seed,
            error: None,
        } => {
            println!(
                "{rewrapped} data keys{} wrapped again under the root's newest version; every proxy stores them as it applies the commit",
                if seed { " and the deployment seed" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Body::RewrapReply { error: Some(e), .. } => {
            eprintln!("cipherbus: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("cipherbus: the authority answered with something else");
            ExitCode::FAILURE
        }
    }
}

/// `migrate`: writes the file root's key, wrapped under the HSM or KMS root, as the
/// deployment seed. Refused where the deployment has a seed already.
pub(super) fn migrate(from: PathBuf, args: AuthorityArgs) -> ExitCode {
    let Some(kek) = args.kek.clone() else {
        return fail(&"migrate needs --kek URI: the HSM or KMS root to move to");
    };
    let uri = match KekUri::parse(&kek) {
        Ok(KekUri::File(_)) => return fail(&"--kek must name an HSM or KMS root, not a file"),
        Ok(u) => u,
        Err(e) => return fail(&e),
    };
    use cipherbus::kek::file::RootKeySource;
    let old = match cipherbus::kek::file::KekFile(from.clone()).load() {
        Ok(k) => k,
        Err(e) => return fail(&e),
    };
    // The operator commands' plumbing, with the file root to reach the bus.
    let bus = match Bus::from_args(AuthorityArgs {
        kek: None,
        kek_file: Some(from),
        ..args
    }) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let done: Result<String, String> = rt.block_on(async {
        let kek = cipherbus::kek::blocking(|| {
            let kek = uri.open_kek()?;
            kek.check()?;
            Ok::<_, cipherbus::kek::KekError>(kek)
        })
        .map_err(|e| e.to_string())?;
        let seed = cipherbus::kek::blocking(|| {
            cipherbus::kek::seed::WrappedSeed::wrap(&*kek, &old, true, &bus.prefix)
        })
        .map_err(|e| e.to_string())?;
        let client = bus.connect().await?;
        if let Some((existing, _)) = cipherbus::kek::seed::read(&client, &bus.prefix)
            .await
            .unwrap_or(None)
        {
            return Err(format!(
                "the deployment has a seed already (fingerprint {}); nothing to migrate",
                existing.fingerprint
            ));
        }
        cipherbus::kek::seed::store(&client, &bus.prefix, &seed, None).await?;
        Ok(seed.fingerprint)
    });
    match done {
        Ok(fingerprint) => {
            println!(
                "the file root (fingerprint {fingerprint}) is now the deployment seed, wrapped under {}; restart the proxies with --kek, then the controller, then run `cipherbus rewrap`",
                uri.describe()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

pub(super) fn keys(args: AuthorityArgs) -> ExitCode {
    use cipherbus::control::message::Body;
    let body = match ask_authority(
        args,
        cipherbus::control::authority::keys_subject,
        Body::KeysRequest {},
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let Body::KeysReply { epochs } = body else {
        eprintln!("cipherbus: the authority answered with something else");
        return ExitCode::FAILURE;
    };
    println!(
        "{:>6}  {:<9}  {:<16}  {:<24}  {:<24}  {:>10}",
        "EPOCH", "STATE", "FINGERPRINT", "CREATED", "ACTIVATED", "SEALED"
    );
    for e in epochs {
        let state = serde_json::to_value(e.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "{:>6}  {:<9}  {:<16}  {:<24}  {:<24}  {:>10}",
            e.epoch,
            state,
            e.fingerprint,
            cipherbus::audit::rfc3339(e.created, 0),
            e.activated
                .map(|t| cipherbus::audit::rfc3339(t, 0))
                .unwrap_or_else(|| "-".into()),
            e.sealed_messages
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    ExitCode::SUCCESS
}

/// The default scope and every `[[scope]]` of a config file, each with the arguments that
/// reach its own authority under its own root.
pub(super) fn every_scope(
    args: &AuthorityArgs,
    file: &Path,
) -> Result<Vec<(&'static str, AuthorityArgs)>, ExitCode> {
    let flags = Overrides {
        upstream: args.upstream.clone(),
        ..Default::default()
    };
    let config = load(Some(file), flags)?;
    let prefix = config.policy.control_prefix().to_owned();
    let mut every = vec![(
        cipherbus::scope::DEFAULT_SCOPE,
        config.kek.clone(),
        prefix.clone(),
    )];
    for scope in &config.scopes {
        every.push((scope.name, scope.kek.clone(), scope.control_prefix(&prefix)));
    }
    Ok(every
        .into_iter()
        .map(|(name, kek, prefix)| {
            let one = AuthorityArgs {
                resolved: Some((kek, prefix)),
                ..args.clone()
            };
            (name, one)
        })
        .collect())
}

/// `keys --config FILE`: the epochs of the default scope and of every `[[scope]]` in the file,
/// each asked of its own authority under its own root.
pub(super) fn keys_of_every_scope(args: AuthorityArgs, file: &Path) -> ExitCode {
    let every = match every_scope(&args, file) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let mut code = ExitCode::SUCCESS;
    for (i, (name, one)) in every.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("scope {name}");
        if keys(one) != ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    code
}

pub(super) fn revoke(epoch: u32, args: AuthorityArgs, reason: String) -> ExitCode {
    use cipherbus::control::message::Body;
    let body = match ask_authority(
        args,
        cipherbus::control::authority::revoke_subject,
        Body::RevokeRequest { epoch, reason },
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match body {
        Body::RevokeReply {
            active,
            error: None,
        } => {
            println!("epoch {epoch} is destroyed everywhere; epoch {active} is active");
            ExitCode::SUCCESS
        }
        Body::RevokeReply { error: Some(e), .. } => {
            eprintln!("cipherbus: revoke failed: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("cipherbus: the authority answered with something else");
            ExitCode::FAILURE
        }
    }
}

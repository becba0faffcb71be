//! The commands that run a process or prepare one: `keygen`, `run` (with `--check-config`),
//! `controller` and `reload`.

use super::*;

pub(super) fn upstream_overrides(a: UpstreamTlsArgs) -> Overrides {
    Overrides {
        upstream_ca: a.upstream_ca,
        upstream_cert: a.upstream_cert,
        upstream_key: a.upstream_key,
        upstream_tls_first: a.upstream_tls_first,
        upstream_server_name: a.upstream_server_name,
        ..Overrides::default()
    }
}

pub(super) fn keygen(kek: Option<String>, out: Option<PathBuf>) -> ExitCode {
    let uri = match (kek, out) {
        (Some(k), _) => match KekUri::parse(&k) {
            Ok(u) => u,
            Err(e) => return fail(&e),
        },
        (None, Some(out)) => KekUri::File(out),
        (None, None) => return fail(&"keygen needs --kek URI (or --out FILE)"),
    };
    if let KekUri::File(out) = &uri {
        return match write_new_kek(out) {
            Ok(key) => {
                println!(
                    "wrote a new root key to {} (fingerprint {})",
                    out.display(),
                    key.fingerprint()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    let made = uri.open_kek().and_then(|kek| {
        kek.create()?;
        kek.check()?;
        Ok(kek)
    });
    match made {
        Ok(kek) => {
            println!(
                "created the root key {} ({}); the first controller started with it creates the deployment seed",
                kek.describe(),
                kek.kind()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Opens the root the config names. An HSM or KMS root is checked, and its deployment seed is
/// read from the bus (created there by a controller, if it has none yet).
pub(super) async fn open_root(config: &Config, create: bool) -> Result<Arc<Root>, String> {
    cipherbus::server::open_root(config, &config.kek, config.policy.control_prefix(), create).await
}

pub(super) fn run(args: RunArgs) -> ExitCode {
    let flags = Overrides {
        listen: args.listen,
        upstream: args.upstream,
        kek: args.kek,
        kek_file: args.kek_file,
        state_dir: args.state_dir,
        admin: args.admin,
        controller: args.controller,
        tls_cert: args.tls.tls_cert,
        tls_key: args.tls.tls_key,
        tls_client_ca: args.tls.tls_client_ca,
        tls_mode: args.tls.tls_mode,
        aead: args.aead,
        ..upstream_overrides(args.upstream_tls)
    };
    let config = match load(args.config.as_deref(), flags.clone()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let config_file = args.config.clone();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if args.check_config {
        return runtime.block_on(check_config(&config));
    }
    raise_fd_limit();
    runtime.block_on(async move {
        let root = match open_root(&config, true).await {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let mut handle = match cipherbus::server::start(config, root).await {
            Ok(h) => h,
            Err(e) => return fail(&e),
        };
        let code = serve(&mut handle, |h| {
            reload_from(h, config_file.as_deref(), &flags)
        })
        .await;
        handle.shutdown().await;
        code
    })
}

/// Runs until SIGTERM or Ctrl-C (success) or until a part the process cannot run without
/// stops (one sentence, exit 2). SIGHUP calls `on_hangup` and goes on: its default action
/// would end the process.
pub(super) async fn serve(
    handle: &mut cipherbus::server::ProxyHandle,
    on_hangup: impl Fn(&cipherbus::server::ProxyHandle),
) -> ExitCode {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait_for_signal() => {
                tracing::info!("shutting down");
                return ExitCode::SUCCESS;
            }
            why = handle.failed() => return fail(&why),
            Some(()) = hup => on_hangup(handle),
        }
    }
}

/// SIGHUP: reads the config file again and applies what can change live (the subject policy,
/// the connection cap, the rotation schedules). A file that does not
/// validate, or that changes what takes a restart, is refused and logged; the running config
/// stays in force.
pub(super) fn reload_from(
    handle: &cipherbus::server::ProxyHandle,
    file: Option<&Path>,
    flags: &Overrides,
) {
    let Some(file) = file else {
        tracing::info!("SIGHUP: no config file to reload (started without --config)");
        return;
    };
    let loaded = FileConfig::load(file).and_then(|f| f.resolve(flags.clone()));
    match loaded {
        Err(e) => {
            handle.reload_invalid();
            tracing::error!(error = %e, "reload refused: the config does not validate; the running one stays in force");
        }
        Ok(config) => match handle.reload(&config) {
            Ok(()) => tracing::info!(file = %file.display(), "reloaded the config"),
            Err(why) => tracing::error!(error = %why, "reload refused"),
        },
    }
}

/// `cipherbus reload --pid PID`: SIGHUP to a running proxy.
pub(super) fn reload(pid: i32) -> ExitCode {
    let Some(target) = rustix::process::Pid::from_raw(pid) else {
        return fail(&format!("--pid {pid} is not a process id"));
    };
    match rustix::process::kill_process(target, rustix::process::Signal::HUP) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot signal process {pid}: {e}")),
    }
}

/// Raises the soft open-file limit to the hard one: each agent costs two descriptors, and the
/// common soft default of 1024 would turn agents away long before `max_connections`.
pub(super) fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// `--check-config`: the config, and every root (the default one and each scope's): a file is
/// read; an HSM or KMS is asked, its key's type and permissions checked with a wrap and unwrap,
/// and the deployment seed unwrapped if there is one yet.
pub(super) async fn check_config(config: &Config) -> ExitCode {
    let ups: Vec<String> = config.upstreams.iter().map(ToString::to_string).collect();
    let root = match check_root(config, &config.kek, config.policy.control_prefix()).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    println!(
        "config ok: listen {}, upstream {}, root {root}, aead {}",
        config.listen,
        ups.join(","),
        config.aead.describe()
    );
    for scope in &config.scopes {
        let prefix = scope.control_prefix(config.policy.control_prefix());
        match check_root(config, &scope.kek, &prefix).await {
            Ok(r) => println!(
                "scope {}: subjects {}, root {r}",
                scope.name,
                scope.subjects.join(" ")
            ),
            Err(e) => return fail(&format!("scope {:?}: {e}", scope.name)),
        }
    }
    ExitCode::SUCCESS
}

/// Proves one root usable, and describes it.
pub(super) async fn check_root(
    config: &Config,
    kek: &KekUri,
    prefix: &str,
) -> Result<String, String> {
    if kek.is_file() {
        let root = cipherbus::server::open_root(config, kek, prefix, false).await?;
        return Ok(format!(
            "{} (fingerprint {})",
            root.describe(),
            root.fingerprint()
        ));
    }
    let uri = kek.clone();
    let kek = cipherbus::kek::blocking(|| {
        let kek = uri.open_kek()?;
        cipherbus::kek::with_retry(cipherbus::kek::seed::START_RETRY, || kek.check())?;
        Ok::<_, cipherbus::kek::KekError>(kek)
    })
    .map_err(|e| e.to_string())?;
    match cipherbus::server::open_root(config, &uri, prefix, false).await {
        Ok(root) => Ok(format!(
            "{} ({}) answers, wraps and unwraps; deployment fingerprint {}",
            root.describe(),
            root.kind(),
            root.fingerprint()
        )),
        Err(e) if e.contains(cipherbus::kek::seed::NO_SEED) => Ok(format!(
            "{} ({}) answers, wraps and unwraps; no deployment seed yet (the first proxy or controller started with it creates one)",
            kek.describe(),
            kek.kind()
        )),
        Err(e) => Err(e),
    }
}

pub(super) fn controller(args: ControllerArgs) -> ExitCode {
    let flags = Overrides {
        listen: None,
        upstream: args.upstream,
        kek: args.kek,
        kek_file: args.kek_file,
        state_dir: args.state_dir,
        admin: args.admin,
        controller: true,
        ..upstream_overrides(args.upstream_tls)
    };
    let config_file = args.config.clone();
    let config = match load(args.config.as_deref(), flags.clone()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let root = match open_root(&config, true).await {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let mut handle = match cipherbus::server::start_controller(config, root).await {
            Ok(h) => h,
            Err(e) => return fail(&e),
        };
        let code = serve(&mut handle, |h| {
            reload_from(h, config_file.as_deref(), &flags)
        })
        .await;
        handle.shutdown().await;
        code
    })
}

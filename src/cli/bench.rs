//! `bench`: the benchmark's flags checked and handed to the harness.

use super::*;

pub(super) fn bench(a: BenchArgs) -> ExitCode {
    let dur = |flag: &str, v: &str| {
        cipherbus::config::parse_duration(v)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                fail(&format!(
                    "{flag} {v:?} is not a valid duration (examples: 3s, 500ms)"
                ))
            })
    };
    let mut sizes = Vec::new();
    for s in &a.sizes {
        match crate::bench::parse_size(s) {
            Some(n) if (16..=64 << 20).contains(&n) => sizes.push(n),
            _ => {
                return fail(&format!(
                    "--sizes: {s:?} is not a size from 16 B to 64 MiB (examples: 128, 1KiB)"
                ))
            }
        }
    }
    if a.pubs == 0 || a.subs == 0 || a.rounds == 0 || a.count == Some(0) {
        return fail(&"--pubs, --subs, --rounds and --count must be at least 1");
    }
    let kek = match a.kek.as_deref().map(KekUri::parse).transpose() {
        Ok(k) => k,
        Err(e) => return fail(&format!("--kek: {e}")),
    };
    let parsed = (|| {
        Ok::<_, ExitCode>((
            dur("--duration", &a.duration)?,
            dur("--latency-duration", &a.latency_duration)?,
            a.rotate_every
                .as_deref()
                .map(|v| dur("--rotate-every", v))
                .transpose()?,
            crate::bench::find_nats_server(a.nats_server).map_err(|e| fail(&e))?,
        ))
    })();
    let (duration, latency_duration, rotate_every, nats_server) = match parsed {
        Ok(x) => x,
        Err(code) => return code,
    };
    raise_fd_limit();
    let params = crate::bench::Params {
        sizes,
        pubs: a.pubs,
        subs: a.subs,
        count: a.count,
        duration,
        rounds: a.rounds,
        rate: a.rate,
        latency_duration,
        paths: a.paths,
        idle_connections: a.idle_connections,
        rotate_every,
        kek,
        nats_server,
        json: a.json,
    };
    match crate::bench::run(params) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::bench::report(&e),
    }
}

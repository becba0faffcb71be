//! `audit verify` and `audit tail`: the audit trail from its file and from its stream on the bus.

use super::*;

pub(super) fn audit_verify(file: Option<PathBuf>, stream: bool, args: AuthorityArgs) -> ExitCode {
    if file.is_none() && !stream {
        return fail(&"audit verify needs a FILE, --stream, or both");
    }
    let bus = match Bus::from_args(args) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let key = cipherbus::audit::AuditKey::from_root(&bus.root);
    let from_file = match &file {
        Some(f) => match cipherbus::audit::verify(f, &key) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("cipherbus: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let from_stream = if stream {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        match rt.block_on(bus.audit_stream()) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("cipherbus: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let stream_name = cipherbus::audit::stream::stream_name(&bus.prefix);
    if let (Some(f), Some(s), Some(path)) = (&from_file, &from_stream, &file) {
        let file_name = path.display().to_string();
        let stream_name = format!("stream {stream_name}");
        if let Some(why) = cipherbus::audit::compare(&file_name, f, &stream_name, s) {
            eprintln!("cipherbus: {why}");
            return ExitCode::FAILURE;
        }
    }
    if let (Some(v), Some(path)) = (&from_file, &file) {
        println!(
            "{}: {} entries, authenticated and chained (deployment {})",
            path.display(),
            v.entries,
            key.deployment()
        );
    }
    if let Some(v) = &from_stream {
        println!(
            "stream {stream_name}: {} entries, authenticated and chained (deployment {})",
            v.entries,
            key.deployment()
        );
    }
    if from_file.is_some() && from_stream.is_some() {
        println!("the file and the stream hold the same entries");
    }
    ExitCode::SUCCESS
}

pub(super) fn audit_tail(from: u64, follow: bool, args: AuthorityArgs) -> ExitCode {
    use futures::StreamExt;
    let bus = match Bus::from_args(args) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result: Result<(), String> = rt.block_on(async {
        let client = bus.connect().await?;
        let stream = cipherbus::audit::stream::AuditStream::existing(&client, &bus.prefix)
            .await
            .map_err(|e| e.to_string())?;
        let key = cipherbus::audit::AuditKey::from_root(&bus.root);
        let name = format!("stream {}", stream.name());
        let mut chain = cipherbus::audit::Chain::new(&key, name);
        // Checked from the first entry, so every printed line is known to follow its chain.
        let existing = stream.lines().await.map_err(|e| e.to_string())?;
        let mut next = 1u64;
        for line in existing {
            chain.check(&line).map_err(|e| e.to_string())?;
            if next >= from {
                println!("{}", String::from_utf8_lossy(&line));
            }
            next += 1;
        }
        if !follow {
            return Ok(());
        }
        let mut live = stream.follow(next).await.map_err(|e| e.to_string())?;
        while let Some(item) = live.next().await {
            let (seq, line) = item.map_err(|e| e.to_string())?;
            if seq != next {
                return Err(format!("expected entry {next}, the stream sent {seq}"));
            }
            chain.check(&line).map_err(|e| e.to_string())?;
            if seq >= from {
                println!("{}", String::from_utf8_lossy(&line));
            }
            next += 1;
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cipherbus: {e}");
            ExitCode::FAILURE
        }
    }
}

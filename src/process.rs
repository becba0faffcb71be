//! Facts about this process and its machine: its id on the control plane, the host name, its
//! descriptor limit.
//!
//! This module owns reading them, and nothing else; it imports no other module of the crate,
//! so every floor above may ask it.

/// The soft "Max open files" limit from `/proc/self/limits`; `None` when unlimited or unknown.
pub fn open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A random id for this process on the control plane.
pub fn node_id(role: &str) -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    format!("{role}-{}", hex::encode(b))
}

/// This machine's host name, for `cipherbus status` (empty where unknown).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max processes             unlimited            unlimited            processes
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
";

    #[test]
    fn the_soft_open_files_limit_is_read() {
        assert_eq!(open_files_limit(LIMITS), Some(1024));
        let unlimited = LIMITS.replace("1024      ", "unlimited ");
        assert_eq!(open_files_limit(&unlimited), None);
        assert_eq!(open_files_limit("nothing here"), None);
    }
}

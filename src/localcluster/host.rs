//! What the cluster takes from the host before any server exists: the
//! PostgreSQL server binaries ([`find_bindir`]) and free TCP ports on
//! 127.0.0.1 ([`free_port`]).

use std::collections::BTreeSet;
use std::env;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use super::ClusterError;

/// Locates the PostgreSQL server binaries: `$PG_BINDIR`, else
/// `pg_config --bindir` if it holds `initdb` (Debian's `/usr/bin/pg_config`
/// points at `/usr/bin`, which only has client wrappers), else the highest
/// version under `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = env::var_os("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::NoBinaries(format!(
                "PG_BINDIR={} has no initdb",
                dir.display()
            )))
        };
    }
    if let Some(dir) = pg_config_bindir().filter(|dir| has_initdb(dir)) {
        return Ok(dir);
    }
    newest_debian_bindir(Path::new("/usr/lib/postgresql")).ok_or_else(|| {
        ClusterError::NoBinaries(
            "set PG_BINDIR, put pg_config on PATH, or install PostgreSQL under \
             /usr/lib/postgresql"
                .to_owned(),
        )
    })
}

fn has_initdb(dir: &Path) -> bool {
    dir.join("initdb").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| PathBuf::from(dir.trim()))
}

/// `<base>/<version>/bin` with the highest version that has `initdb`.
fn newest_debian_bindir(base: &Path) -> Option<PathBuf> {
    fs::read_dir(base)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = parse_version(&entry.file_name().to_string_lossy())?;
            let bindir = entry.path().join("bin");
            has_initdb(&bindir).then_some((version, bindir))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bindir)| bindir)
}

/// `"15"` -> `[15]`, `"9.6"` -> `[9, 6]`; anything else is not a version.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read
/// it, release it). A port is never handed out twice by one process, so
/// nodes started concurrently cannot collide with each other; another
/// process may still grab it before the server binds, which is accepted.
/// Panics if no ephemeral port can be bound at all.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("cannot bind an ephemeral port on 127.0.0.1")
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
        if handed_out.insert(port) {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("main"), None);
        assert!(parse_version("10") > parse_version("9.6"));
    }

    #[test]
    fn free_ports_are_not_reused() {
        let ports: BTreeSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
    }
}

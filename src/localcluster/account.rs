//! The OS identity of the servers. PostgreSQL refuses to run as root, so
//! when this process is root every server binary runs as the `postgres` OS
//! account (created if missing) and every file the servers use is handed to
//! it; otherwise everything runs as the current user. This module finds or
//! creates that account and builds the commands and files that belong to it.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::error::{io_err, read_file};
use super::exec::run;
use super::{ClusterError, LocalCluster};

/// OS account that runs the servers when this process is root.
pub(super) const OS_USER: &str = "postgres";

/// An OS account, by numeric ids.
#[derive(Debug, Clone, Copy)]
pub(super) struct OsAccount {
    uid: u32,
    gid: u32,
}

/// The account servers must run as: `None` (ourselves) unless we are root,
/// in which case the `postgres` account, created if it does not exist.
pub(super) fn server_account() -> Result<Option<OsAccount>, ClusterError> {
    if effective_uid()? != 0 {
        return Ok(None);
    }
    if let Some(account) = lookup_account(OS_USER)? {
        return Ok(Some(account));
    }
    // Another process may create it concurrently, so judge by the lookup
    // afterwards rather than by useradd's exit status.
    let added = run(Command::new("useradd").args(["--system", "--no-create-home", OS_USER]));
    match (lookup_account(OS_USER)?, added) {
        (Some(account), _) => Ok(Some(account)),
        (None, Err(err)) => Err(ClusterError::OsUser(err.to_string())),
        (None, Ok(_)) => Err(ClusterError::OsUser("useradd did not create it".to_owned())),
    }
}

/// Effective uid, from `/proc/self/status` (avoids a libc dependency).
fn effective_uid() -> Result<u32, ClusterError> {
    let status = read_file(Path::new("/proc/self/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| ClusterError::OsUser("no Uid line in /proc/self/status".to_owned()))
}

/// Uid and gid of `name` from `/etc/passwd`.
fn lookup_account(name: &str) -> Result<Option<OsAccount>, ClusterError> {
    let passwd = read_file(Path::new("/etc/passwd"))?;
    Ok(passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [user, _, uid, gid, ..] if *user == name => Some(OsAccount {
                uid: uid.parse().ok()?,
                gid: gid.parse().ok()?,
            }),
            _ => None,
        }
    }))
}

impl LocalCluster {
    /// A command running as the servers' account, in the cluster directory
    /// (the caller's cwd may be unreadable to that account), with a
    /// predictable environment: no `PG*` variables leaking connection
    /// settings from the caller, the C locale, and a HOME it can use.
    pub(super) fn owned_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("HOME", &self.root)
            .env("LC_ALL", "C")
            .current_dir(&self.root);
        if let Some(owner) = self.owner {
            cmd.uid(owner.uid).gid(owner.gid);
        }
        cmd
    }

    /// Writes a file and hands it to the servers' account, which must be
    /// able to read, rewrite (`pg_rewind`) or delete it.
    pub(super) fn write_owned(&self, path: &Path, contents: &str) -> Result<(), ClusterError> {
        fs::write(path, contents).map_err(io_err(format!("cannot write {}", path.display())))?;
        self.give_to_owner(path)
    }

    /// Hands `path` to the servers' account (a no-op when they run as the
    /// current user).
    pub(super) fn give_to_owner(&self, path: &Path) -> Result<(), ClusterError> {
        match self.owner {
            Some(owner) => chown(path, Some(owner.uid), Some(owner.gid))
                .map_err(io_err(format!("cannot chown {}", path.display()))),
            None => Ok(()),
        }
    }
}

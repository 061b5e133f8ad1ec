//! The reaper: a child process that stops the servers and removes the
//! cluster directory once this process is gone, however it ends. It covers
//! what [`LocalCluster::shutdown`] (run by `Drop`) cannot: a test process
//! that aborts, is killed, or keeps its cluster in a `static` that is never
//! dropped.

use std::os::unix::process::CommandExt;
use std::process::Stdio;

use tracing::warn;

use super::exec::describe;
use super::{ClusterError, LocalCluster};

/// Run by a `sh` child whose stdin is a pipe that only this process writes
/// to. `cat` returns once that pipe is closed, which the kernel does when
/// this process exits for any reason (including `abort()` and SIGKILL); the
/// script then stops every data directory under the root (a glob, so nodes
/// added after arming are covered too) and removes the root.
/// Arguments: `$1` = path of `pg_ctl`, `$2` = root directory.
const REAPER_SCRIPT: &str = r#"
cat >/dev/null
for d in "$2"/pg*/; do
  "$1" status -D "$d" >/dev/null 2>&1 && "$1" stop -D "$d" -m immediate -w -t 30 >/dev/null 2>&1
done
rm -rf "$2"
"#;

impl LocalCluster {
    /// Makes sure no server outlives this process, even if it aborts, is
    /// killed, or never drops the cluster (e.g. a `static` shared by tests).
    ///
    /// Spawns a `sh` reaper in its own process group (so a terminal's Ctrl-C
    /// doesn't kill it before it has cleaned up) whose stdin is a pipe held
    /// open by this process only. When the pipe closes the reaper stops every
    /// `pgN` data directory under [`LocalCluster::dir`] and removes it.
    /// [`LocalCluster::start`] already calls this; calling it again is a
    /// no-op.
    pub fn arm_reaper(&mut self) -> Result<(), ClusterError> {
        if self.reaper.is_some() {
            return Ok(());
        }
        let mut cmd = self.owned_command("sh");
        cmd.arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("pgpivot-cluster-reaper")
            .arg(self.bindir.join("pg_ctl"))
            .arg(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd.spawn().map_err(|error| ClusterError::Spawn {
            command: describe(&cmd),
            error,
        })?;
        self.reaper = Some(child);
        Ok(())
    }

    /// Lets the reaper run (there is nothing left for it to do after a clean
    /// shutdown) and collects it so it doesn't linger as a zombie.
    pub(super) fn disarm_reaper(&mut self) {
        if let Some(mut reaper) = self.reaper.take() {
            drop(reaper.stdin.take());
            if let Err(err) = reaper.wait() {
                warn!(%err, "cannot wait for the cluster reaper");
            }
        }
    }
}

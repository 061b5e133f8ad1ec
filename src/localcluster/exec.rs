//! Blocking building blocks of every cluster operation: running a helper
//! program to completion (its failure becomes a [`ClusterError`] quoting its
//! output) and polling until a condition holds.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tracing::debug;

use super::ClusterError;

/// Pause between two polls while waiting for a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Ok(true)` or
/// `timeout` passes. Errors (e.g. a server still starting) are retried; the
/// last one is reported on timeout.
pub(super) fn poll_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool, ClusterError>,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(err) => Some(err.to_string()),
        };
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout {
                what: what.to_owned(),
                timeout,
                last_error,
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Runs `cmd` to completion; returns its stdout, or an error carrying its
/// stderr (or stdout, where e.g. `pg_ctl` reports some failures).
pub(super) fn run(cmd: &mut Command) -> Result<String, ClusterError> {
    let command = describe(cmd);
    debug!(%command, "running");
    let out = cmd.output().map_err(|error| ClusterError::Spawn {
        command: command.clone(),
        error,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let output = if stderr.trim().is_empty() {
        stdout.trim()
    } else {
        stderr.trim()
    };
    Err(ClusterError::CommandFailed {
        command,
        status: out.status,
        output: output.to_owned(),
    })
}

/// `program arg1 arg2 ...` for error messages (the program without its
/// directory, which is noise).
pub(super) fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_message_mentions_last_error() {
        let err = poll_until("nothing", Duration::from_millis(1), || {
            Err(ClusterError::Invalid("boom".into()))
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "timed out after 1ms waiting for nothing (last error: invalid request: boom)"
        );
    }
}

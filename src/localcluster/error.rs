//! [`ClusterError`], and the small helpers that build one from an I/O
//! failure or quote a file in it.

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use thiserror::Error;

use super::account::OS_USER;

/// Why a cluster operation failed. Messages carry the captured stderr of the
/// failing command (and, for servers that did not start, their log tail).
///
/// Each message is whole, cause included, so no variant also exposes its
/// cause as a `source`: printed as an error chain (`{:#}`, as `pgpivot demo`
/// does) it would appear twice.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// [`find_bindir`](super::find_bindir) found no directory with `initdb`.
    #[error("no PostgreSQL server binaries found: {0}")]
    NoBinaries(String),
    /// Running as root, but the `postgres` account is missing and could
    /// not be created.
    #[error("cannot run servers as the `{OS_USER}` OS user: {0}")]
    OsUser(String),
    /// A file system operation failed.
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
    /// A program could not be started at all.
    #[error("cannot run `{command}`: {error}")]
    Spawn { command: String, error: io::Error },
    /// A program exited unsuccessfully; `output` is its stderr (or stdout).
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        output: String,
    },
    /// A server did not start or did not stream; `log_tail` usually says
    /// why.
    #[error("{node} failed to {action}: {cause}\n--- last lines of its log ---\n{log_tail}")]
    Server {
        node: String,
        action: &'static str,
        cause: Box<ClusterError>,
        log_tail: String,
    },
    /// A condition polled for did not hold before the deadline.
    #[error(
        "timed out after {timeout:?} waiting for {what}{}",
        last_error_suffix(.last_error.as_deref())
    )]
    Timeout {
        what: String,
        timeout: Duration,
        last_error: Option<String>,
    },
    /// A node index out of range.
    #[error("no node {index} (the cluster has {count})")]
    NoSuchNode { index: usize, count: usize },
    /// A request that makes no sense, e.g. a node replicating from itself.
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// The tail of a [`ClusterError::Timeout`] message: the last error seen
/// while polling, if any.
fn last_error_suffix(last_error: Option<&str>) -> String {
    match last_error {
        Some(err) => format!(" (last error: {err})"),
        None => String::new(),
    }
}

/// Shorthand to wrap an `io::Error` with what was being done.
pub(super) fn io_err(context: impl fmt::Display) -> impl FnOnce(io::Error) -> ClusterError {
    move |error| ClusterError::Io {
        context: context.to_string(),
        error,
    }
}

/// `fs::read_to_string`, with the path in the error.
pub(super) fn read_file(path: &Path) -> Result<String, ClusterError> {
    fs::read_to_string(path).map_err(io_err(format!("cannot read {}", path.display())))
}

/// Last `lines` lines of a file, or a note saying why there are none; used
/// to quote a server's log in [`ClusterError::Server`].
pub(super) fn tail_of_file(path: &Path, lines: usize) -> String {
    match fs::File::open(path) {
        Ok(file) => {
            let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

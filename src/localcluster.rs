//! A real PostgreSQL streaming-replication cluster on localhost, for tests,
//! benches and the demo.
//!
//! [`LocalCluster::start`] runs the installed server binaries (`initdb`,
//! `pg_ctl`, `pg_basebackup`, `pg_rewind`) to build one primary plus N hot
//! standbys inside a fresh temporary directory, and then lets the caller
//! drive failovers: stop or crash a node, promote a standby, rejoin the old
//! primary with `pg_rewind`, or clone more standbys. A mocked backend can't
//! reproduce what a failover-aware proxy must cope with (timeline switches,
//! `pg_is_in_recovery()` flips, connections dying mid-query), so this module
//! owns the whole lifecycle of real servers:
//!
//! * **The temporary directory** (`pgpivot-cluster-*`): one data directory
//!   `pgN` and one log `pgN.log` per node. It is removed on shutdown.
//! * **The server processes**: stopped by [`LocalCluster::shutdown`] (also run
//!   by `Drop`) and, because a test process may abort or be killed, or keep
//!   its cluster in a `static` that is never dropped, by a *reaper* child
//!   process that notices when this process is gone (see
//!   [`LocalCluster::arm_reaper`]).
//! * **The OS identity**: PostgreSQL refuses to run as root, so when the
//!   current process is root every server binary runs as the `postgres` OS
//!   account (created if missing) and the directory is owned by it.
//!
//! The API is blocking (`std::process`) on purpose: it is used from plain
//! `#[test]`s, benches and `main`s alike, and from async code it can run in
//! `spawn_blocking`.
//!
//! All servers listen on `127.0.0.1` only, with no unix socket (which avoids
//! needing a writable `/var/run/postgresql`). Every client (psql,
//! `pg_basebackup`, walreceivers) therefore authenticates over TCP with
//! [`SUPERUSER`] / [`PASSWORD`].

use std::collections::BTreeSet;
use std::env;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::panic;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use thiserror::Error;
use tracing::{debug, info, warn};

/// Database superuser of every cluster (also used for replication).
pub const SUPERUSER: &str = "postgres";
/// Password of [`SUPERUSER`] and of the test roles below.
pub const PASSWORD: &str = "postgres";
/// Role whose password is stored as MD5 and that `pg_hba.conf` authenticates
/// with the `md5` method.
pub const MD5_USER: &str = "md5user";
/// Role that `pg_hba.conf` authenticates with the `password` method
/// (cleartext password over the wire).
pub const CLEARTEXT_USER: &str = "pwuser";
/// Ordinary application role, authenticated with SCRAM-SHA-256.
pub const APP_USER: &str = "app";

/// Deadline for a server to start and for a standby to begin streaming.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two polls while waiting for a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// OS account that runs the servers when this process is root.
const OS_USER: &str = "postgres";
/// How many lines of a server log an error message quotes.
const LOG_TAIL_LINES: usize = 40;

/// Everything above this line of `postgresql.conf` is shared by all nodes;
/// everything below it belongs to one node. Clones (`pg_basebackup`, `pg_rewind`)
/// copy the source's file, so the part below is rewritten after each clone.
const NODE_CONF_MARKER: &str = "# --- pgpivot localcluster: per-node settings ---";

/// Settings shared by every node; written to the primary before any standby
/// is cloned from it. `wal_log_hints` is what makes `pg_rewind` possible.
const COMMON_CONF: &str = "
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_log_hints = on
full_page_writes = on
fsync = off
max_connections = 200
shared_buffers = 64MB
logging_collector = off
log_min_messages = warning
";

/// Replaces the `pg_hba.conf` written by initdb. The `local` line is inert
/// (there is no unix socket) but keeps single-user tools working.
const PG_HBA_CONF: &str = "\
local all all trust
host all md5user 127.0.0.1/32 md5
host all pwuser 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
";

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

/// Why a cluster operation failed. Messages carry the captured stderr of the
/// failing command (and, for servers that did not start, their log tail).
#[derive(Debug, Error)]
pub enum ClusterError {
    /// [`find_bindir`] found no directory with `initdb`.
    #[error("no PostgreSQL server binaries found: {0}")]
    NoBinaries(String),
    /// Running as root, but the `postgres` account is missing and could
    /// not be created.
    #[error("cannot run servers as the `{OS_USER}` OS user: {0}")]
    OsUser(String),
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A program could not be started at all.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
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
        #[source]
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

fn last_error_suffix(last_error: Option<&str>) -> String {
    match last_error {
        Some(err) => format!(" (last error: {err})"),
        None => String::new(),
    }
}

/// Shorthand to wrap an `io::Error` with what was being done.
fn io_err(context: impl fmt::Display) -> impl FnOnce(io::Error) -> ClusterError {
    move |source| ClusterError::Io {
        context: context.to_string(),
        source,
    }
}

/// How [`LocalCluster::start`] shapes the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of hot standbys cloned from the primary.
    pub standbys: usize,
    /// Lines appended to the primary's `postgresql.conf` before the standbys
    /// are cloned, so they apply to every node.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            standbys: 2,
            extra_conf: Vec::new(),
        }
    }
}

/// How [`LocalCluster::stop_node`] stops a server (`pg_ctl stop -m ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, exit cleanly.
    Fast,
    /// Exit at once without a checkpoint, like a crash.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// One server of a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// `pg1` for the initial primary, then `pg2`, `pg3`, ...; also the
    /// server's `cluster_name` and its walreceiver's `application_name`.
    pub name: String,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// `<dir>/<name>`.
    pub data_dir: PathBuf,
}

impl LocalNode {
    /// `127.0.0.1:port`.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// libpq / tokio-postgres connection string for [`SUPERUSER`].
    pub fn conn_string(&self) -> String {
        self.conn_string_as(SUPERUSER)
    }

    /// libpq / tokio-postgres connection string for `user`, whose password
    /// is assumed to be [`PASSWORD`] (true of every role created here).
    pub fn conn_string_as(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={PASSWORD} dbname=postgres",
            self.port
        )
    }
}

/// A primary and its standbys, running from a private temporary directory.
/// Dropping it stops every server and removes the directory.
pub struct LocalCluster {
    bindir: PathBuf,
    /// Account the servers run as; `None` means the current user.
    owner: Option<OsAccount>,
    root: PathBuf,
    /// `None` once [`LocalCluster::shutdown`] has run.
    tempdir: Option<TempDir>,
    nodes: Vec<LocalNode>,
    reaper: Option<Child>,
}

impl fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCluster")
            .field("root", &self.root)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// Initializes and starts the primary (node 0), creates the test roles,
    /// clones `opts.standbys` standbys with `pg_basebackup`, starts them and
    /// waits (up to 60 s each) until the primary's `pg_stat_replication`
    /// shows each one streaming. The reaper is armed before any server
    /// starts. On error everything started so far is torn down.
    pub fn start(opts: ClusterOptions) -> Result<LocalCluster, ClusterError> {
        let began = Instant::now();
        let bindir = find_bindir()?;
        let owner = server_account()?;
        let tempdir = tempfile::Builder::new()
            .prefix("pgpivot-cluster-")
            .tempdir()
            .map_err(io_err("cannot create the cluster directory"))?;
        let mut cluster = LocalCluster {
            bindir,
            owner,
            root: tempdir.path().to_path_buf(),
            tempdir: Some(tempdir),
            nodes: Vec::new(),
            reaper: None,
        };
        cluster.give_to_owner(&cluster.root)?;
        cluster.arm_reaper()?;
        cluster.init_primary(&opts.extra_conf)?;
        cluster.add_standbys(opts.standbys, 0)?;
        info!(
            dir = %cluster.root.display(),
            nodes = cluster.nodes.len(),
            elapsed = ?began.elapsed(),
            "local PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// All nodes; index 0 is the initial primary, 1.. the standbys in the
    /// order they were added.
    pub fn nodes(&self) -> &[LocalNode] {
        &self.nodes
    }

    /// Node `i`. Panics if there is no such node.
    pub fn node(&self, i: usize) -> &LocalNode {
        &self.nodes[i]
    }

    /// Root temporary directory holding every data directory and log.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Directory of the PostgreSQL binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Server log of node `i` (`<dir>/pgN.log`).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.root.join(format!("{}.log", self.node(i).name))
    }

    /// `pg_ctl stop -m fast|immediate -w`. Fails if the node is not running.
    pub fn stop_node(&self, i: usize, mode: StopMode) -> Result<(), ClusterError> {
        let node = self.checked_node(i)?;
        run(self
            .pg_ctl(node)
            .args(["-m", mode.as_arg(), "-w", "-t", "60", "stop"]))?;
        debug!(node = %node.name, ?mode, "stopped");
        Ok(())
    }

    /// `pg_ctl start -w` with the node's existing configuration. On failure
    /// the error includes the tail of the node's log.
    pub fn start_node(&self, i: usize) -> Result<(), ClusterError> {
        let node = self.checked_node(i)?;
        let mut cmd = self.pg_ctl(node);
        cmd.arg("-l")
            .arg(self.log_path(i))
            .args(["-w", "-t", "60", "start"]);
        run(&mut cmd).map_err(|cause| self.server_error(i, "start", cause))?;
        debug!(node = %node.name, port = node.port, "started");
        Ok(())
    }

    /// Whether node `i`'s postmaster is alive (`pg_ctl status`); a stale
    /// `postmaster.pid` left by a killed server counts as not running.
    pub fn is_running(&self, i: usize) -> Result<bool, ClusterError> {
        let node = self.checked_node(i)?;
        let mut cmd = self.pg_ctl(node);
        cmd.arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = cmd.status().map_err(|source| ClusterError::Spawn {
            command: describe(&cmd),
            source,
        })?;
        // 0 = running, 3 = not running, 4 = no usable data directory.
        Ok(status.success())
    }

    /// `pg_ctl promote -w`: node `i` leaves recovery and becomes a primary.
    pub fn promote(&self, i: usize) -> Result<(), ClusterError> {
        let node = self.checked_node(i)?;
        run(self.pg_ctl(node).args(["-w", "-t", "60", "promote"]))?;
        info!(node = %node.name, "promoted");
        Ok(())
    }

    /// Turns node `i` into a streaming standby of node `primary`: stops it
    /// (fast) if it runs, rewinds it with `pg_rewind` (falling back to a
    /// fresh `pg_basebackup` if that fails), points it at `primary`, starts
    /// it and waits until it streams.
    pub fn rejoin_as_standby(&self, i: usize, primary: usize) -> Result<(), ClusterError> {
        self.check_pair(i, primary)?;
        if self.is_running(i)? {
            self.stop_node(i, StopMode::Fast)?;
        }
        if let Err(err) = self.rewind(i, primary) {
            let node = &self.node(i).name;
            warn!(%node, %err, "pg_rewind failed; re-cloning with pg_basebackup");
            self.reclone(i, primary)?;
        }
        self.configure_node(i, Some(primary))?;
        self.start_node(i)?;
        self.wait_streaming(i, primary, READY_TIMEOUT)?;
        let (node, primary) = (&self.node(i).name, &self.node(primary).name);
        info!(%node, %primary, "rejoined as standby");
        Ok(())
    }

    /// Clones a new standby from node `primary` (which may itself be a
    /// standby), starts it and waits until it streams. Returns its index.
    pub fn add_standby(&mut self, primary: usize) -> Result<usize, ClusterError> {
        Ok(self.add_standbys(1, primary)?[0])
    }

    /// Like [`LocalCluster::add_standby`] for `count` standbys at once, whose
    /// base backups (the slow part) run concurrently. Returns their indexes.
    /// On error none of them is kept.
    pub fn add_standbys(
        &mut self,
        count: usize,
        primary: usize,
    ) -> Result<Vec<usize>, ClusterError> {
        self.checked_node(primary)?;
        let first = self.nodes.len();
        let new: Vec<usize> = (0..count).map(|_| self.push_node()).collect();
        if let Err(err) = self.bring_up_standbys(&new, primary) {
            // Don't leave half-built nodes behind for later calls to trip
            // over; the error already quotes the relevant log.
            self.discard_nodes_from(first);
            return Err(err);
        }
        Ok(new)
    }

    /// Runs `sql` on node `i` as [`SUPERUSER`] and returns psql's trimmed,
    /// unaligned, tuples-only output.
    pub fn psql(&self, i: usize, sql: &str) -> Result<String, ClusterError> {
        self.psql_as(i, SUPERUSER, sql)
    }

    /// Like [`LocalCluster::psql`] but logs in as `user` with [`PASSWORD`]
    /// over TCP, so it exercises that role's `pg_hba.conf` auth method.
    pub fn psql_as(&self, i: usize, user: &str, sql: &str) -> Result<String, ClusterError> {
        let node = self.checked_node(i)?;
        let mut cmd = self.command("psql");
        cmd.args(["-XAtqw", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &node.port.to_string(), "-U", user, "-d", "postgres"])
            .args(["-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10");
        Ok(run(&mut cmd)?.trim().to_owned())
    }

    /// Waits until node `i` answers and `pg_is_in_recovery()` equals
    /// `in_recovery`.
    pub fn wait_role(
        &self,
        i: usize,
        in_recovery: bool,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let node = self.checked_node(i)?;
        let role = if in_recovery { "standby" } else { "primary" };
        let expected = if in_recovery { "t" } else { "f" };
        poll_until(&format!("{} to be a {role}", node.name), timeout, || {
            Ok(self.psql(i, "SELECT pg_is_in_recovery()")? == expected)
        })
    }

    /// Waits until node `primary`'s `pg_stat_replication` shows node
    /// `standby` (by `application_name`) in state `streaming`.
    pub fn wait_streaming(
        &self,
        standby: usize,
        primary: usize,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        self.check_pair(standby, primary)?;
        let (name, upstream) = (&self.node(standby).name, &self.node(primary).name);
        let sql = format!(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = '{name}' AND state = 'streaming'"
        );
        poll_until(
            &format!("{name} to stream from {upstream}"),
            timeout,
            || Ok(self.psql(primary, &sql)? == "1"),
        )
        .map_err(|cause| self.server_error(standby, "stream", cause))
    }

    /// A `Command` for the binary `binary` of [`LocalCluster::bindir`] (e.g.
    /// `pg_ctl`, `pgbench`; an absolute path runs that program instead),
    /// running as the servers' OS account, in the cluster directory, with
    /// stdin closed and no inherited `PG*` environment variables (set
    /// `PGPASSWORD` yourself: servers only accept TCP logins).
    pub fn command(&self, binary: &str) -> Command {
        let mut cmd = self.owned_command(self.bindir.join(binary));
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Stops every server (`pg_ctl stop -m immediate`) and removes the
    /// directory. Idempotent, never fails (problems are logged); also run by
    /// `Drop`.
    pub fn shutdown(&mut self) {
        let Some(tempdir) = self.tempdir.take() else {
            return;
        };
        // In parallel: each `pg_ctl stop -w` spends most of its ~100 ms
        // sleeping between polls.
        let this = &*self;
        thread::scope(|scope| {
            for i in 0..this.nodes.len() {
                scope.spawn(move || this.kill_node(i));
            }
        });
        if let Err(err) = tempdir.close() {
            warn!(dir = %self.root.display(), %err, "cannot remove cluster directory");
        }
        self.disarm_reaper();
    }

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
        let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            command: describe(&cmd),
            source,
        })?;
        self.reaper = Some(child);
        Ok(())
    }

    /// Lets the reaper run (there is nothing left for it to do after a clean
    /// shutdown) and collects it so it doesn't linger as a zombie.
    fn disarm_reaper(&mut self) {
        if let Some(mut reaper) = self.reaper.take() {
            drop(reaper.stdin.take());
            if let Err(err) = reaper.wait() {
                warn!(%err, "cannot wait for the cluster reaper");
            }
        }
    }

    /// initdb + configuration + start + roles for node 0.
    fn init_primary(&mut self, extra_conf: &[String]) -> Result<(), ClusterError> {
        let i = self.push_node();
        let data_dir = self.nodes[i].data_dir.clone();
        let pwfile = self.root.join("pwfile");
        self.write_owned(&pwfile, PASSWORD)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--no-locale"])
            // Small WAL segments keep clones and the directory small (about
            // 25 MB a node instead of 80); --no-sync because nothing here
            // needs to survive a power cut, and fsyncs dominate start time
            // on a busy disk.
            .args(["--wal-segsize=1", "--no-sync"]);
        run(&mut initdb)?;
        fs::remove_file(&pwfile).map_err(io_err("cannot remove the password file"))?;

        let mut conf = read_file(&data_dir.join("postgresql.conf"))?;
        conf.push_str(COMMON_CONF);
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        self.write_owned(&data_dir.join("postgresql.conf"), &conf)?;
        self.write_owned(&data_dir.join("pg_hba.conf"), PG_HBA_CONF)?;
        self.configure_node(i, None)?;
        self.start_node(i)?;
        self.create_roles(i)
    }

    fn create_roles(&self, i: usize) -> Result<(), ClusterError> {
        let sql = format!(
            "SET password_encryption = 'md5';
             CREATE ROLE {MD5_USER} LOGIN PASSWORD '{PASSWORD}';
             RESET password_encryption;
             CREATE ROLE {CLEARTEXT_USER} LOGIN PASSWORD '{PASSWORD}';
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{PASSWORD}';
             GRANT ALL ON SCHEMA public TO PUBLIC;"
        );
        self.psql(i, &sql).map(drop)
    }

    /// Registers a new node with a fresh name, port and (not yet existing)
    /// data directory. Registering it before creating anything means a
    /// failure half-way is still cleaned up by `shutdown`.
    fn push_node(&mut self) -> usize {
        let name = format!("pg{}", self.nodes.len() + 1);
        self.nodes.push(LocalNode {
            data_dir: self.root.join(&name),
            name,
            port: free_port(),
        });
        self.nodes.len() - 1
    }

    /// Clones, starts and waits for the registered but not yet created
    /// standbys `new` of node `primary`.
    fn bring_up_standbys(&self, new: &[usize], primary: usize) -> Result<(), ClusterError> {
        thread::scope(|scope| {
            let backups: Vec<_> = new
                .iter()
                .map(|&i| scope.spawn(move || self.base_backup(i, primary)))
                .collect();
            // Scoped threads are all joined when the scope ends, even if
            // an early error stops this loop.
            backups.into_iter().try_for_each(|backup| {
                backup
                    .join()
                    .unwrap_or_else(|panic| panic::resume_unwind(panic))
            })
        })?;
        for &i in new {
            self.configure_node(i, Some(primary))?;
            self.start_node(i)?;
        }
        new.iter()
            .try_for_each(|&i| self.wait_streaming(i, primary, READY_TIMEOUT))
    }

    /// Best-effort immediate stop of node `i` if it runs; failures are
    /// logged, as there is nothing better to do during cleanup.
    fn kill_node(&self, i: usize) {
        if matches!(self.is_running(i), Ok(true)) {
            if let Err(err) = self.stop_node(i, StopMode::Immediate) {
                warn!(node = %self.nodes[i].name, %err, "cannot stop server");
            }
        }
    }

    /// Stops (if needed) and forgets nodes `first..`, best effort.
    fn discard_nodes_from(&mut self, first: usize) {
        for i in (first..self.nodes.len()).rev() {
            self.kill_node(i);
            let _ = fs::remove_dir_all(&self.nodes[i].data_dir);
        }
        self.nodes.truncate(first);
    }

    /// Clones node `source` into node `i`'s (absent) data directory.
    fn base_backup(&self, i: usize, source: usize) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_basebackup");
        cmd.args(["-h", "127.0.0.1", "-p", &self.node(source).port.to_string()])
            .args(["-U", SUPERUSER, "-w", "-D"])
            .arg(&self.node(i).data_dir)
            .args(["-R", "-X", "stream", "-c", "fast"])
            // Throwaway clones: skip fsyncs and the checksummed manifest.
            .args(["--no-sync", "--no-manifest"])
            .env("PGPASSWORD", PASSWORD);
        run(&mut cmd).map(drop)
    }

    /// Rewinds stopped node `i` onto node `source`'s timeline. `pg_rewind`
    /// crash-recovers a target that was not shut down cleanly by itself.
    fn rewind(&self, i: usize, source: usize) -> Result<(), ClusterError> {
        // A just-promoted source finishes its end-of-recovery checkpoint in
        // the background; until then its pg_control still names the old
        // timeline and pg_rewind (before PG 16) wrongly concludes "no rewind
        // required", leaving a target that can never follow the source.
        self.psql(source, "CHECKPOINT")?;
        let mut cmd = self.command("pg_rewind");
        cmd.arg("--no-sync")
            .arg("--target-pgdata")
            .arg(&self.node(i).data_dir)
            .arg(format!(
                "--source-server=host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
                self.node(source).port
            ))
            .env("PGPASSWORD", PASSWORD);
        run(&mut cmd).map(drop)
    }

    /// Throws node `i`'s data away and clones it again from `source`.
    fn reclone(&self, i: usize, source: usize) -> Result<(), ClusterError> {
        let data_dir = &self.node(i).data_dir;
        if data_dir.exists() {
            fs::remove_dir_all(data_dir)
                .map_err(io_err(format!("cannot remove {}", data_dir.display())))?;
        }
        self.base_backup(i, source)
    }

    /// Writes node `i`'s own settings after its data directory was created
    /// or cloned (clones carry the source's port and `primary_conninfo`):
    /// its port and name, and either "standby of `upstream`" or "primary".
    fn configure_node(&self, i: usize, upstream: Option<usize>) -> Result<(), ClusterError> {
        let node = self.node(i);
        let conf_path = node.data_dir.join("postgresql.conf");
        let conf = read_file(&conf_path)?;
        let shared = conf.split(NODE_CONF_MARKER).next().unwrap_or_default();
        let conf = format!(
            "{}\n{NODE_CONF_MARKER}\nport = {}\ncluster_name = '{}'\n",
            shared.trim_end(),
            node.port,
            node.name
        );
        self.write_owned(&conf_path, &conf)?;
        self.write_recovery_settings(node, upstream)
    }

    /// Sets (or, for a primary, removes) `standby.signal` and our own
    /// `primary_conninfo`, which names the standby so `pg_stat_replication`
    /// on the upstream can be matched to it. It lives in
    /// `postgresql.auto.conf`, where `pg_basebackup -R` puts it too.
    fn write_recovery_settings(
        &self,
        node: &LocalNode,
        upstream: Option<usize>,
    ) -> Result<(), ClusterError> {
        let auto_path = node.data_dir.join("postgresql.auto.conf");
        let mut lines: Vec<String> = read_file(&auto_path)?
            .lines()
            .filter(|line| !line.trim_start().starts_with("primary_conninfo"))
            .map(str::to_owned)
            .collect();
        let signal = node.data_dir.join("standby.signal");
        match upstream {
            Some(p) => {
                lines.push(format!(
                    "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} \
                     password={PASSWORD} application_name={}'",
                    self.node(p).port,
                    node.name
                ));
                self.write_owned(&signal, "")?;
            }
            None if signal.exists() => {
                fs::remove_file(&signal).map_err(io_err("cannot remove standby.signal"))?;
            }
            None => {}
        }
        let auto = lines.join("\n") + "\n";
        self.write_owned(&auto_path, &auto)
    }

    /// `pg_ctl -D <node's data dir>`, to be completed with an action.
    fn pg_ctl(&self, node: &LocalNode) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&node.data_dir);
        cmd
    }

    /// A command running as the servers' account, in the cluster directory
    /// (the caller's cwd may be unreadable to that account), with a
    /// predictable environment: no `PG*` variables leaking connection
    /// settings from the caller, the C locale, and a HOME it can use.
    fn owned_command(&self, program: impl AsRef<OsStr>) -> Command {
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
    fn write_owned(&self, path: &Path, contents: &str) -> Result<(), ClusterError> {
        fs::write(path, contents).map_err(io_err(format!("cannot write {}", path.display())))?;
        self.give_to_owner(path)
    }

    fn give_to_owner(&self, path: &Path) -> Result<(), ClusterError> {
        match self.owner {
            Some(owner) => chown(path, Some(owner.uid), Some(owner.gid))
                .map_err(io_err(format!("cannot chown {}", path.display()))),
            None => Ok(()),
        }
    }

    /// Wraps a failure of node `i` with the tail of its log, which usually
    /// says why.
    fn server_error(&self, i: usize, action: &'static str, cause: ClusterError) -> ClusterError {
        let log = self.log_path(i);
        ClusterError::Server {
            node: self.node(i).name.clone(),
            action,
            cause: Box::new(cause),
            log_tail: tail_of_file(&log, LOG_TAIL_LINES),
        }
    }

    fn checked_node(&self, i: usize) -> Result<&LocalNode, ClusterError> {
        self.nodes.get(i).ok_or(ClusterError::NoSuchNode {
            index: i,
            count: self.nodes.len(),
        })
    }

    /// Validates a (standby, primary) pair of distinct existing nodes.
    fn check_pair(&self, standby: usize, primary: usize) -> Result<(), ClusterError> {
        self.checked_node(standby)?;
        self.checked_node(primary)?;
        if standby == primary {
            return Err(ClusterError::Invalid(format!(
                "node {standby} cannot replicate from itself"
            )));
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

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

/// "15" -> [15], "9.6" -> [9, 6]; anything else is not a version.
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

/// An OS account, by numeric ids.
#[derive(Debug, Clone, Copy)]
struct OsAccount {
    uid: u32,
    gid: u32,
}

/// The account servers must run as: `None` (ourselves) unless we are root,
/// in which case the `postgres` account, created if it does not exist.
fn server_account() -> Result<Option<OsAccount>, ClusterError> {
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

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Ok(true)` or
/// `timeout` passes. Errors (e.g. a server still starting) are retried; the
/// last one is reported on timeout.
fn poll_until(
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
fn run(cmd: &mut Command) -> Result<String, ClusterError> {
    let command = describe(cmd);
    debug!(%command, "running");
    let out = cmd.output().map_err(|source| ClusterError::Spawn {
        command: command.clone(),
        source,
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
fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn read_file(path: &Path) -> Result<String, ClusterError> {
    fs::read_to_string(path).map_err(io_err(format!("cannot read {}", path.display())))
}

/// Last `lines` lines of a file, or a note saying why there are none.
fn tail_of_file(path: &Path, lines: usize) -> String {
    match fs::File::open(path) {
        Ok(file) => {
            let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
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

    #[test]
    fn node_conn_string() {
        let node = LocalNode {
            name: "pg1".into(),
            port: 5555,
            data_dir: PathBuf::from("/nonexistent"),
        };
        assert_eq!(node.address().to_string(), "127.0.0.1:5555");
        assert_eq!(
            node.conn_string(),
            "host=127.0.0.1 port=5555 user=postgres password=postgres dbname=postgres"
        );
    }

    /// One real failover round trip; skipped where PostgreSQL is missing.
    #[test]
    fn cluster_lifecycle() {
        if let Err(err) = find_bindir() {
            eprintln!("skipping: {err}");
            return;
        }
        let opts = ClusterOptions {
            standbys: 1,
            ..ClusterOptions::default()
        };
        let mut cluster = LocalCluster::start(opts).unwrap();
        assert_eq!(cluster.psql_as(0, MD5_USER, "SELECT 1").unwrap(), "1");
        cluster.psql(0, "CREATE TABLE t AS SELECT 1 AS x").unwrap();

        cluster.stop_node(0, StopMode::Immediate).unwrap();
        cluster.promote(1).unwrap();
        cluster
            .wait_role(1, false, Duration::from_secs(30))
            .unwrap();
        cluster.rejoin_as_standby(0, 1).unwrap();
        assert_eq!(cluster.psql(0, "SELECT count(*) FROM t").unwrap(), "1");
        assert_eq!(cluster.psql(0, "SELECT pg_is_in_recovery()").unwrap(), "t");

        let dir = cluster.dir().to_path_buf();
        cluster.shutdown();
        cluster.shutdown();
        assert!(!dir.exists());
    }

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

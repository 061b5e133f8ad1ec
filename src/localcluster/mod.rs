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
//! All servers listen on `127.0.0.1` and on a Unix socket in the cluster's
//! own directory ([`LocalCluster::socket_dir`], so no writable
//! `/var/run/postgresql` is needed); `pg_hba.conf` asks for the same
//! passwords on both. The cluster's own clients (psql, `pg_basebackup`,
//! walreceivers) authenticate over TCP with [`SUPERUSER`] / [`PASSWORD`].
//!
//! # Layout
//!
//! This module holds the cluster and node types and the public API; the
//! rest is split by concern:
//!
//! - `datadir`: building and configuring data directories (`initdb`,
//!   `pg_basebackup`, `pg_rewind`, `postgresql.conf`, `pg_hba.conf`,
//!   recovery settings).
//! - `account`: the OS account the servers run as, and commands and files
//!   owned by it.
//! - `reaper`: the child process that cleans up after this process dies.
//! - `host`: [`find_bindir`] and [`free_port`].
//! - `exec`: running a helper program, polling for a condition.
//! - `error`: [`ClusterError`].

mod account;
mod datadir;
mod error;
mod exec;
mod host;
mod reaper;

use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tracing::{debug, info, warn};

use account::{server_account, OsAccount};
use error::{io_err, tail_of_file};
use exec::{describe, poll_until, run};

pub use error::ClusterError;
pub use host::{find_bindir, free_port};

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
/// How many lines of a server log an error message quotes.
const LOG_TAIL_LINES: usize = 40;

/// How [`LocalCluster::start`] shapes the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of hot standbys cloned from the primary.
    pub standbys: usize,
    /// Lines appended to the primary's `postgresql.conf` before the standbys
    /// are cloned, so they apply to every node.
    pub extra_conf: Vec<String>,
    /// Serve TLS (`ssl = on`) with this certificate and key, PEM encoded.
    pub tls: Option<ServerCert>,
}

/// A server certificate and its private key, PEM encoded, for `ssl = on`.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            standbys: 2,
            extra_conf: Vec::new(),
            tls: None,
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
        cluster.init_primary(&opts.extra_conf, opts.tls.as_ref())?;
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

    /// The directory of every node's Unix socket (`.s.PGSQL.<port>`, the
    /// node's TCP port): `<dir>/sockets`.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sockets")
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
        let status = cmd.status().map_err(|error| ClusterError::Spawn {
            command: describe(&cmd),
            error,
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

    /// `pg_ctl -D <node's data dir>`, to be completed with an action.
    fn pg_ctl(&self, node: &LocalNode) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&node.data_dir);
        cmd
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // Replication is asynchronous: the standby must have replayed the
        // table before the primary dies, or the promoted node lacks it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while cluster
            .psql(1, "SELECT to_regclass('t') IS NOT NULL")
            .unwrap()
            != "t"
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the standby never replayed t"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

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
}

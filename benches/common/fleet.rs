//! The relay bench's targets: a direct connection, pgpivot (as a child
//! process or in-process), PgBouncer and HAProxy, each reachable on
//! `127.0.0.1` with the cluster's superuser, and, for the child processes,
//! the PID whose `/proc` entries the cost case reads.

use std::fs::{self, File};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use tempfile::TempDir;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls, Socket};

use pgpivot::config::FileConfig;
use pgpivot::localcluster::{free_port, LocalCluster, PASSWORD, SUPERUSER};
use pgpivot::proxy::Proxy;

use super::tls_client::{RustlsConnect, SelfSigned};

/// How long a started proxy gets to answer its first query.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// OS account that runs PgBouncer when the bench runs as root (PgBouncer
/// refuses root); the one [`LocalCluster`] runs the servers as.
const OS_USER: &str = "postgres";

/// Where pgpivot runs during the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PgpivotMode {
    /// A child process running the `pgpivot` binary.
    Process,
    /// Inside the bench's own tokio runtime.
    InProcess,
    /// Both, as two targets.
    Both,
}

/// One `[runtime]` of pgpivot to measure: `flavor` or `flavor:workers`
/// (`per-core`, `multi-thread:1`, ...); without a count, the cores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeChoice {
    pub flavor: String,
    pub workers: usize,
}

impl std::str::FromStr for RuntimeChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<RuntimeChoice> {
        let (flavor, workers) = match s.trim().split_once(':') {
            Some((f, n)) => (f, n.parse().context("workers after ':'")?),
            None => (
                s.trim(),
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
        };
        if !["per-core", "multi-thread"].contains(&flavor) || workers == 0 {
            bail!("{s:?}: want per-core or multi-thread, optionally :WORKERS (at least 1)");
        }
        Ok(RuntimeChoice {
            flavor: flavor.to_owned(),
            workers,
        })
    }
}

impl RuntimeChoice {
    /// The target's name in the tables.
    pub fn name(&self) -> String {
        format!("pgpivot {} x{}", self.flavor, self.workers)
    }

    /// The `[runtime]` section selecting it.
    pub fn toml(&self) -> String {
        format!(
            "\n[runtime]\nflavor = \"{}\"\nworkers = {}\n",
            self.flavor, self.workers
        )
    }
}

/// One endpoint the cases run against.
pub struct Target {
    pub name: String,
    pub conn_string: String,
    /// `127.0.0.1`, or the directory of a Unix socket (libpq's `host`).
    pub host: String,
    /// The port it listens on (over a socket: the one in its file name).
    pub port: u16,
    /// The proxy's own process, when it runs as a child of the bench.
    pub pid: Option<u32>,
    /// Clients connect over TLS (`sslmode=require`) trusting this config's
    /// roots; plaintext when `None`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// A target on `127.0.0.1:port`, logging in as the cluster's superuser.
    pub fn local(name: &str, port: u16) -> Target {
        Target::at(name, "127.0.0.1", port)
    }

    /// A target at libpq's `host` (an address or a socket directory) and
    /// `port`.
    fn at(name: &str, host: &str, port: u16) -> Target {
        Target {
            name: name.to_owned(),
            host: host.to_owned(),
            port,
            pid: None,
            tls: None,
            conn_string: format!(
                "host={host} port={port} user={SUPERUSER} password={PASSWORD} dbname=postgres"
            ),
        }
    }

    /// A target on `127.0.0.1:port` whose clients require TLS, trusting
    /// `client`'s roots.
    pub fn local_tls(name: &str, port: u16, client: Arc<rustls::ClientConfig>) -> Target {
        let mut target = Target::local(name, port);
        target.conn_string.push_str(" sslmode=require");
        target.tls = Some(client);
        target
    }

    /// The primary itself.
    pub fn direct(cluster: &LocalCluster) -> Target {
        Target::local("direct", cluster.node(0).port)
    }

    /// The primary over its Unix socket: what a client on the database
    /// host pays without a proxy (the baseline of `pgpivot (unix)`).
    pub fn direct_unix(cluster: &LocalCluster) -> Target {
        let dir = cluster.socket_dir().display().to_string();
        Target::at("direct (unix)", &dir, cluster.node(0).port)
    }

    /// A new connection, its driver task spawned on the runtime.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let client = match &self.tls {
            None => open(&self.conn_string, NoTls).await,
            Some(config) => open(&self.conn_string, RustlsConnect(config.clone())).await,
        };
        client.with_context(|| format!("cannot connect to {}", self.name))
    }
}

/// Connects with `tls` and spawns the connection's driver task.
async fn open<T>(conn_string: &str, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = tokio_postgres::connect(conn_string, tls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A proxy running as a child process, with the temporary directory holding
/// its config and log. Dropping it kills the process (also when a panic
/// unwinds) and then removes the directory.
pub struct Peer {
    pub child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Peer {
    /// Spawns `cmd` with stdin closed and stdout and stderr written to
    /// `<dir>/<name>.log`.
    pub fn spawn(name: &str, dir: TempDir, mut cmd: Command) -> anyhow::Result<Peer> {
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).context("cannot create a log file")?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
        Ok(Peer {
            child,
            log,
            _dir: dir,
        })
    }

    /// Waits until `target` (served by this peer) answers a query; fails
    /// early, quoting the log, if the process exits.
    pub async fn wait_ready(&mut self, target: &Target, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let err = match answers(target).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}):\n{}", target.name, self.log_tail());
            }
            if Instant::now() >= deadline {
                bail!("{} is not ready: {err:#}\n{}", target.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the process to exit (SIGTERM) and waits up to `timeout` for it
    /// to do so: a tool it runs under, such as valgrind, then writes its
    /// results. Fails, quoting the log, if it does not exit in time.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let sent = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .await
            .context("cannot run kill")?;
        if !sent.success() {
            bail!("kill -TERM {} failed ({sent})", self.child.id());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("did not exit on SIGTERM:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the peer's log.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `target` runs `select 1`.
async fn answers(target: &Target) -> anyhow::Result<()> {
    let client = target.connect().await?;
    client.simple_query("select 1").await?;
    Ok(())
}

/// Every target, and what keeps them running.
pub struct Fleet {
    pub targets: Vec<Target>,
    peers: Vec<Peer>,
    in_process: Option<Proxy>,
}

impl Fleet {
    /// Starts every target the config and the machine allow, in table
    /// order. Targets that cannot be had are explained in `notes`.
    /// pgpivot runs once per entry of `runtimes` (the first one also with
    /// relay timing off).
    pub async fn start(
        cluster: &LocalCluster,
        binary: &Path,
        pgpivot: PgpivotMode,
        runtimes: &[RuntimeChoice],
        clients: usize,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet {
            targets: vec![Target::direct(cluster), Target::direct_unix(cluster)],
            peers: Vec::new(),
            in_process: None,
        };
        let mut in_process = pgpivot != PgpivotMode::Process;
        if pgpivot != PgpivotMode::InProcess {
            if binary.is_file() {
                for runtime in runtimes {
                    let started = start_pgpivot_process(binary, cluster, &runtime.toml());
                    fleet.add_peer(&runtime.name(), started).await?;
                }
                let first = runtimes.first().map(RuntimeChoice::toml);
                // Unix-socket backends: the first runtime with every node
                // given as its socket file, for a proxy on the database host.
                let started = start_pgpivot_over(
                    Backends::Unix,
                    cluster,
                    "",
                    &first.clone().unwrap_or_default(),
                    |config| {
                        let mut cmd = Command::new(binary);
                        cmd.arg("--config").arg(config);
                        cmd
                    },
                );
                fleet.add_peer("pgpivot (unix)", started).await?;
                // The cost of the relay's metrics: the same binary with
                // round-trip timing and byte counting switched off.
                let extra = first.clone().unwrap_or_default() + METRICS_OFF;
                let started = start_pgpivot_process(binary, cluster, &extra);
                fleet
                    .add_peer("pgpivot (relay_timing off)", started)
                    .await?;
                // The cost of tracking session state for moves: the first
                // runtime without it.
                let extra = first.unwrap_or_default() + MOVES_OFF;
                let started = start_pgpivot_process(binary, cluster, &extra);
                fleet
                    .add_peer("pgpivot (move_sessions off)", started)
                    .await?;
            } else {
                notes.push(format!(
                    "pgpivot (process): {} not found, measured in-process instead",
                    binary.display()
                ));
                in_process = true;
            }
        }
        if in_process {
            let (target, proxy) = start_pgpivot_in_process(cluster).await?;
            fleet.targets.push(target);
            fleet.in_process = Some(proxy);
        }
        let tools = find_or_install(&["pgbouncer", "haproxy"], notes);
        if let Some(bin) = &tools[0] {
            let started = start_pgbouncer(Command::new(bin), cluster, clients);
            fleet
                .add_optional_peer("pgbouncer (session)", started, notes)
                .await;
        }
        if let Some(bin) = &tools[1] {
            let started = start_haproxy(Command::new(bin), cluster);
            fleet
                .add_optional_peer("haproxy (tcp)", started, notes)
                .await;
        }
        Ok(fleet)
    }

    /// Adds a started child process as a target once it answers.
    async fn add_peer(
        &mut self,
        name: &str,
        started: anyhow::Result<(u16, Peer)>,
    ) -> anyhow::Result<()> {
        let (port, mut peer) = started?;
        let mut target = Target::local(name, port);
        peer.wait_ready(&target, READY_TIMEOUT).await?;
        target.pid = Some(peer.child.id());
        self.targets.push(target);
        self.peers.push(peer);
        Ok(())
    }

    /// Like [`Fleet::add_peer`] for a peer the bench can do without: a
    /// failure becomes a note.
    async fn add_optional_peer(
        &mut self,
        name: &str,
        started: anyhow::Result<(u16, Peer)>,
        notes: &mut Vec<String>,
    ) {
        if let Err(err) = self.add_peer(name, started).await {
            notes.push(format!("{name}: did not start, skipped: {err:#}"));
        }
    }

    /// Stops the in-process proxy gracefully, then kills the peers.
    pub async fn stop(self) {
        if let Some(proxy) = self.in_process {
            proxy.shutdown(Duration::from_secs(5)).await;
        }
        drop(self.peers);
    }
}

/// How pgpivot reaches the cluster's nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backends {
    /// `127.0.0.1:port`.
    Tcp,
    /// Each node's Unix socket file in the cluster's socket directory.
    Unix,
}

/// The pgpivot config used by both deployments, as TOML: one read-write
/// listener on `address`, every cluster node (over TCP or its socket), the
/// superuser as monitor, quiet logs. Every other key keeps its default.
pub fn pgpivot_toml(
    cluster: &LocalCluster,
    backends: Backends,
    address: &str,
    monitor_extra: &str,
) -> String {
    let mut text = format!(
        "[[listeners]]\naddress = \"{address}\"\ntarget = \"read-write\"\n\n\
         [monitor]\nuser = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n{monitor_extra}\n\
         [log]\nfilter = \"warn\"\n"
    );
    for node in cluster.nodes() {
        let node_address = match backends {
            Backends::Tcp => node.address().to_string(),
            Backends::Unix => pgpivot::address::socket_path(&cluster.socket_dir(), node.port)
                .display()
                .to_string(),
        };
        text += &format!(
            "\n[[nodes]]\nname = \"{}\"\naddress = \"{node_address}\"\n",
            node.name,
        );
    }
    text
}

/// Config lines that switch the relay's per-round-trip metrics off.
const METRICS_OFF: &str = "\n[metrics]\nrelay_timing = false\n";

/// Config lines that switch session moves (and so state tracking) off.
pub const MOVES_OFF: &str = "\n[failover]\nmove_sessions = false\n";

/// Runs the `pgpivot` binary with a generated config (plus `extra` TOML) on
/// a free port.
pub fn start_pgpivot_process(
    binary: &Path,
    cluster: &LocalCluster,
    extra: &str,
) -> anyhow::Result<(u16, Peer)> {
    start_pgpivot_with(cluster, "", extra, |config| {
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(config);
        cmd
    })
}

/// Like [`start_pgpivot_process`], with `monitor_extra` lines in the
/// `[monitor]` section and the command built by `command` from the config
/// file's path (e.g. the binary under valgrind).
pub fn start_pgpivot_with(
    cluster: &LocalCluster,
    monitor_extra: &str,
    extra: &str,
    command: impl FnOnce(&Path) -> Command,
) -> anyhow::Result<(u16, Peer)> {
    start_pgpivot_over(Backends::Tcp, cluster, monitor_extra, extra, command)
}

/// Like [`start_pgpivot_with`], reaching the nodes as `backends` says.
pub fn start_pgpivot_over(
    backends: Backends,
    cluster: &LocalCluster,
    monitor_extra: &str,
    extra: &str,
    command: impl FnOnce(&Path) -> Command,
) -> anyhow::Result<(u16, Peer)> {
    let port = free_port();
    let dir = TempDir::with_prefix("pgpivot-bench-")?;
    let config = dir.path().join("pgpivot.toml");
    let listen = format!("127.0.0.1:{port}");
    let text = pgpivot_toml(cluster, backends, &listen, monitor_extra) + extra;
    fs::write(&config, text)?;
    let mut cmd = command(&config);
    // pgpivot reads every PGPIVOT_* variable as a config key, and rejects
    // unknown ones such as this bench's own PGPIVOT_BENCH_*.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PGPIVOT_") {
            cmd.env_remove(key);
        }
    }
    Ok((port, Peer::spawn("pgpivot", dir, cmd)?))
}

/// Starts pgpivot inside this runtime and waits until it knows the primary.
async fn start_pgpivot_in_process(cluster: &LocalCluster) -> anyhow::Result<(Target, Proxy)> {
    let file: FileConfig =
        toml::from_str(&pgpivot_toml(cluster, Backends::Tcp, "127.0.0.1:0", ""))?;
    let settings = file.validate()?;
    let proxy = Proxy::start(settings).await?;
    if !proxy.wait_for_primary(READY_TIMEOUT).await {
        bail!("in-process pgpivot found no primary");
    }
    let target = Target::local("pgpivot (in-process)", proxy.addresses[0].port());
    Ok((target, proxy))
}

/// Runs PgBouncer in session mode in front of the primary, with SCRAM for
/// clients (the role's SCRAM secret in the auth file) and pools big enough for every
/// select client. `program` is the `pgbouncer` binary's command (or a tool
/// such as valgrind running it); the config's path is appended to it.
pub fn start_pgbouncer(
    program: Command,
    cluster: &LocalCluster,
    clients: usize,
) -> anyhow::Result<(u16, Peer)> {
    start_pgbouncer_tls(program, cluster, clients, None)
}

/// Like [`start_pgbouncer`]; with `tls`, clients must use TLS
/// (`client_tls_sslmode = require`) with that certificate.
pub fn start_pgbouncer_tls(
    mut program: Command,
    cluster: &LocalCluster,
    clients: usize,
    tls: Option<&SelfSigned>,
) -> anyhow::Result<(u16, Peer)> {
    let port = free_port();
    let dir = TempDir::with_prefix("pgpivot-bench-pgbouncer-")?;
    // PgBouncer runs unprivileged: its copies of the files, in its own
    // directory.
    let tls_ini = match tls {
        None => String::new(),
        Some(tls) => {
            let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            fs::copy(&tls.cert, &cert)?;
            fs::copy(&tls.key, &key)?;
            format!(
                "client_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n",
                cert.display(),
                key.display()
            )
        }
    };
    // The role's SCRAM secret, as a production auth file holds it: with the
    // plain password PgBouncer would derive the keys (4,096 rounds of
    // HMAC) at every login, which neither the server nor pgpivot does.
    let secret = cluster
        .psql(
            0,
            &format!("select rolpassword from pg_authid where rolname = '{SUPERUSER}'"),
        )
        .context("cannot read the role's SCRAM secret")?;
    if !secret.starts_with("SCRAM-SHA-256$") {
        bail!("the role's password is not a SCRAM secret: {secret:.14}");
    }
    let userlist = dir.path().join("userlist.txt");
    fs::write(&userlist, format!("\"{SUPERUSER}\" \"{secret}\"\n"))?;
    let ini = dir.path().join("pgbouncer.ini");
    // The cost case's pgbench runs 8 clients, whatever the select case's count.
    let pool = clients.max(8) + 2;
    fs::write(
        &ini,
        format!(
            "[databases]\n\
             postgres = host=127.0.0.1 port={primary} dbname=postgres \
             user={SUPERUSER} password={PASSWORD}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {userlist}\n\
             pool_mode = session\n\
             max_client_conn = {max_client}\n\
             default_pool_size = {pool}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             {tls_ini}",
            primary = cluster.node(0).port,
            userlist = userlist.display(),
            max_client = pool * 2,
        ),
    )?;
    program.arg(&ini);
    run_unprivileged(&mut program, dir.path())?;
    Ok((port, Peer::spawn("pgbouncer", dir, program)?))
}

/// Runs HAProxy in TCP mode in the foreground, one backend: the primary.
/// `program` is the `haproxy` binary's command (or a tool running it).
pub fn start_haproxy(mut program: Command, cluster: &LocalCluster) -> anyhow::Result<(u16, Peer)> {
    let port = free_port();
    let dir = TempDir::with_prefix("pgpivot-bench-haproxy-")?;
    let cfg = dir.path().join("haproxy.cfg");
    fs::write(
        &cfg,
        format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode tcp\n    timeout connect 5s\n\
             \x20   timeout client 1h\n    timeout server 1h\n\
             frontend pg\n    bind 127.0.0.1:{port}\n    default_backend primary\n\
             backend primary\n    server primary 127.0.0.1:{primary}\n",
            primary = cluster.node(0).port,
        ),
    )?;
    program.arg("-db").arg("-f").arg(&cfg);
    Ok((port, Peer::spawn("haproxy", dir, program)?))
}

/// When this process is root, makes `cmd` run as [`OS_USER`] and hands
/// `dir` (which holds its config) to that account.
fn run_unprivileged(cmd: &mut Command, dir: &Path) -> anyhow::Result<()> {
    if effective_uid()? != 0 {
        return Ok(());
    }
    let (uid, gid, home) = account(OS_USER)?;
    chown(dir, Some(uid), Some(gid))?;
    // The account's own environment too, not root's: a program (or a tool
    // such as valgrind running it) that looks at HOME or USER then finds
    // the account it runs as.
    cmd.uid(uid)
        .gid(gid)
        .env("HOME", home)
        .env("USER", OS_USER)
        .env("LOGNAME", OS_USER);
    Ok(())
}

/// Effective uid, from `/proc/self/status`.
fn effective_uid() -> anyhow::Result<u32> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .context("no effective uid in /proc/self/status")
}

/// Uid, gid and home directory of account `name`, from `/etc/passwd`.
fn account(name: &str) -> anyhow::Result<(u32, u32, String)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find_map(|f| match f[..] {
            [user, _, uid, gid, _, home, ..] if user == name => {
                Some((uid.parse().ok()?, gid.parse().ok()?, home.to_owned()))
            }
            _ => None,
        })
        .with_context(|| format!("no account {name} in /etc/passwd"))
}

/// Builds the `pgpivot` binary as `cargo build --release` does and returns
/// its path. The one cargo builds beside a bench (`CARGO_BIN_EXE_pgpivot`)
/// is not that binary: a bench build turns on the dev-dependencies'
/// features, and tokio's `test-util` (for the unit tests' paused clock)
/// puts a lock and a clock offset behind every tokio clock read, about
/// 2 % more instructions per transaction. The build goes to its own target
/// directory (`target/shipped`), so that the two builds do not replace each
/// other's binary.
pub fn shipped_binary() -> anyhow::Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"))
        .join("shipped");
    eprintln!(
        "building the shipped pgpivot binary (cargo build --release) in {} ...",
        target.display()
    );
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--locked", "--bin", "pgpivot"])
        .arg("--manifest-path")
        .arg(manifest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    Ok(target.join("release").join("pgpivot"))
}

/// Finds each of `tools`; when some are missing, tries `apt-get install`
/// once. Each tool still missing gets a note.
pub fn find_or_install(tools: &[&str], notes: &mut Vec<String>) -> Vec<Option<PathBuf>> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if !missing.is_empty() && which("apt-get").is_some() {
        eprintln!("installing {} with apt-get...", missing.join(" "));
        let installed = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output();
        match installed {
            Ok(out) if out.status.success() => {}
            Ok(out) => notes.push(format!(
                "apt-get install {} failed: {}",
                missing.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(err) => notes.push(format!("cannot run apt-get: {err}")),
        }
    }
    tools
        .iter()
        .map(|t| {
            let found = which(t);
            if found.is_none() {
                notes.push(format!("{t}: not installed, skipped"));
            }
            found
        })
        .collect()
}

/// `tool`'s path on `PATH` or in an `sbin` directory (where Debian puts
/// daemons, and which a non-root `PATH` often lacks).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

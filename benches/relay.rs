//! Relay benchmark: what pgpivot costs on the data path, next to a direct
//! connection and, when they are installed, PgBouncer and HAProxy.
//!
//! One run starts a real local PostgreSQL primary ([`LocalCluster`]), loads
//! `bench_kv(id int primary key, v text)` with 10,000 rows, starts every
//! target in front of the primary, and measures two cases:
//!
//! * **select**: N concurrent clients (default 8), each one tokio-postgres
//!   connection running the prepared `select v from bench_kv where id = $1`
//!   back to back, over keys spread across the table. After a 1 s warm-up,
//!   every query's latency is recorded for a fixed time (default 10 s, in
//!   three rounds that interleave the targets) in a per-client HDR
//!   histogram; the histograms are merged. `tps` is queries
//!   started in the measured window divided by its length.
//! * **bulk**: one client runs `COPY (select repeat('x', 1000) from
//!   generate_series(1, 100000)) TO STDOUT` (100.1 MB of rows) and counts the
//!   bytes; MB/s is bytes / 10^6 / seconds from the COPY request to its last
//!   byte. Three runs per target, interleaved across targets; best and median
//!   are reported.
//!
//! Targets, each reached through the same connection string shape:
//!
//! * `direct`: the primary itself, the baseline.
//! * `pgpivot`: the `pgpivot` binary that cargo built next to this bench, as
//!   a child process with a generated TOML config: a process of its own,
//!   like PgBouncer and HAProxy.
//! * `pgpivot (relay_timing off)`: the same with `[metrics] relay_timing =
//!   false`, so the pair shows what the per-round-trip metrics cost.
//! * `pgpivot (in-process)` (with `--pgpivot in-process|both`):
//!   [`Proxy::start`] inside this bench's tokio runtime, sharing its worker
//!   threads with the load generator; not comparable to the other proxies.
//! * `pgbouncer (session)` and `haproxy (tcp)`: children started from
//!   configs in temporary directories, if `pgbouncer` / `haproxy` are on the
//!   machine (the bench tries `apt-get install` once when they are missing).
//!
//! How to read the tables: `tps/direct` below 1 is the throughput a hop
//! costs; `p50/direct` and `p99/direct` above 1 are the latency it adds.
//! Everything (servers, proxies and load generator) shares this machine's
//! CPUs, so with few cores the ratios also measure CPU contention, not only
//! relay overhead; compare rows of one run rather than runs on different
//! machines.
//!
//! ```text
//! cargo bench --bench relay
//! cargo bench --bench relay -- --clients 16 --seconds 5 --pgpivot process
//! PGPIVOT_BENCH_CLIENTS=4 PGPIVOT_BENCH_SECONDS=3 cargo bench --bench relay
//! ```

mod common;

use std::fs::{self, File};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls, Statement};

use pgpivot::config::FileConfig;
use pgpivot::localcluster::{free_port, ClusterOptions, LocalCluster, PASSWORD, SUPERUSER};
use pgpivot::proxy::Proxy;

/// Rows of `bench_kv`.
const ROWS: i32 = 10_000;
/// The select case's query.
const SELECT_SQL: &str = "select v from bench_kv where id = $1";
/// Time every select client runs before latencies are recorded.
const WARMUP: Duration = Duration::from_secs(1);
/// Rows and row width of the bulk case: 100,000 × (1,000 + newline) bytes.
const BULK_ROWS: usize = 100_000;
const BULK_WIDTH: usize = 1_000;
/// Runs of the bulk case per target.
const BULK_RUNS: usize = 3;
/// How long a started proxy gets to answer its first query.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// OS account that runs PgBouncer when the bench runs as root (PgBouncer
/// refuses root); the one [`LocalCluster`] runs the servers as.
const OS_USER: &str = "postgres";

/// Command line, after `cargo bench --bench relay --`.
#[derive(Parser, Debug)]
#[command(about = "pgpivot relay benchmark")]
struct Options {
    /// Concurrent clients of the select case [env: PGPIVOT_BENCH_CLIENTS] [default: 8].
    #[arg(long)]
    clients: Option<usize>,
    /// Measured seconds of the select case per target, after a 1 s warm-up
    /// [env: PGPIVOT_BENCH_SECONDS] [default: 10].
    #[arg(long)]
    seconds: Option<u64>,
    /// Which pgpivot deployments to measure.
    #[arg(long, value_enum, default_value_t = PgpivotMode::Process)]
    pgpivot: PgpivotMode,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Where pgpivot runs during the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PgpivotMode {
    /// A child process running the `pgpivot` binary.
    Process,
    /// Inside the bench's own tokio runtime.
    InProcess,
    /// Both, as two targets.
    Both,
}

/// The resolved run parameters.
#[derive(Debug)]
struct Config {
    clients: usize,
    measured: Duration,
    pgpivot: PgpivotMode,
}

impl Config {
    /// Command line first, then the environment, then the defaults.
    fn load() -> anyhow::Result<Config> {
        let opts = Options::parse();
        let clients = opts
            .clients
            .map(Ok)
            .or_else(|| env_var("PGPIVOT_BENCH_CLIENTS"))
            .transpose()?
            .unwrap_or(8);
        let seconds = opts
            .seconds
            .map(Ok)
            .or_else(|| env_var("PGPIVOT_BENCH_SECONDS"))
            .transpose()?
            .unwrap_or(10);
        if clients == 0 || seconds == 0 {
            bail!("clients and seconds must be at least 1");
        }
        Ok(Config {
            clients,
            measured: Duration::from_secs(seconds),
            pgpivot: opts.pgpivot,
        })
    }
}

/// Parses environment variable `name`, if set.
fn env_var<T: FromStr>(name: &str) -> Option<anyhow::Result<T>> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .map_err(|_| anyhow!("{name}={value} is not a valid value")),
    )
}

/// One endpoint the cases run against.
struct Target {
    name: String,
    conn_string: String,
}

impl Target {
    /// A target on `127.0.0.1:port`, logging in as the cluster's superuser.
    fn local(name: &str, port: u16) -> Target {
        Target {
            name: name.to_owned(),
            conn_string: format!(
                "host=127.0.0.1 port={port} user={SUPERUSER} password={PASSWORD} dbname=postgres"
            ),
        }
    }

    /// The primary itself.
    fn direct(cluster: &LocalCluster) -> Target {
        Target::local("direct", cluster.node(0).port)
    }

    /// A new connection, its driver task spawned on the runtime.
    async fn connect(&self) -> anyhow::Result<Client> {
        let (client, connection) = tokio_postgres::connect(&self.conn_string, NoTls)
            .await
            .with_context(|| format!("cannot connect to {}", self.name))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

/// A proxy running as a child process, with the temporary directory holding
/// its config and log. Dropping it kills the process (also when a panic
/// unwinds) and then removes the directory.
struct Peer {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Peer {
    /// Spawns `cmd` with stdin closed and stdout and stderr written to
    /// `<dir>/<name>.log`.
    fn spawn(name: &str, dir: TempDir, mut cmd: Command) -> anyhow::Result<Peer> {
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
    async fn wait_ready(&mut self, target: &Target) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
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
struct Fleet {
    targets: Vec<Target>,
    peers: Vec<Peer>,
    in_process: Option<Proxy>,
}

impl Fleet {
    /// Starts every target the config and the machine allow, in table
    /// order. Targets that cannot be had are explained in `notes`.
    async fn start(
        cluster: &LocalCluster,
        cfg: &Config,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet {
            targets: vec![Target::direct(cluster)],
            peers: Vec::new(),
            in_process: None,
        };
        let mut in_process = cfg.pgpivot != PgpivotMode::Process;
        if cfg.pgpivot != PgpivotMode::InProcess {
            let binary = Path::new(env!("CARGO_BIN_EXE_pgpivot"));
            if binary.is_file() {
                let started = start_pgpivot_process(binary, cluster, "");
                fleet.add_peer("pgpivot", started).await?;
                // The cost of the relay's metrics: the same binary with
                // round-trip timing and byte counting switched off.
                let started = start_pgpivot_process(binary, cluster, METRICS_OFF);
                fleet
                    .add_peer("pgpivot (relay_timing off)", started)
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
            let started = start_pgbouncer(bin, cluster, cfg.clients);
            fleet
                .add_optional_peer("pgbouncer (session)", started, notes)
                .await;
        }
        if let Some(bin) = &tools[1] {
            let started = start_haproxy(bin, cluster);
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
        let target = Target::local(name, port);
        peer.wait_ready(&target).await?;
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
    async fn stop(self) {
        if let Some(proxy) = self.in_process {
            proxy.shutdown(Duration::from_secs(5)).await;
        }
        drop(self.peers);
    }
}

/// The pgpivot config used by both deployments, as TOML: one read-write
/// listener on `address`, every cluster node, the superuser as monitor,
/// quiet logs. Every other key keeps its default.
fn pgpivot_toml(cluster: &LocalCluster, address: &str) -> String {
    let mut text = format!(
        "[[listeners]]\naddress = \"{address}\"\ntarget = \"read-write\"\n\n\
         [monitor]\nuser = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n\n\
         [log]\nfilter = \"warn\"\n"
    );
    for node in cluster.nodes() {
        text += &format!(
            "\n[[nodes]]\nname = \"{}\"\naddress = \"{}\"\n",
            node.name,
            node.address()
        );
    }
    text
}

/// Config lines that switch the relay's per-round-trip metrics off.
const METRICS_OFF: &str = "\n[metrics]\nrelay_timing = false\n";

/// Runs the `pgpivot` binary with a generated config (plus `extra` TOML) on
/// a free port.
fn start_pgpivot_process(
    binary: &Path,
    cluster: &LocalCluster,
    extra: &str,
) -> anyhow::Result<(u16, Peer)> {
    let port = free_port();
    let dir = TempDir::with_prefix("pgpivot-bench-")?;
    let config = dir.path().join("pgpivot.toml");
    let text = pgpivot_toml(cluster, &format!("127.0.0.1:{port}")) + extra;
    fs::write(&config, text)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--config").arg(&config);
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
    let file: FileConfig = toml::from_str(&pgpivot_toml(cluster, "127.0.0.1:0"))?;
    let settings = file.validate()?;
    let proxy = Proxy::start(settings).await?;
    if !proxy.wait_for_primary(READY_TIMEOUT).await {
        bail!("in-process pgpivot found no primary");
    }
    let target = Target::local("pgpivot (in-process)", proxy.addresses[0].port());
    Ok((target, proxy))
}

/// Runs PgBouncer in session mode in front of the primary, with SCRAM for
/// clients (plain password in the auth file) and pools big enough for every
/// select client.
fn start_pgbouncer(
    binary: &Path,
    cluster: &LocalCluster,
    clients: usize,
) -> anyhow::Result<(u16, Peer)> {
    let port = free_port();
    let dir = TempDir::with_prefix("pgpivot-bench-pgbouncer-")?;
    let userlist = dir.path().join("userlist.txt");
    fs::write(&userlist, format!("\"{SUPERUSER}\" \"{PASSWORD}\"\n"))?;
    let ini = dir.path().join("pgbouncer.ini");
    let pool = clients + 2;
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
             ignore_startup_parameters = extra_float_digits,options\n",
            primary = cluster.node(0).port,
            userlist = userlist.display(),
            max_client = pool * 2,
        ),
    )?;
    let mut cmd = Command::new(binary);
    cmd.arg(&ini);
    run_unprivileged(&mut cmd, dir.path())?;
    Ok((port, Peer::spawn("pgbouncer", dir, cmd)?))
}

/// Runs HAProxy in TCP mode in the foreground, one backend: the primary.
fn start_haproxy(binary: &Path, cluster: &LocalCluster) -> anyhow::Result<(u16, Peer)> {
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
    let mut cmd = Command::new(binary);
    cmd.arg("-db").arg("-f").arg(&cfg);
    Ok((port, Peer::spawn("haproxy", dir, cmd)?))
}

/// When this process is root, makes `cmd` run as [`OS_USER`] and hands
/// `dir` (which holds its config) to that account.
fn run_unprivileged(cmd: &mut Command, dir: &Path) -> anyhow::Result<()> {
    if effective_uid()? != 0 {
        return Ok(());
    }
    let (uid, gid) = account(OS_USER)?;
    chown(dir, Some(uid), Some(gid))?;
    cmd.uid(uid).gid(gid);
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

/// Uid and gid of account `name`, from `/etc/passwd`.
fn account(name: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find_map(|f| match f[..] {
            [user, _, uid, gid, ..] if user == name => Some((uid.parse().ok()?, gid.parse().ok()?)),
            _ => None,
        })
        .with_context(|| format!("no account {name} in /etc/passwd"))
}

/// Finds each of `tools`; when some are missing, tries `apt-get install`
/// once. Each tool still missing gets a note.
fn find_or_install(tools: &[&str], notes: &mut Vec<String>) -> Vec<Option<PathBuf>> {
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
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Creates and fills `bench_kv` on the primary.
async fn create_table(cluster: &LocalCluster) -> anyhow::Result<()> {
    let client = Target::direct(cluster).connect().await?;
    client
        .batch_execute(&format!(
            "create table bench_kv(id int primary key, v text);
             insert into bench_kv select g, md5(g::text) from generate_series(1, {ROWS}) g"
        ))
        .await?;
    client.batch_execute("vacuum analyze bench_kv").await?;
    Ok(())
}

/// An empty latency histogram: nanoseconds, 1 µs to 60 s, 3 significant
/// digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Outcome of the select case against one target.
struct SelectResult {
    latencies: Histogram<u64>,
    measured: Duration,
}

impl SelectResult {
    fn tps(&self) -> f64 {
        self.latencies.len() as f64 / self.measured.as_secs_f64()
    }

    /// Latency at `quantile`, in milliseconds.
    fn ms(&self, quantile: f64) -> f64 {
        self.latencies.value_at_quantile(quantile) as f64 / 1e6
    }
}

/// Runs the select case against `target`: connects and prepares every
/// client first, then starts them together.
async fn run_select(target: &Target, cfg: &Config) -> anyhow::Result<SelectResult> {
    let mut clients = Vec::with_capacity(cfg.clients);
    for _ in 0..cfg.clients {
        let client = target.connect().await?;
        let statement = client.prepare(SELECT_SQL).await?;
        clients.push((client, statement));
    }
    let recording = Instant::now() + WARMUP;
    let end = recording + cfg.measured;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (client, statement))| {
            tokio::spawn(select_loop(client, statement, i, recording, end))
        })
        .collect();
    let mut latencies = new_histogram();
    for task in tasks {
        latencies.add(task.await??)?;
    }
    Ok(SelectResult {
        latencies,
        measured: cfg.measured,
    })
}

/// One select client: queries back to back until `end`, recording the
/// latency of each query started at or after `recording`. Client `seed`
/// walks the keys with a prime stride from its own offset, so clients spread
/// over the whole table.
async fn select_loop(
    client: Client,
    statement: Statement,
    seed: usize,
    recording: Instant,
    end: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut latencies = new_histogram();
    let mut key = (seed * 1_237) as i64;
    loop {
        let started = Instant::now();
        if started >= end {
            return Ok(latencies);
        }
        let id = (key % i64::from(ROWS)) as i32 + 1;
        let row = client.query_one(&statement, &[&id]).await?;
        let value: &str = row.get(0);
        if value.len() != 32 {
            bail!("unexpected value {value:?} for id {id}");
        }
        if started >= recording {
            latencies.saturating_record(started.elapsed().as_nanos() as u64);
        }
        key += 7_919;
    }
}

/// Runs the bulk COPY once against `target` on a new connection; returns
/// MB/s (10^6 bytes per second).
async fn run_bulk(target: &Target) -> anyhow::Result<f64> {
    let client = target.connect().await?;
    let sql = format!(
        "copy (select repeat('x', {BULK_WIDTH}) from generate_series(1, {BULK_ROWS})) to stdout"
    );
    let started = Instant::now();
    let mut stream = pin!(client.copy_out(&sql).await?);
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let expected = BULK_ROWS * (BULK_WIDTH + 1);
    if bytes != expected {
        bail!("COPY returned {bytes} bytes, expected {expected}");
    }
    Ok(bytes as f64 / 1e6 / seconds)
}

/// Outcome of the bulk case against one target.
struct BulkResult {
    best: f64,
    median: f64,
}

impl BulkResult {
    fn from_runs(mut runs: Vec<f64>) -> BulkResult {
        runs.sort_by(f64::total_cmp);
        BulkResult {
            best: runs[runs.len() - 1],
            median: runs[runs.len() / 2],
        }
    }
}

/// The select case against every target, in order.
/// The select case: [`SELECT_ROUNDS`] rounds, each running every target
/// for a share of the measured time, merged per target, so slow drift of
/// the machine (other load, CPU frequency) spreads over all targets alike.
async fn select_case(targets: &[Target], cfg: &Config) -> Vec<anyhow::Result<SelectResult>> {
    let share = Config {
        measured: cfg.measured / SELECT_ROUNDS,
        ..*cfg
    };
    let mut results: Vec<anyhow::Result<SelectResult>> = targets
        .iter()
        .map(|_| {
            Ok(SelectResult {
                latencies: new_histogram(),
                measured: Duration::ZERO,
            })
        })
        .collect();
    for round in 1..=SELECT_ROUNDS {
        for (target, merged) in targets.iter().zip(results.iter_mut()) {
            let Ok(total) = merged else { continue };
            eprintln!("select: {} round {round}/{SELECT_ROUNDS} ...", target.name);
            match run_select(target, &share).await {
                Ok(r) => {
                    eprintln!("select: {}: {:.1} tps", target.name, r.tps());
                    total.measured += r.measured;
                    if let Err(e) = total.latencies.add(&r.latencies) {
                        *merged = Err(e.into());
                    }
                }
                Err(err) => {
                    eprintln!("select: {}: failed: {err:#}", target.name);
                    *merged = Err(err);
                }
            }
        }
    }
    results
}

/// Rounds of the select case.
const SELECT_ROUNDS: u32 = 3;

/// The bulk case: [`BULK_RUNS`] rounds, each running every target once, so
/// slow drift of the machine spreads over all targets.
async fn bulk_case(targets: &[Target]) -> Vec<anyhow::Result<BulkResult>> {
    let mut runs: Vec<anyhow::Result<Vec<f64>>> = targets.iter().map(|_| Ok(Vec::new())).collect();
    for round in 1..=BULK_RUNS {
        for (target, slot) in targets.iter().zip(&mut runs) {
            let Ok(done) = slot else { continue };
            eprintln!("bulk: {} run {round}/{BULK_RUNS} ...", target.name);
            match run_bulk(target).await {
                Ok(mb_s) => done.push(mb_s),
                Err(err) => *slot = Err(err),
            }
        }
    }
    runs.into_iter()
        .map(|r| r.map(BulkResult::from_runs))
        .collect()
}

/// `value / baseline`, or a dash without a baseline.
fn ratio(value: f64, baseline: Option<f64>) -> String {
    match baseline {
        Some(b) if b > 0.0 => format!("{:.3}", value / b),
        _ => "-".to_owned(),
    }
}

/// Prints the select table; ratios are against the first (direct) row.
fn print_select(targets: &[Target], results: &[anyhow::Result<SelectResult>], cfg: &Config) {
    let title = format!(
        "select, {} clients, {} s",
        cfg.clients,
        cfg.measured.as_secs()
    );
    println!(
        "{title:<28} {:>10} {:>8} {:>8} {:>11} {:>11} {:>11}",
        "tps", "p50 ms", "p99 ms", "tps/direct", "p50/direct", "p99/direct"
    );
    let base = results[0].as_ref().ok();
    for (target, result) in targets.iter().zip(results) {
        match result {
            Ok(r) => println!(
                "{:<28} {:>10.1} {:>8.3} {:>8.3} {:>11} {:>11} {:>11}",
                target.name,
                r.tps(),
                r.ms(0.5),
                r.ms(0.99),
                ratio(r.tps(), base.map(SelectResult::tps)),
                ratio(r.ms(0.5), base.map(|b| b.ms(0.5))),
                ratio(r.ms(0.99), base.map(|b| b.ms(0.99))),
            ),
            Err(err) => println!("{:<28} failed: {err:#}", target.name),
        }
    }
}

/// Prints the bulk table; the ratio is of medians, against direct.
fn print_bulk(targets: &[Target], results: &[anyhow::Result<BulkResult>]) {
    let mb = (BULK_ROWS * (BULK_WIDTH + 1)) as f64 / 1e6;
    let title = format!("bulk COPY TO STDOUT {mb:.0} MB");
    println!(
        "{title:<28} {:>12} {:>14} {:>14}",
        "MB/s (best)", "MB/s (median)", "median/direct"
    );
    let base = results[0].as_ref().ok().map(|b| b.median);
    for (target, result) in targets.iter().zip(results) {
        match result {
            Ok(r) => println!(
                "{:<28} {:>12.1} {:>14.1} {:>14}",
                target.name,
                r.best,
                r.median,
                ratio(r.median, base)
            ),
            Err(err) => println!("{:<28} failed: {err:#}", target.name),
        }
    }
}

/// Everything inside the runtime: table, targets, both cases, tables.
/// Progress goes to stderr, the tables to stdout.
/// Fails at the end if any run failed.
async fn bench(cluster: &LocalCluster, cfg: &Config) -> anyhow::Result<()> {
    create_table(cluster).await?;
    let mut notes = Vec::new();
    let fleet = Fleet::start(cluster, cfg, &mut notes).await?;
    for note in &notes {
        eprintln!("note: {note}");
    }
    let select = select_case(&fleet.targets, cfg).await;
    let bulk = bulk_case(&fleet.targets).await;

    println!();
    print_select(&fleet.targets, &select, cfg);
    println!();
    print_bulk(&fleet.targets, &bulk);
    for note in &notes {
        println!("note: {note}");
    }
    let failed =
        select.iter().filter(|r| r.is_err()).count() + bulk.iter().filter(|r| r.is_err()).count();
    fleet.stop().await;
    if failed > 0 {
        bail!("{failed} run(s) failed");
    }
    Ok(())
}

/// Starts the primary, runs [`bench`] in a multi-thread runtime, then stops
/// everything and prints the wall-clock time of the whole run.
fn main() -> anyhow::Result<()> {
    let began = Instant::now();
    let cfg = Config::load()?;
    common::init_tracing("warn");
    eprintln!("starting a local PostgreSQL primary...");
    let cluster = LocalCluster::start(ClusterOptions {
        standbys: 0,
        ..ClusterOptions::default()
    })
    .context("a local PostgreSQL cluster (are the server binaries installed?)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(bench(&cluster, &cfg));
    drop(runtime);
    drop(cluster);
    println!(
        "\n{} CPUs; whole run {:.1} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        began.elapsed().as_secs_f64()
    );
    outcome
}

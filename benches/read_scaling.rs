//! Read scaling benchmark: what pgpivot costs on reads, and how its
//! `prefer-standby` listener spreads them over the standbys.
//!
//! One run starts a real local cluster ([`LocalCluster`]: a primary and two
//! hot standbys), loads `bench_kv(id int primary key, v text)` with 10,000
//! rows on the primary and waits until both standbys have them. Then, with 8
//! and then 32 concurrent clients, it runs a read-only pgbench-like load
//! against three targets, one after another:
//!
//! * **direct**: the primary itself, the baseline;
//! * **pgpivot read-write**: pgpivot's read-write listener (to the primary);
//! * **pgpivot prefer-standby**: its prefer-standby listener, which places
//!   each session on the least loaded standby.
//!
//! Each client is one tokio-postgres connection running the prepared
//! `select v from bench_kv where id = $1` back to back over keys spread
//! across the table. After a 1 s warm-up every query's latency is recorded
//! for a fixed time (default 5 s, `PGPIVOT_BENCH_SECONDS`) in an HDR
//! histogram. Throughput is queries completed in that window divided by its
//! length. Every client reports the server it landed on
//! (`inet_server_port()` at session start), which gives the spread of
//! sessions and queries over the standbys.
//!
//! pgpivot runs as a separate process (the `target/release/pgpivot` binary
//! that `cargo bench` builds, with a generated TOML config) when that binary
//! exists, otherwise inside this bench's runtime; the output says which.
//!
//! ```text
//! cargo bench --bench read_scaling
//! PGPIVOT_BENCH_SECONDS=10 cargo bench --bench read_scaling
//! ```

// Benches run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls, Statement};

use pgpivot::config::{FileConfig, ListenerConfig};
use pgpivot::localcluster::{free_port, ClusterOptions, LocalCluster, PASSWORD, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::routing::Target;

/// Rows of `bench_kv`.
const ROWS: i32 = 10_000;
/// The one query of the load.
const SELECT_SQL: &str = "select v from bench_kv where id = $1";
/// Concurrent clients of each round.
const CLIENT_COUNTS: [usize; 2] = [8, 32];
/// Time every client runs before latencies are recorded.
const WARMUP: Duration = Duration::from_secs(1);
/// Measured seconds per run unless `PGPIVOT_BENCH_SECONDS` says otherwise.
const DEFAULT_SECONDS: u64 = 5;
/// How long pgpivot and the standbys get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// An endpoint the load runs against.
struct Endpoint {
    name: &'static str,
    port: u16,
}

impl Endpoint {
    /// A new connection as the superuser, its driver task spawned.
    async fn connect(&self) -> anyhow::Result<Client> {
        connect_port(self.port)
            .await
            .with_context(|| format!("cannot connect to {}", self.name))
    }
}

/// A connection to `127.0.0.1:port` as the superuser, its driver spawned.
async fn connect_port(port: u16) -> Result<Client, tokio_postgres::Error> {
    let conn =
        format!("host=127.0.0.1 port={port} user={SUPERUSER} password={PASSWORD} dbname=postgres");
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A running pgpivot with a read-write and a prefer-standby listener.
struct Pgpivot {
    read_write: u16,
    prefer_standby: u16,
    /// How it runs, for the output.
    how: String,
    running: Running,
}

/// What keeps a pgpivot running; dropping it stops it.
enum Running {
    Process(ChildProcess),
    InProcess(Proxy),
}

/// A pgpivot child process, its log, and the directory holding both config
/// and log. Dropping it kills the process (also when a panic unwinds).
struct ChildProcess {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Fails, quoting the log, if a child process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Running::Process(p) = self {
            if let Some(status) = p.child.try_wait()? {
                let text = fs::read_to_string(&p.log).unwrap_or_default();
                bail!("pgpivot exited ({status}):\n{text}");
            }
        }
        Ok(())
    }
}

/// The config of both deployments: two listeners, every node of the
/// cluster, the superuser as monitor, quiet logs.
fn pgpivot_config(
    cluster: &LocalCluster,
    read_write: String,
    prefer_standby: String,
) -> FileConfig {
    let template = FileConfig::default().listeners.remove(0);
    let listener = |address, target| ListenerConfig {
        address,
        target,
        ..template.clone()
    };
    let mut file = FileConfig {
        listeners: vec![
            listener(read_write, Target::ReadWrite),
            listener(prefer_standby, Target::PreferStandby),
        ],
        ..FileConfig::default()
    };
    file.nodes = pgpivot::demo::file_config(cluster, Vec::new()).nodes;
    file.monitor.user = SUPERUSER.into();
    file.monitor.password = PASSWORD.into();
    file.log.filter = "warn".into();
    file
}

/// Runs the `pgpivot` binary with a generated config on two free ports.
fn start_process(binary: &Path, cluster: &LocalCluster) -> anyhow::Result<Pgpivot> {
    let (read_write, prefer_standby) = (free_port(), free_port());
    let addr = |port| format!("127.0.0.1:{port}");
    let dir = TempDir::with_prefix("pgpivot-read-scaling-")?;
    let config = dir.path().join("pgpivot.toml");
    let file = pgpivot_config(cluster, addr(read_write), addr(prefer_standby));
    fs::write(&config, toml::to_string(&file)?)?;
    let log = dir.path().join("pgpivot.log");
    let out = File::create(&log)?;
    let child = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    Ok(Pgpivot {
        read_write,
        prefer_standby,
        how: format!("separate process ({})", binary.display()),
        running: Running::Process(ChildProcess {
            child,
            log,
            _dir: dir,
        }),
    })
}

/// Starts pgpivot inside this runtime.
async fn start_in_process(cluster: &LocalCluster) -> anyhow::Result<Pgpivot> {
    let any = || "127.0.0.1:0".to_string();
    let proxy = Proxy::start(pgpivot_config(cluster, any(), any()).validate()?).await?;
    Ok(Pgpivot {
        read_write: proxy.addresses[0].port(),
        prefer_standby: proxy.addresses[1].port(),
        how: "in-process (no pgpivot binary found; it shares this bench's runtime)".into(),
        running: Running::InProcess(proxy),
    })
}

/// The pgpivot binary cargo built for this bench, when it exists.
fn pgpivot_binary() -> Option<PathBuf> {
    Some(PathBuf::from(env!("CARGO_BIN_EXE_pgpivot"))).filter(|p| p.is_file())
}

/// Whether the read-write listener answers and sessions through the
/// prefer-standby listener reach every standby: four sessions opened
/// together cover both standbys once pgpivot has seen them.
async fn ready(pgpivot: &Pgpivot, standby_ports: &[i32]) -> bool {
    let Ok(writer) = connect_port(pgpivot.read_write).await else {
        return false;
    };
    if writer.simple_query("select 1").await.is_err() {
        return false;
    }
    let sessions = (0..4).map(|_| landing(pgpivot.prefer_standby));
    let landed = futures_util::future::join_all(sessions).await;
    standby_ports.iter().all(|p| {
        landed
            .iter()
            .any(|l| l.as_ref().ok().map(|(_, port)| port) == Some(p))
    })
}

/// A session through `port` and the server port it landed on.
async fn landing(port: u16) -> anyhow::Result<(Client, i32)> {
    let client = connect_port(port).await?;
    let landed = client
        .query_one("select inet_server_port()", &[])
        .await?
        .get(0);
    Ok((client, landed))
}

/// Waits until `pgpivot` is [`ready`]; fails early if its process exits.
async fn wait_ready(pgpivot: &mut Pgpivot, standby_ports: &[i32]) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ready(pgpivot, standby_ports).await {
        pgpivot.running.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "pgpivot did not route to the primary and both standbys within {READY_TIMEOUT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Creates and fills `bench_kv` on the primary, then waits until every
/// standby has all of it.
async fn create_table(cluster: &LocalCluster) -> anyhow::Result<()> {
    let primary = connect_port(cluster.node(0).port).await?;
    primary
        .batch_execute(&format!(
            "drop table if exists bench_kv;
             create table bench_kv(id int primary key, v text);
             insert into bench_kv select g, md5(g::text) from generate_series(1, {ROWS}) g;"
        ))
        .await?;
    // On its own: a multi-statement query is one transaction, and VACUUM
    // refuses to run in one.
    primary.batch_execute("vacuum analyze bench_kv").await?;
    let deadline = Instant::now() + READY_TIMEOUT;
    for standby in &cluster.nodes()[1..] {
        let client = connect_port(standby.port).await?;
        let count = "select count(*) from bench_kv";
        while client
            .query_one(count, &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .ok()
            != Some(ROWS.into())
        {
            if Instant::now() >= deadline {
                bail!("{} did not replay bench_kv", standby.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// An empty latency histogram: nanoseconds, 1 µs to 60 s, 3 significant
/// digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// What one client did in the measured window.
struct ClientRun {
    port: i32,
    latencies: Histogram<u64>,
}

/// The load of one run against one endpoint.
struct LoadResult {
    latencies: Histogram<u64>,
    measured: Duration,
    /// Server port → (sessions, queries in the measured window).
    by_port: BTreeMap<i32, (usize, u64)>,
}

impl LoadResult {
    fn tps(&self) -> f64 {
        self.latencies.len() as f64 / self.measured.as_secs_f64()
    }

    /// Latency at `quantile`, in milliseconds.
    fn ms(&self, quantile: f64) -> f64 {
        self.latencies.value_at_quantile(quantile) as f64 / 1e6
    }
}

/// Runs `clients` clients against `endpoint`: connects and prepares all of
/// them first, then starts them together.
async fn run_load(
    endpoint: &Endpoint,
    clients: usize,
    measured: Duration,
) -> anyhow::Result<LoadResult> {
    let mut ready = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = endpoint.connect().await?;
        let port: i32 = client
            .query_one("select inet_server_port()", &[])
            .await?
            .get(0);
        let statement = client.prepare(SELECT_SQL).await?;
        ready.push((client, statement, port));
    }
    let recording = Instant::now() + WARMUP;
    let end = recording + measured;
    let tasks: Vec<_> = ready
        .into_iter()
        .enumerate()
        .map(|(i, (client, statement, port))| {
            tokio::spawn(client_loop(client, statement, port, i, recording, end))
        })
        .collect();
    let mut result = LoadResult {
        latencies: new_histogram(),
        measured,
        by_port: BTreeMap::new(),
    };
    for task in tasks {
        let run = task.await??;
        let entry = result.by_port.entry(run.port).or_default();
        entry.0 += 1;
        entry.1 += run.latencies.len();
        result.latencies.add(run.latencies)?;
    }
    Ok(result)
}

/// One client: queries back to back until `end`, recording the latency of
/// each query started at or after `recording`. Client `seed` walks the keys
/// with a prime stride from its own offset.
async fn client_loop(
    client: Client,
    statement: Statement,
    port: i32,
    seed: usize,
    recording: Instant,
    end: Instant,
) -> anyhow::Result<ClientRun> {
    let mut latencies = new_histogram();
    let mut key = (seed * 1_237) as i64;
    loop {
        let started = Instant::now();
        if started >= end {
            return Ok(ClientRun { port, latencies });
        }
        let id = (key % i64::from(ROWS)) as i32 + 1;
        client.query_one(&statement, &[&id]).await?;
        if started >= recording {
            latencies.saturating_record(started.elapsed().as_nanos() as u64);
        }
        key += 7_919;
    }
}

/// `value / baseline` to three decimals.
fn ratio(value: f64, baseline: f64) -> String {
    if baseline > 0.0 {
        format!("{:.3}", value / baseline)
    } else {
        "-".to_owned()
    }
}

/// Prints one table row; ratios against `direct`.
fn print_row(clients: usize, name: &str, r: &LoadResult, direct: &LoadResult) {
    println!(
        "{clients:>7}  {name:<24} {:>10.1} {:>8.3} {:>8.3} {:>10} {:>10} {:>10}",
        r.tps(),
        r.ms(0.5),
        r.ms(0.99),
        ratio(r.tps(), direct.tps()),
        ratio(r.ms(0.5), direct.ms(0.5)),
        ratio(r.ms(0.99), direct.ms(0.99)),
    );
}

/// Prints how the sessions and queries of a run spread over the servers.
fn print_spread(cluster: &LocalCluster, r: &LoadResult) {
    let queries: u64 = r.by_port.values().map(|&(_, q)| q).sum();
    for (port, (sessions, q)) in &r.by_port {
        let name = cluster
            .nodes()
            .iter()
            .find(|n| i32::from(n.port) == *port)
            .map_or("?", |n| n.name.as_str());
        let share = 100.0 * *q as f64 / queries.max(1) as f64;
        println!(
            "{:>9}{name} (port {port}): {sessions} sessions, {q} queries ({share:.1}%)",
            ""
        );
    }
}

/// Prints the header: what was measured and how to read it.
fn print_header(pgpivot: &Pgpivot, measured: Duration) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("read scaling: prepared single-row SELECT by primary key on {ROWS} rows,");
    println!(
        "{} s per run after a {} s warm-up",
        measured.as_secs(),
        WARMUP.as_secs()
    );
    println!("pgpivot: {}", pgpivot.how);
    println!(
        "{cpus} CPUs shared by the primary, both standbys, pgpivot and this load generator: throughput\n\
         is bounded by the CPUs, not by the number of standbys. The figures that matter are the\n\
         proxy's overhead ratio (read-write vs direct) and that prefer-standby spreads evenly."
    );
    println!();
    println!(
        "{:>7}  {:<24} {:>10} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "clients", "target", "tps", "p50 ms", "p99 ms", "tps/dir", "p50/dir", "p99/dir"
    );
}

/// Everything inside the runtime: table, pgpivot, every run, the tables.
async fn bench(cluster: &LocalCluster, measured: Duration) -> anyhow::Result<()> {
    create_table(cluster).await?;
    let mut pgpivot = match pgpivot_binary() {
        Some(binary) => start_process(&binary, cluster)?,
        None => start_in_process(cluster).await?,
    };
    let standby_ports: Vec<i32> = cluster.nodes()[1..].iter().map(|n| n.port.into()).collect();
    wait_ready(&mut pgpivot, &standby_ports).await?;
    let endpoints = [
        Endpoint {
            name: "direct (primary)",
            port: cluster.node(0).port,
        },
        Endpoint {
            name: "pgpivot read-write",
            port: pgpivot.read_write,
        },
        Endpoint {
            name: "pgpivot prefer-standby",
            port: pgpivot.prefer_standby,
        },
    ];
    let mut rounds = Vec::new();
    for clients in CLIENT_COUNTS {
        let mut results = Vec::new();
        for endpoint in &endpoints {
            eprintln!("{clients} clients: {} ...", endpoint.name);
            results.push(run_load(endpoint, clients, measured).await?);
        }
        rounds.push((clients, results));
    }
    print_header(&pgpivot, measured);
    for (clients, results) in &rounds {
        for (endpoint, result) in endpoints.iter().zip(results) {
            print_row(*clients, endpoint.name, result, &results[0]);
        }
        print_spread(cluster, &results[2]);
    }
    if let Running::InProcess(proxy) = pgpivot.running {
        proxy.shutdown(Duration::from_secs(5)).await;
    }
    Ok(())
}

/// Measured seconds per run: `PGPIVOT_BENCH_SECONDS`, else the default.
fn measured() -> anyhow::Result<Duration> {
    let seconds = match std::env::var("PGPIVOT_BENCH_SECONDS") {
        Ok(s) => s
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .context("PGPIVOT_BENCH_SECONDS must be a positive integer")?,
        Err(_) => DEFAULT_SECONDS,
    };
    Ok(Duration::from_secs(seconds))
}

fn main() -> anyhow::Result<()> {
    let began = Instant::now();
    let measured = measured()?;
    common::init_tracing("warn");
    eprintln!("starting a local primary with two standbys...");
    let cluster = LocalCluster::start(ClusterOptions {
        standbys: 2,
        ..ClusterOptions::default()
    })
    .context("a local PostgreSQL cluster (are the server binaries installed?)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(bench(&cluster, measured));
    drop(runtime);
    drop(cluster);
    println!("\nwhole run {:.1} s", began.elapsed().as_secs_f64());
    outcome
}

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
//! * **bulk**: one client moves 100 MB each way, `COPY … TO STDOUT` and
//!   `COPY … FROM STDIN` (see `common/bulk.rs`); MB/s, best and median of
//!   seven interleaved runs per target.
//!
//! Targets, each reached through the same connection string shape:
//!
//! * `direct`: the primary itself, the baseline.
//! * `direct (unix)`: the primary over its Unix socket (the baseline a
//!   client on the database host has).
//! * `pgpivot FLAVOR xN`: the `pgpivot` binary as `cargo build --release`
//!   makes it (the bench builds it in `target/shipped` first: the binary
//!   cargo builds beside a bench has the dev-dependencies' features, tokio's
//!   `test-util` among them, which costs about 2 % more instructions), as a
//!   child process with a generated TOML config (a process of
//!   its own, like PgBouncer and HAProxy), once per `--runtimes` entry
//!   (`[runtime] flavor` and `workers`), so the runtimes are compared in one
//!   run, in the same interleaved rounds.
//! * `pgpivot (unix)`: the first runtime with every node given as its Unix
//!   socket (`<cluster>/sockets/.s.PGSQL.<port>`): the hop of a proxy on
//!   the database host, next to the TCP one.
//! * `pgpivot (relay_timing off)`: the first runtime with `[metrics]
//!   relay_timing = false`, so the pair shows what the per-round-trip
//!   metrics cost.
//! * `pgpivot (move_sessions off)`: the first runtime with `[failover]
//!   move_sessions = false`: no session state tracked, so the pair shows
//!   what tracking for moves costs.
//! * `pgpivot (in-process)` (with `--pgpivot in-process|both`):
//!   [`Proxy::start`] inside this bench's tokio runtime, sharing its worker
//!   threads with the load generator; not comparable to the other proxies.
//! * `pgbouncer (session)` and `haproxy (tcp)`: children started from
//!   configs in temporary directories, if `pgbouncer` / `haproxy` are on the
//!   machine (the bench tries `apt-get install` once when they are missing).
//!
//! * **cost** (the figures to compare proxies by): pgbench `-n -S -M
//!   extended -c 8 -j 2 -R RATE -T SECS`, a fixed rate below every target's
//!   maximum, in interleaved rounds; per transaction actually processed, the
//!   proxy process's CPU (utime+stime, `/proc/PID/stat`), the machine's busy
//!   CPU (`/proc/stat`; `hop` is that minus direct's), the proxy's context
//!   switches (`/proc/PID/task/*/status`) and, from one more run per target
//!   with `perf stat -e raw_syscalls:sys_enter -p PID` attached, its
//!   syscalls; medians, with ratios to PgBouncer's. The method of
//!   `shared/tools/cost.sh`; see `common/cost.rs`.
//! * **callgrind**: pgpivot (also with `move_sessions` off), PgBouncer and
//!   HAProxy under `valgrind --tool=callgrind`, user-space instructions per
//!   transaction and per connection opened, with ratios to PgBouncer's
//!   (pgbench `-t` windows, each in a fresh process; see
//!   `common/callgrind.rs`). Repeatable where CPU time is not, but blind to
//!   the kernel's share. Skipped with a note when valgrind is missing.
//! * **memory**: resident memory (`VmRSS`, and its anonymous part) per idle
//!   session of a fresh process of every target at 1,000 sessions, and after
//!   each of them ran a 1 MiB result and went idle again; pgpivot and
//!   PgBouncer also with TLS clients (see `common/memory.rs`).
//!
//! How to read the tables: `tps/direct` below 1 is the throughput a hop
//! costs; `p50/direct` and `p99/direct` above 1 are the latency it adds.
//! Everything (servers, proxies and load generator) shares this machine's
//! CPUs, so with few cores the saturated ratios also measure CPU contention,
//! not only relay overhead, and move ±10 % between runs; the cost table's
//! CPU per transaction at a fixed rate is the steadier comparison. Compare
//! rows of one run rather than runs on different machines.
//!
//! Knobs (command line first, then environment, then default):
//!
//! | flag | env | default | what |
//! | --- | --- | --- | --- |
//! | `--clients` | `PGPIVOT_BENCH_CLIENTS` | 8 | select-case clients |
//! | `--seconds` | `PGPIVOT_BENCH_SECONDS` | 10 | select-case seconds per target |
//! | `--rate` | `RELAY_BENCH_RATE` | 4000 | cost case: pgbench `-R` (tx/s) |
//! | `--cost-seconds` | `RELAY_BENCH_SECS` | 10 | cost case: pgbench `-T` per round |
//! | `--rounds` | `RELAY_BENCH_ROUNDS` | 3 | cost case: interleaved rounds |
//! | `--callgrind-tx` | `RELAY_BENCH_CALLGRIND_TX` | 2500 | callgrind: tx per client (2 clients) of the big window; 0 skips |
//! | `--callgrind-keep` | | | callgrind: copy every window's dump into this directory |
//! | `--pgpivot-binary` | `RELAY_BENCH_PGPIVOT` | built in `target/shipped` | the pgpivot binary measured (e.g. another commit's, to compare) |
//! | `--memory-sessions` | `RELAY_BENCH_MEMORY_SESSIONS` | 1000 | memory: sessions held open at once |
//! | `--cases` | `RELAY_BENCH_CASES` | select,bulk,cost,callgrind,memory | which cases run |
//! | `--runtimes` | `RELAY_BENCH_RUNTIMES` | per-core,multi-thread,per-core:1 | pgpivot `[runtime]`s, `flavor[:workers]`, one target each |
//! | `--no-syscalls` | | | cost case without the perf pass |
//! | `--pgpivot` | | process | process, in-process or both |
//!
//! The default run takes about 11 minutes on 2 cores (cost ≈ 4 min with
//! three runtimes, callgrind ≈ 1 min, memory ≈ 1.5 min), plus about 2 min
//! the first time to build the shipped binary.
//!
//! ```text
//! cargo bench --bench relay
//! cargo bench --bench relay -- --clients 16 --seconds 5 --pgpivot process
//! cargo bench --bench relay -- --cases cost --rate 2000 --cost-seconds 5 --rounds 1
//! PGPIVOT_BENCH_CLIENTS=4 PGPIVOT_BENCH_SECONDS=3 RELAY_BENCH_CASES=cost,callgrind cargo bench --bench relay
//! ```

// Benches run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

#[path = "common/bulk.rs"]
mod bulk;
#[path = "common/callgrind.rs"]
mod callgrind;
mod common;
#[path = "common/cost.rs"]
mod cost;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/knobs.rs"]
mod knobs;
#[path = "common/memory.rs"]
mod memory;
#[path = "common/tls_client.rs"]
mod tls_client;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio_postgres::{Client, Statement};

use pgpivot::localcluster::{ClusterOptions, LocalCluster};

use bulk::{bulk_case, print_bulk};
use callgrind::{callgrind_cases, print_callgrind, CallgrindParams};
use cost::{cost_case, pgbench_init, print_cost, CostParams};
use fleet::{Fleet, PgpivotMode, RuntimeChoice, Target};
use memory::{memory_case, print_memory, MemoryParams};

/// Rows of `bench_kv`.
const ROWS: i32 = 10_000;
/// The select case's query.
const SELECT_SQL: &str = "select v from bench_kv where id = $1";
/// Time every select client runs before latencies are recorded.
const WARMUP: Duration = Duration::from_secs(1);
/// pgbench clients of the callgrind case.
const CALLGRIND_CLIENTS: u32 = 2;
/// pgpivot runtimes measured when none is asked for: the default, the
/// previous default, and one worker thread.
const DEFAULT_RUNTIMES: &str = "per-core,multi-thread,per-core:1";

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
    /// Cost case: pgbench rate, tx/s [env: RELAY_BENCH_RATE] [default: 4000].
    #[arg(long)]
    rate: Option<u32>,
    /// Cost case: seconds per run [env: RELAY_BENCH_SECS] [default: 10].
    #[arg(long)]
    cost_seconds: Option<u64>,
    /// Cost case: interleaved rounds [env: RELAY_BENCH_ROUNDS] [default: 3].
    #[arg(long)]
    rounds: Option<usize>,
    /// Callgrind case: transactions per client of the big window, 0 skips
    /// the case [env: RELAY_BENCH_CALLGRIND_TX] [default: 2500].
    #[arg(long)]
    callgrind_tx: Option<u64>,
    /// Callgrind case: keep every window's dump in this directory, for
    /// `callgrind_annotate`.
    #[arg(long)]
    callgrind_keep: Option<PathBuf>,
    /// Cases to run, comma-separated [env: RELAY_BENCH_CASES] [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    cases: Vec<Case>,
    /// Memory case: sessions held open at once
    /// [env: RELAY_BENCH_MEMORY_SESSIONS] [default: 1000].
    #[arg(long)]
    memory_sessions: Option<usize>,
    /// Cost case without the perf pass for syscalls per transaction.
    #[arg(long)]
    no_syscalls: bool,
    /// Which pgpivot deployments to measure.
    #[arg(long, value_enum, default_value_t = PgpivotMode::Process)]
    pgpivot: PgpivotMode,
    /// pgpivot `[runtime]`s to measure side by side, comma-separated
    /// `flavor[:workers]` [env: RELAY_BENCH_RUNTIMES]
    /// [default: per-core,multi-thread,per-core:1].
    #[arg(long, value_delimiter = ',')]
    runtimes: Vec<RuntimeChoice>,
    /// The `pgpivot` binary to measure [env: RELAY_BENCH_PGPIVOT]
    /// [default: built as `cargo build --release` does, in target/shipped].
    #[arg(long)]
    pgpivot_binary: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A part of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Case {
    /// Saturated prepared selects.
    Select,
    /// Bulk COPY out.
    Bulk,
    /// CPU per transaction at a fixed rate.
    Cost,
    /// Each proxy's instructions per transaction under callgrind.
    Callgrind,
    /// Resident memory per idle session at 1,000 sessions.
    Memory,
}

/// The resolved run parameters.
#[derive(Debug)]
struct Config {
    clients: usize,
    binary: PathBuf,
    measured: Duration,
    pgpivot: PgpivotMode,
    runtimes: Vec<RuntimeChoice>,
    cases: Vec<Case>,
    cost: CostParams,
    callgrind: CallgrindParams,
    memory: MemoryParams,
}

impl Config {
    /// Command line first, then the environment, then the defaults.
    fn load() -> anyhow::Result<Config> {
        let opts = Options::parse();
        let clients = knobs::pick(opts.clients, "PGPIVOT_BENCH_CLIENTS", 8)?;
        let seconds = knobs::pick(opts.seconds, "PGPIVOT_BENCH_SECONDS", 10)?;
        let rate = knobs::pick(opts.rate, "RELAY_BENCH_RATE", 4000)?;
        let cost_seconds = knobs::pick(opts.cost_seconds, "RELAY_BENCH_SECS", 10)?;
        let rounds = knobs::pick(opts.rounds, "RELAY_BENCH_ROUNDS", 3)?;
        let callgrind_tx = knobs::pick(opts.callgrind_tx, "RELAY_BENCH_CALLGRIND_TX", 2500)?;
        let memory_sessions =
            knobs::pick(opts.memory_sessions, "RELAY_BENCH_MEMORY_SESSIONS", 1000)?;
        if clients == 0 || seconds == 0 || rate == 0 || cost_seconds == 0 || rounds == 0 {
            bail!("clients, seconds, rate, cost seconds and rounds must be at least 1");
        }
        let mut cases = opts.cases;
        if cases.is_empty() {
            cases = match std::env::var("RELAY_BENCH_CASES") {
                Ok(list) => list
                    .split(',')
                    .map(|c| {
                        <Case as ValueEnum>::from_str(c.trim(), true)
                            .map_err(|e| anyhow!("RELAY_BENCH_CASES: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                Err(_) => vec![
                    Case::Select,
                    Case::Bulk,
                    Case::Cost,
                    Case::Callgrind,
                    Case::Memory,
                ],
            };
        }
        let mut runtimes = opts.runtimes;
        if runtimes.is_empty() {
            let list = std::env::var("RELAY_BENCH_RUNTIMES")
                .unwrap_or_else(|_| DEFAULT_RUNTIMES.to_owned());
            runtimes = list
                .split(',')
                .map(str::parse)
                .collect::<anyhow::Result<_>>()
                .context("RELAY_BENCH_RUNTIMES")?;
        }
        if callgrind_tx == 0 {
            cases.retain(|c| *c != Case::Callgrind);
        }
        let binary = match opts
            .pgpivot_binary
            .or_else(|| std::env::var_os("RELAY_BENCH_PGPIVOT").map(PathBuf::from))
        {
            Some(path) => path,
            None => fleet::shipped_binary()?,
        };
        Ok(Config {
            clients,
            binary,
            measured: Duration::from_secs(seconds),
            pgpivot: opts.pgpivot,
            runtimes,
            cases,
            cost: CostParams {
                rate,
                seconds: cost_seconds,
                rounds,
                syscalls: !opts.no_syscalls,
            },
            callgrind: CallgrindParams {
                tx_per_client: callgrind_tx,
                clients: CALLGRIND_CLIENTS,
                keep: opts.callgrind_keep,
            },
            memory: MemoryParams {
                sessions: memory_sessions.max(1),
            },
        })
    }

    fn runs(&self, case: Case) -> bool {
        self.cases.contains(&case)
    }
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
    bulk::create_sink(&client).await?;
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
async fn run_select(
    target: &Target,
    n_clients: usize,
    measured: Duration,
) -> anyhow::Result<SelectResult> {
    let mut clients = Vec::with_capacity(n_clients);
    for _ in 0..n_clients {
        let client = target.connect().await?;
        let statement = client.prepare(SELECT_SQL).await?;
        clients.push((client, statement));
    }
    let recording = Instant::now() + WARMUP;
    let end = recording + measured;
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
        measured,
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

/// The select case against every target, in order.
/// The select case: [`SELECT_ROUNDS`] rounds, each running every target
/// for a share of the measured time, merged per target, so slow drift of
/// the machine (other load, CPU frequency) spreads over all targets alike.
async fn select_case(targets: &[Target], cfg: &Config) -> Vec<anyhow::Result<SelectResult>> {
    let share = cfg.measured / SELECT_ROUNDS;
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
            match run_select(target, cfg.clients, share).await {
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

/// Everything inside the runtime: tables, targets, the cases, the printed
/// tables. Progress goes to stderr, the tables to stdout.
/// Fails at the end if any run failed.
async fn bench(cluster: &LocalCluster, cfg: &Config) -> anyhow::Result<()> {
    create_table(cluster).await?;
    if cfg.runs(Case::Cost) || cfg.runs(Case::Callgrind) {
        pgbench_init(cluster).await?;
    }
    let mut notes = Vec::new();
    let binary = cfg.binary.as_path();
    let fleet = Fleet::start(
        cluster,
        binary,
        cfg.pgpivot,
        &cfg.runtimes,
        cfg.clients,
        &mut notes,
    )
    .await?;
    for note in &notes {
        eprintln!("note: {note}");
    }
    let targets = &fleet.targets;
    let select = if cfg.runs(Case::Select) {
        select_case(targets, cfg).await
    } else {
        Vec::new()
    };
    let bulk = if cfg.runs(Case::Bulk) {
        bulk_case(targets).await
    } else {
        Vec::new()
    };
    let cost = if cfg.runs(Case::Cost) {
        cost_case(cluster, targets, &cfg.cost, &mut notes).await
    } else {
        Vec::new()
    };
    // pgpivot as configured by default, and without session moves (no
    // state tracking): the difference is what tracking costs.
    let callgrind = if cfg.runs(Case::Callgrind) {
        callgrind_cases(cluster, binary, &cfg.callgrind, &mut notes).await
    } else {
        Vec::new()
    };
    let memory = if cfg.runs(Case::Memory) {
        memory_case(cluster, binary, &cfg.runtimes, &cfg.memory, &mut notes).await?
    } else {
        Vec::new()
    };

    if !select.is_empty() {
        println!();
        print_select(targets, &select, cfg);
    }
    if !bulk.is_empty() {
        println!();
        print_bulk(targets, &bulk);
    }
    if !cost.is_empty() {
        println!();
        print_cost(targets, &cost, &cfg.cost);
    }
    if !callgrind.is_empty() {
        println!();
        print_callgrind(&callgrind, &cfg.callgrind);
    }
    if !memory.is_empty() {
        println!();
        print_memory(&memory, &cfg.memory);
    }
    for note in &notes {
        println!("note: {note}");
    }
    let failed = select.iter().filter(|r| r.is_err()).count()
        + bulk::failures(&bulk)
        + cost.iter().filter(|r| r.is_err()).count()
        + memory.iter().filter(|(_, r)| r.is_err()).count();
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
    // The memory case holds that many sessions, each with its backend.
    let extra_conf = if cfg.runs(Case::Memory) {
        vec![format!("max_connections = {}", cfg.memory.sessions + 100)]
    } else {
        Vec::new()
    };
    let cluster = LocalCluster::start(ClusterOptions {
        standbys: 0,
        extra_conf,
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

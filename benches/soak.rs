//! Soak benchmark: 1,000 concurrent client sessions through pgpivot for
//! 10 minutes, and whether pgpivot's memory, file descriptors and threads
//! stay flat.
//!
//! One run starts a local primary with one hot standby ([`LocalCluster`],
//! `max_connections` = sessions + 100), fills `soak_kv(id int primary key,
//! v text)` with 10,000 rows, and starts the `pgpivot` binary that cargo
//! built next to this bench as a process of its own (so its RSS, fds and
//! threads are its own), with a read-write listener, `[tls] mode =
//! "prefer"` on an rcgen self-signed certificate, `[limits]
//! max_client_connections` = sessions + 100 and the admin endpoint. Then
//! the sessions of `common/soak_load.rs` connect (16 at a time) and play
//! their roles: most run a short query every second or so, 5 % COPY a few
//! hundred KB out or in every 5–15 s, 10 % stay idle, 5 % disconnect and
//! reconnect every 5–15 s; one session in ten goes through TLS.
//!
//! pgpivot is read at the start (before any session), once all sessions
//! are connected, every `--sample-seconds` (60) of the run, at its end
//! (still loaded) and after every session closed: `VmRSS` and `Threads`
//! from `/proc/PID/status`, open fds (`/proc/PID/fd`), CPU since the last
//! reading (`/proc/PID/stat`), `pgpivot_client_sessions_active` from its
//! `/metrics` (pgpivot exports no tokio task count; the sessions gauge is
//! the nearest figure), and the client backends PostgreSQL counts, next to
//! the clients' queries per second and short-query latency. The verdict:
//! RSS, fds and threads are flat when every reading from the first one at
//! least `--warmup-seconds` (60) into the run to the end stays within 5 %
//! of that one. Client errors, by SQLSTATE, must be 0; the bench exits with
//! an error otherwise.
//!
//! Reading RSS: each relayed session holds two 64 KiB read buffers
//! (`READ_CHUNK` in `session/relay.rs`), allocated at once but resident
//! only as the relay's reads walk through them (a read lands after the
//! bytes consumed so far; the buffer is rewound when less than 16 KiB is
//! left). A short session therefore adds resident memory at the rate it
//! relays bytes until it has relayed about 48 KiB each way, ~650–1,150
//! short queries, and then stops: about 100 KiB per session. At the default
//! one query a second that takes 11–17 minutes, so a 10-minute run ends
//! while RSS still climbs; `--query-ms 500 --minutes 14
//! --warmup-seconds 600` shows the plateau.
//!
//! Knobs (command line first, then environment, then default):
//!
//! | flag | env | default | what |
//! | --- | --- | --- | --- |
//! | `--minutes` | `SOAK_MINUTES` | 10 | length of the run (after the ramp-up) |
//! | `--seconds` | `SOAK_SECONDS` | | length in seconds, overrides minutes (smoke runs) |
//! | `--sessions` | `SOAK_SESSIONS` | 1000 | concurrent client sessions |
//! | `--sample-seconds` | `SOAK_SAMPLE_SECONDS` | 60 | time between readings |
//! | `--query-ms` | `SOAK_QUERY_MS` | 1000 | mean pause between a short session's queries |
//! | `--tls-every` | `SOAK_TLS_EVERY` | 10 | one session in this many uses TLS (0: none) |
//! | `--mix` | `SOAK_MIX` | 10:5:5 | percent of idle, copy and churn sessions; the rest are short |
//! | `--warmup-seconds` | `SOAK_WARMUP_SECONDS` | 60 | flatness is judged from the first reading this far into the run |
//! | `--pgpivot-toml` | `SOAK_PGPIVOT_TOML` | | TOML appended to pgpivot's config |
//! | `--pgpivot-wrapper` | `SOAK_PGPIVOT_WRAPPER` | | command pgpivot runs under, e.g. `heaptrack -o /tmp/soak` |
//!
//! ```text
//! cargo bench --bench soak
//! cargo bench --bench soak -- --minutes 3
//! SOAK_SECONDS=40 SOAK_SAMPLE_SECONDS=10 SOAK_SESSIONS=200 cargo bench --bench soak
//! ```

// Benches run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/knobs.rs"]
mod knobs;
// Only the pgpivot process helpers of the relay bench's fleet are used,
// and its build of the shipped binary.
#[allow(dead_code)]
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/soak_load.rs"]
mod soak_load;
#[path = "common/soak_probe.rs"]
mod soak_probe;
// pgpivot's certificate; the fleet's TLS targets need the rest.
#[allow(dead_code)]
#[path = "common/tls_client.rs"]
mod tls_client;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tokio_util::sync::CancellationToken;

use pgpivot::backend_tls::{BackendTls, SslMode};
use pgpivot::localcluster::{free_port, ClusterOptions, LocalCluster, PASSWORD, SUPERUSER};

use fleet::{Peer, Target, READY_TIMEOUT};
use soak_load::{start_sessions, Endpoint, Mix, Totals, KV_ROWS};
use soak_probe::{clock_ticks, descendant, flatness, header, row, Probe, Reading, FLAT_TOLERANCE};
use tls_client::SelfSigned;

/// How long closing sessions get to leave pgpivot at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Command line, after `cargo bench --bench soak --`.
#[derive(Parser, Debug)]
#[command(about = "pgpivot soak benchmark")]
struct Options {
    /// Length of the run in minutes [env: SOAK_MINUTES] [default: 10].
    #[arg(long)]
    minutes: Option<u64>,
    /// Length of the run in seconds, instead of minutes [env: SOAK_SECONDS].
    #[arg(long)]
    seconds: Option<u64>,
    /// Concurrent client sessions [env: SOAK_SESSIONS] [default: 1000].
    #[arg(long)]
    sessions: Option<usize>,
    /// Seconds between readings [env: SOAK_SAMPLE_SECONDS] [default: 60].
    #[arg(long)]
    sample_seconds: Option<u64>,
    /// Mean pause between a short session's queries, ms [env: SOAK_QUERY_MS]
    /// [default: 1000].
    #[arg(long)]
    query_ms: Option<u64>,
    /// One session in this many uses TLS, 0 for none [env: SOAK_TLS_EVERY]
    /// [default: 10].
    #[arg(long)]
    tls_every: Option<usize>,
    /// Shares of idle, copy and churn sessions in percent, the rest short
    /// [env: SOAK_MIX] [default: 10:5:5].
    #[arg(long)]
    mix: Option<Mix>,
    /// TOML appended to pgpivot's config, e.g. `[metrics]
    /// relay_timing = false` [env: SOAK_PGPIVOT_TOML].
    #[arg(long)]
    pgpivot_toml: Option<String>,
    /// Command prefix pgpivot runs under, e.g. `heaptrack -o /tmp/soak`
    /// (readings then follow the `pgpivot` process below it, which gets a
    /// SIGTERM at the end) [env: SOAK_PGPIVOT_WRAPPER].
    #[arg(long)]
    pgpivot_wrapper: Option<String>,
    /// The reading flatness is judged from: the first one at least this
    /// many seconds into the run [env: SOAK_WARMUP_SECONDS] [default: 60].
    #[arg(long)]
    warmup_seconds: Option<u64>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The resolved run parameters.
struct Config {
    run: Duration,
    sessions: usize,
    sample: Duration,
    query_interval: Duration,
    tls_every: usize,
    mix: Mix,
    pgpivot_toml: String,
    wrapper: Vec<String>,
    warmup: Duration,
    /// The binary `cargo build --release` makes, not the bench build's
    /// (which has tokio's test-util on).
    binary: PathBuf,
}

impl Config {
    fn load() -> anyhow::Result<Config> {
        let opts = Options::parse();
        let minutes = knobs::pick(opts.minutes, "SOAK_MINUTES", 10)?;
        let seconds = match opts.seconds {
            Some(s) => Some(s),
            None => knobs::env_var("SOAK_SECONDS").transpose()?,
        };
        let run = Duration::from_secs(seconds.unwrap_or(minutes * 60));
        let config = Config {
            run,
            sessions: knobs::pick(opts.sessions, "SOAK_SESSIONS", 1000)?,
            sample: Duration::from_secs(knobs::pick(
                opts.sample_seconds,
                "SOAK_SAMPLE_SECONDS",
                60,
            )?),
            query_interval: Duration::from_millis(knobs::pick(
                opts.query_ms,
                "SOAK_QUERY_MS",
                1000,
            )?),
            tls_every: knobs::pick(opts.tls_every, "SOAK_TLS_EVERY", 10)?,
            mix: knobs::pick(opts.mix, "SOAK_MIX", Mix::default())?,
            pgpivot_toml: knobs::pick(opts.pgpivot_toml, "SOAK_PGPIVOT_TOML", String::new())?,
            wrapper: knobs::pick(opts.pgpivot_wrapper, "SOAK_PGPIVOT_WRAPPER", String::new())?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            warmup: Duration::from_secs(knobs::pick(
                opts.warmup_seconds,
                "SOAK_WARMUP_SECONDS",
                60,
            )?),
            binary: fleet::shipped_binary()?,
        };
        if run.is_zero() || config.sessions < 20 || config.sample.is_zero() {
            bail!("the run and the sample interval must be positive, and sessions at least 20");
        }
        Ok(config)
    }
}

/// pgpivot as the bench runs it.
struct Pgpivot {
    peer: Peer,
    /// The pgpivot process itself (the peer's child, or below the wrapper).
    pid: u32,
    port: u16,
    admin: String,
    log: PathBuf,
    /// Certificate and key files; removed on drop.
    _tls: SelfSigned,
}

/// Starts the `pgpivot` binary in front of `cluster`.
async fn start_pgpivot(cluster: &LocalCluster, config: &Config) -> anyhow::Result<Pgpivot> {
    let binary = config.binary.as_path();
    let tls = SelfSigned::new()?;
    let admin = format!("127.0.0.1:{}", free_port());
    let extra = format!(
        "\n[limits]\nmax_client_connections = {}\n{}\n\
         [admin]\naddress = \"{admin}\"\n{}\n",
        config.sessions + 100,
        tls.pgpivot_toml(),
        config.pgpivot_toml,
    );
    let mut log = PathBuf::new();
    let config_wrapper = &config.wrapper;
    let (port, mut peer) = fleet::start_pgpivot_with(cluster, "", &extra, |config| {
        log = config.with_file_name("pgpivot.log");
        let mut cmd = match config_wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.arg("--config").arg(config);
        cmd
    })?;
    peer.wait_ready(&Target::local("pgpivot", port), READY_TIMEOUT)
        .await?;
    let pid = match config.wrapper.is_empty() {
        true => peer.child.id(),
        false => descendant(peer.child.id(), "pgpivot")
            .context("no pgpivot process below the wrapper")?,
    };
    Ok(Pgpivot {
        peer,
        pid,
        port,
        admin,
        log,
        _tls: tls,
    })
}

/// Where the sessions connect: the listener, plaintext and TLS.
fn endpoint(config: &Config, port: u16) -> anyhow::Result<Endpoint> {
    let conn = format!(
        "host=127.0.0.1 port={port} user={SUPERUSER} password={PASSWORD} dbname=postgres \
         application_name=soak"
    );
    let mut plain: tokio_postgres::Config = conn.parse()?;
    plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (mode, connector) = BackendTls::new(SslMode::Require, None)?.for_monitor("127.0.0.1");
    let mut tls: tokio_postgres::Config = conn.parse()?;
    tls.ssl_mode(mode);
    Ok(Endpoint {
        plain,
        tls: Some((tls, connector)),
        tls_every: config.tls_every,
        query_interval: config.query_interval,
        mix: config.mix,
    })
}

/// Lines of pgpivot's log (its filter is `warn`, so every line is a
/// warning or worse), and the last few.
fn log_summary(path: &Path) -> (usize, Vec<String>) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let tail = lines[lines.len().saturating_sub(5)..].to_vec();
    (lines.len(), tail)
}

/// Creates and fills `soak_kv` on the primary.
async fn create_table(direct: &tokio_postgres::Client) -> anyhow::Result<()> {
    direct
        .batch_execute(&format!(
            "create table soak_kv(id int primary key, v text);
             insert into soak_kv select g, md5(g::text) from generate_series(1, {KV_ROWS}) g"
        ))
        .await?;
    direct.batch_execute("vacuum analyze soak_kv").await?;
    Ok(())
}

/// Everything inside the runtime.
async fn bench(cluster: &LocalCluster, config: &Config) -> anyhow::Result<()> {
    let direct = Target::direct(cluster).connect().await?;
    create_table(&direct).await?;
    let mut pgpivot = start_pgpivot(cluster, config).await?;
    let totals = Arc::new(Totals::new());
    let probe = Probe {
        pid: pgpivot.pid,
        admin: pgpivot.admin.clone(),
        direct,
        totals: totals.clone(),
    };
    let ticks_per_s = clock_ticks();
    let mut readings = vec![probe.read("start", Duration::ZERO).await?];
    eprintln!("{}\n{}", header(), row(&readings[0], None, ticks_per_s));

    let stop = CancellationToken::new();
    let ramp_began = Instant::now();
    let endpoint = endpoint(config, pgpivot.port)?;
    let mut sessions =
        start_sessions(endpoint, config.sessions, totals.clone(), stop.clone()).await;
    let ramp = ramp_began.elapsed();
    let began = Instant::now();
    readings.push(probe.read("ramped", Duration::ZERO).await?);
    eprintln!("{}", row(&readings[1], None, ticks_per_s));

    let end = began + config.run;
    let mut next = began;
    while next < end {
        next = (next + config.sample).min(end);
        tokio::time::sleep_until(next.into()).await;
        if let Some(status) = pgpivot.peer.child.try_wait()? {
            bail!("pgpivot exited during the run ({status})");
        }
        let at = began.elapsed();
        let label = match at.as_secs_f64().round() as u64 {
            _ if next == end => "end".to_owned(),
            s if s % 60 == 0 => format!("{} min", s / 60),
            s => format!("{s} s"),
        };
        let reading = probe.read(&label, at).await?;
        eprintln!("{}", row(&reading, readings.last(), ticks_per_s));
        readings.push(reading);
    }

    stop.cancel();
    let closing = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    // Let pgpivot see the last Terminates and close its backends.
    let settle = Instant::now();
    while probe.sessions_active().await != Some(0) && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut closed = probe.read("closed", began.elapsed()).await?;
    closed.latency = None;
    readings.push(closed);

    report(config, &readings, &totals, ramp, ticks_per_s, &pgpivot.log);
    if !config.wrapper.is_empty() {
        // Let the wrapper see pgpivot exit on its own (heaptrack writes its
        // data then).
        let _ = Command::new("kill")
            .args(["-TERM", &pgpivot.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while pgpivot.peer.child.try_wait().ok().flatten().is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
    }
    if closing.is_err() {
        bail!("sessions did not close within {CLOSE_TIMEOUT:?}");
    }
    let errors = totals.error_count();
    if errors > 0 {
        bail!("{errors} client errors");
    }
    Ok(())
}

/// Prints the table, the client totals, errors and the verdict.
fn report(
    config: &Config,
    readings: &[Reading],
    totals: &Totals,
    ramp: Duration,
    ticks_per_s: f64,
    log: &Path,
) {
    let n = config.sessions;
    let tls = if config.tls_every > 0 {
        n.div_ceil(config.tls_every)
    } else {
        0
    };
    println!(
        "\nsoak: {n} sessions (idle:copy:churn % {}:{}:{}, the rest short) through pgpivot \
         (process) for {:.1} min after a {:.1} s ramp-up; {tls} of them over TLS; reading every {} s",
        config.mix.idle,
        config.mix.copy,
        config.mix.churn,
        config.run.as_secs_f64() / 60.0,
        ramp.as_secs_f64(),
        config.sample.as_secs()
    );
    println!("{}", header());
    for (i, r) in readings.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| &readings[p]);
        println!("{}", row(r, prev, ticks_per_s));
    }
    println!(
        "(sessions: pgpivot_client_sessions_active from /metrics; pgpivot exports no tokio task \
         count. backends: client backends in pg_stat_activity, pgpivot's monitor included)"
    );

    let t = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "\nclients: {} queries, {} COPY TO STDOUT + {} COPY FROM STDIN ({:.1} MB), \
         {} connects ({} TLS), {} reconnects, {}/{} idle sessions alive at the end",
        t(&totals.queries),
        t(&totals.copies_out),
        t(&totals.copies_in),
        t(&totals.copy_bytes) as f64 / 1e6,
        t(&totals.connects),
        t(&totals.tls_connects),
        t(&totals.reconnects),
        t(&totals.idle_alive),
        n * config.mix.idle / 100
    );
    let errors = totals.errors();
    if errors.is_empty() {
        println!("errors: 0");
    } else {
        let list: Vec<String> = errors.iter().map(|(c, k)| format!("{c}: {k}")).collect();
        println!("errors by SQLSTATE (or kind): {}", list.join(", "));
        for m in totals.messages() {
            println!("  {m}");
        }
    }

    // From the first periodic reading after the warm-up (in a run shorter
    // than that, the first periodic one) to the end.
    let periodic = &readings[2..readings.len() - 1];
    let from = periodic
        .iter()
        .position(|r| r.at >= config.warmup)
        .unwrap_or(0);
    let loaded: Vec<&Reading> = periodic[from..].iter().collect();
    println!(
        "\nflat = every reading from '{}' to 'end' within {:.0} % of '{}':",
        loaded[0].label,
        FLAT_TOLERANCE * 100.0,
        loaded[0].label
    );
    let checks = [
        flatness("RSS KiB", &loaded, |r| r.rss_kib),
        flatness("fds", &loaded, |r| r.fds),
        flatness("threads", &loaded, |r| r.threads),
    ];
    for (line, _) in &checks {
        println!("  {line}");
    }
    let all_flat = checks.iter().all(|(_, flat)| *flat);
    let (start, closed) = (&readings[0], &readings[readings.len() - 1]);
    println!(
        "  after every session closed: fds {} (start {}), sessions {}, RSS {:.1} MiB (start {:.1})",
        closed.fds,
        start.fds,
        closed
            .sessions_active
            .map_or("?".to_owned(), |s| s.to_string()),
        closed.rss_kib as f64 / 1024.0,
        start.rss_kib as f64 / 1024.0
    );
    println!("verdict: {}", if all_flat { "flat" } else { "NOT flat" });
    let (lines, tail) = log_summary(log);
    println!("pgpivot log (warn and above): {lines} lines");
    for l in tail {
        println!("  {l}");
    }
}

fn main() -> anyhow::Result<()> {
    let began = Instant::now();
    let config = Config::load()?;
    common::init_tracing("warn");
    eprintln!("starting a local primary with one standby...");
    let cluster = LocalCluster::start(ClusterOptions {
        standbys: 1,
        extra_conf: vec![format!("max_connections = {}", config.sessions + 100)],
        tls: None,
    })
    .context("a local PostgreSQL cluster (are the server binaries installed?)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(bench(&cluster, &config));
    drop(runtime);
    drop(cluster);
    println!("\nwhole run {:.1} s", began.elapsed().as_secs_f64());
    outcome
}

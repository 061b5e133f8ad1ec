//! The relay bench's memory case: what an idle session costs in resident
//! memory, at 1,000 sessions.
//!
//! Each target is started afresh for this case (a pgpivot process per
//! `--runtimes` entry, the first runtime again with `[tls]` and clients that
//! require TLS, then HAProxy and PgBouncer when installed, PgBouncer last
//! since it keeps its server connections, plaintext and with TLS for its
//! clients), so no earlier case's peak stays in its heap. The case reads the proxy's `VmRSS` (`/proc/PID/status`):
//!
//! * `start`: once it has answered one `select 1` and that client left;
//! * `idle`: with N sessions (default 1,000) open, each authenticated and
//!   idle after a `select 1`;
//! * `after 1 MB`: once every session has also run a query answering one
//!   1 MiB row (`select repeat('x', 1048576)`), 16 at a time, and gone idle
//!   again;
//! * `closed`: after every client left.
//!
//! Per session is (reading − start) / N, in KiB, of `VmRSS` and of its
//! anonymous part `RssAnon` (heap and stacks: what sessions hold; the rest
//! is the program's code pages, resident once a code path ran). Sessions
//! connect 16 at a time. The cluster gets `max_connections` for N sessions (see the relay
//! bench's `main`); after each target the case waits until its backends
//! (its monitor's, PgBouncer's pool) are gone.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{stream, StreamExt, TryStreamExt};
use tokio_postgres::Client;

use pgpivot::localcluster::LocalCluster;

use super::fleet::{
    find_or_install, start_haproxy, start_pgbouncer_tls, start_pgpivot_process, Peer,
    RuntimeChoice, Target, READY_TIMEOUT,
};
use super::tls_client::SelfSigned;

/// Sessions connecting (and querying) at once.
const PARALLEL: usize = 16;
/// The large result's size: one row of this many bytes.
pub const RESULT_BYTES: usize = 1 << 20;
/// How long the backends of one target get to go away.
const BACKENDS_GONE: Duration = Duration::from_secs(30);

/// Parameters of the memory case.
#[derive(Debug, Clone, Copy)]
pub struct MemoryParams {
    /// Sessions held open at once.
    pub sessions: usize,
}

/// The readings of one target.
#[derive(Debug, Clone, Copy)]
pub struct MemoryResult {
    pub start: Rss,
    pub idle: Rss,
    pub after: Rss,
    pub closed: Rss,
}

/// One reading of a process's resident memory, KiB.
#[derive(Debug, Clone, Copy)]
pub struct Rss {
    /// `VmRSS`: everything resident.
    pub total: u64,
    /// `RssAnon`: the anonymous part (heap, stacks), without the program's
    /// own code and data pages, which a session's first use of a code path
    /// makes resident once for all sessions.
    pub anon: u64,
}

/// `VmRSS` and `RssAnon` of `pid`.
fn rss_kib(pid: u32) -> anyhow::Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Rss {
        total: field("VmRSS:")?,
        anon: field("RssAnon:")?,
    })
}

/// Backends on the primary other than the one asking.
async fn backends(direct: &Client) -> anyhow::Result<i64> {
    let row = direct
        .query_one(
            "select count(*) from pg_stat_activity \
             where backend_type = 'client backend' and pid <> pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Waits (up to [`BACKENDS_GONE`]) until at most `base` backends are left.
async fn wait_backends(direct: &Client, base: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + BACKENDS_GONE;
    loop {
        let n = backends(direct).await?;
        if n <= base {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{n} backends still open, {base} expected");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `sql` on every client, [`PARALLEL`] at a time; the first column of
/// one row must be `expect` bytes long.
async fn on_every(clients: &[Client], sql: &str, expect: usize) -> anyhow::Result<()> {
    stream::iter(clients)
        .map(|c| async move {
            let rows = c.simple_query(sql).await?;
            let got = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::len),
                _ => None,
            });
            if got != Some(expect) {
                bail!("{sql}: got {got:?} bytes, expected {expect}");
            }
            anyhow::Ok(())
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<()>()
        .await
}

/// Measures one started target: the four readings.
async fn measure(target: &Target, pid: u32, p: &MemoryParams) -> anyhow::Result<MemoryResult> {
    let start = rss_kib(pid)?;
    eprintln!(
        "memory: {}: opening {} sessions ...",
        target.name, p.sessions
    );
    let clients: Vec<Client> = stream::iter(0..p.sessions)
        .map(|_| target.connect())
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await?;
    on_every(&clients, "select '1'", 1).await?;
    let idle = rss_kib(pid)?;
    eprintln!(
        "memory: {}: a 1 MiB result on every session ...",
        target.name
    );
    let big = format!("select repeat('x', {RESULT_BYTES})");
    on_every(&clients, &big, RESULT_BYTES).await?;
    let after = rss_kib(pid)?;
    drop(clients);
    Ok(MemoryResult {
        start,
        idle,
        after,
        closed: rss_kib(pid)?,
    })
}

/// Starts `started`, waits until it answers, measures it, stops it.
async fn run_target(
    name: String,
    started: anyhow::Result<(u16, Peer)>,
    tls: Option<&SelfSigned>,
    direct: &Client,
    base: i64,
    p: &MemoryParams,
) -> (String, anyhow::Result<MemoryResult>) {
    let outcome = async {
        let (port, mut peer) = started?;
        let target = match tls {
            None => Target::local(&name, port),
            Some(tls) => Target::local_tls(&name, port, tls.client.clone()),
        };
        peer.wait_ready(&target, READY_TIMEOUT).await?;
        let result = measure(&target, peer.child.id(), p).await;
        drop(peer);
        wait_backends(direct, base).await?;
        result
    }
    .await;
    if let Err(e) = &outcome {
        eprintln!("memory: {name}: failed: {e:#}");
    }
    (name, outcome)
}

/// The memory case against a fresh process of every target.
pub async fn memory_case(
    cluster: &LocalCluster,
    binary: &Path,
    runtimes: &[RuntimeChoice],
    p: &MemoryParams,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<(String, anyhow::Result<MemoryResult>)>> {
    let direct = Target::direct(cluster).connect().await?;
    let base = backends(&direct).await?;
    let tls = SelfSigned::new()?;
    let mut results = Vec::new();
    for runtime in runtimes {
        let started = start_pgpivot_process(binary, cluster, &runtime.toml());
        results.push(run_target(runtime.name(), started, None, &direct, base, p).await);
    }
    // Most drivers use TLS whenever the server offers it.
    if let Some(runtime) = runtimes.first() {
        let name = format!("{}, TLS", runtime.name());
        let config = runtime.toml() + &tls.pgpivot_toml();
        let started = start_pgpivot_process(binary, cluster, &config);
        results.push(run_target(name, started, Some(&tls), &direct, base, p).await);
    }
    let tools = find_or_install(&["pgbouncer", "haproxy"], notes);
    if let Some(bin) = &tools[1] {
        let started = start_haproxy(Command::new(bin), cluster);
        results.push(run_target("haproxy (tcp)".into(), started, None, &direct, base, p).await);
    }
    if let Some(bin) = &tools[0] {
        // Last: in session mode it keeps its server connections.
        for tls in [None, Some(&tls)] {
            let name = match tls {
                None => "pgbouncer (session)",
                Some(_) => "pgbouncer (session), TLS",
            };
            let started = start_pgbouncer_tls(Command::new(bin), cluster, p.sessions, tls);
            results.push(run_target(name.into(), started, tls, &direct, base, p).await);
        }
    }
    Ok(results)
}

/// Prints the memory table.
pub fn print_memory(results: &[(String, anyhow::Result<MemoryResult>)], p: &MemoryParams) {
    let n = p.sessions as f64;
    println!(
        "memory, {} sessions: VmRSS KiB of the proxy; per session = (reading - start) / {}; anon: the same of RssAnon",
        p.sessions, p.sessions
    );
    println!(
        "{:<28} {:>9} {:>9} {:>11} {:>6} {:>11} {:>11} {:>6} {:>9}",
        "target",
        "start",
        "idle",
        "KiB/session",
        "anon",
        "after 1 MiB",
        "KiB/session",
        "anon",
        "closed"
    );
    let per = |v: u64, start: u64| (v as f64 - start as f64) / n;
    for (name, result) in results {
        match result {
            Ok(r) => println!(
                "{:<28} {:>9} {:>9} {:>11.2} {:>6.2} {:>11} {:>11.2} {:>6.2} {:>9}",
                name,
                r.start.total,
                r.idle.total,
                per(r.idle.total, r.start.total),
                per(r.idle.anon, r.start.anon),
                r.after.total,
                per(r.after.total, r.start.total),
                per(r.after.anon, r.start.anon),
                r.closed.total
            ),
            Err(e) => println!("{name:<28} failed: {e:#}"),
        }
    }
}

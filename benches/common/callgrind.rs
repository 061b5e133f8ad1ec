//! The relay bench's instruction count: a proxy under
//! `valgrind --tool=callgrind` (pgpivot, and PgBouncer and HAProxy when
//! installed), user-space instructions (Ir) per transaction and per
//! connection opened. Unlike CPU time, the count does not depend on what
//! else the machine runs, so it compares the proxies' own code on a noisy
//! machine; it leaves out the kernel's share of a hop (the socket calls),
//! which the cost case's CPU time includes.
//!
//! Each window is a fresh proxy process under valgrind that answers its
//! first query, runs a warm-up of pgbench `-n -S -M extended` with a few
//! clients, then the window, and exits on SIGTERM; its Ir are those of its
//! whole life, from the dump callgrind writes at exit. The windows are
//! `-t N/5`, `-t N` and `-t N/5 -C` transactions per client (the last with
//! a new connection per transaction). Start-up, warm-up and exit are alike
//! in all three, so the difference of the first two windows' Ir over the
//! difference of their transactions is the cost of a transaction alone
//! (repeatable within a few %), and the difference of the first and the
//! third over the connections the third opened more is the cost of opening
//! one (for PgBouncer that includes its own SCRAM exchange with the client;
//! pgpivot and HAProxy leave authentication to the server). pgpivot's
//! monitor polls once at start-up and then not again (a 10 min interval).
//!
//! Why whole processes, not `callgrind_control --zero` and `--dump` around
//! each window of one process: PgBouncer, which runs as an unprivileged
//! account, does not answer those (the dump never comes), and one method
//! for every proxy keeps the figures comparable. A kept dump therefore
//! holds start-up too: compare two windows' dumps function by function to
//! see where a transaction's instructions go.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use pgpivot::localcluster::LocalCluster;

use super::cost::pgbench;
use super::fleet::{
    find_or_install, start_haproxy, start_pgbouncer, start_pgpivot_with, which, Peer, Target,
    MOVES_OFF,
};

/// Monitor settings under valgrind: one poll at start-up, generous timeout.
const MONITOR: &str = "interval_ms = 600000\ntimeout_ms = 30000\n";
/// How long a proxy under valgrind gets to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The name of callgrind's dump.
const DUMP: &str = "callgrind.out";
/// How long a proxy under valgrind gets to answer its first query.
const READY: Duration = Duration::from_secs(120);

/// Parameters of the callgrind case.
#[derive(Debug, Clone)]
pub struct CallgrindParams {
    /// Transactions per client of the big window (the small one runs a fifth).
    pub tx_per_client: u64,
    /// pgbench clients (`-c`; one thread).
    pub clients: u32,
    /// Where to copy every window's dump for `callgrind_annotate`, if
    /// anywhere.
    pub keep: Option<PathBuf>,
}

/// What the callgrind case found.
pub struct CallgrindResult {
    /// Instructions per transaction (slope between the two windows).
    pub ir_per_tx: f64,
    /// Instructions per connection opened: the `-C` window's Ir over the
    /// small window's, per connection it opened more.
    pub ir_per_connection: f64,
    /// (transactions, Ir) of each window: `-t N/5`, `-t N`, `-t N/5 -C`.
    pub windows: Vec<(u64, u64)>,
}

/// The proxy a callgrind case measures.
#[derive(Clone, Copy)]
pub enum Subject<'a> {
    /// The `pgpivot` binary, its config given these extra TOML lines.
    Pgpivot { binary: &'a Path, extra: &'a str },
    /// The `pgbouncer` binary, in session mode (as in the other cases).
    Pgbouncer(&'a Path),
    /// The `haproxy` binary, in TCP mode.
    Haproxy(&'a Path),
}

impl Subject<'_> {
    /// Starts the proxy with `valgrind` as the program that runs it.
    fn start(self, cluster: &LocalCluster, valgrind: Command) -> anyhow::Result<(u16, Peer)> {
        let run = |binary: &Path| {
            let mut cmd = valgrind;
            cmd.arg(binary);
            cmd
        };
        match self {
            Subject::Pgpivot { binary, extra } => {
                start_pgpivot_with(cluster, MONITOR, extra, |config| {
                    let mut cmd = run(binary);
                    cmd.arg("--config").arg(config);
                    cmd
                })
            }
            Subject::Pgbouncer(binary) => start_pgbouncer(run(binary), cluster, 0),
            Subject::Haproxy(binary) => start_haproxy(run(binary), cluster),
        }
    }
}

/// Runs the case against `subject`: three processes, one window each.
pub async fn callgrind_case(
    cluster: &LocalCluster,
    subject: Subject<'_>,
    p: &CallgrindParams,
    label: &str,
) -> anyhow::Result<CallgrindResult> {
    let small = (p.tx_per_client / 5).max(1);
    let mut windows = Vec::new();
    for (n, flags) in [(small, ""), (p.tx_per_client, ""), (small, " -C")] {
        eprintln!(
            "callgrind: {label}: {} clients x {n} transactions{flags} ...",
            p.clients
        );
        let keep = p
            .keep
            .as_deref()
            .map(|dir| (dir, window_name(label, n, flags)));
        windows.push(one_window(cluster, subject, p, (n, flags), keep).await?);
    }
    let [(tx1, ir1), (tx2, ir2), (tx3, ir3)] = windows[..] else {
        unreachable!("three windows")
    };
    if tx2 <= tx1 {
        bail!("the big window ran no more transactions ({tx2}) than the small one ({tx1})");
    }
    let connections = u64::from(p.clients);
    if tx3 <= connections {
        bail!(
            "the -C window opened no more connections ({tx3}) than the small one ({connections})"
        );
    }
    Ok(CallgrindResult {
        ir_per_tx: (ir2 as f64 - ir1 as f64) / (tx2 - tx1) as f64,
        ir_per_connection: (ir3 as f64 - ir1 as f64) / (tx3 - connections) as f64,
        windows,
    })
}

/// Starts `subject` under callgrind, runs the warm-up and then pgbench's
/// `(transactions per client, flags)` window, stops the process with
/// SIGTERM and reads the Ir of its whole life from the dump it writes at
/// exit. Returns (transactions of the window, Ir). With `keep`, the dump is
/// copied to that directory under that name.
async fn one_window(
    cluster: &LocalCluster,
    subject: Subject<'_>,
    p: &CallgrindParams,
    (n, flags): (u64, &str),
    keep: Option<(&Path, String)>,
) -> anyhow::Result<(u64, u64)> {
    let valgrind = which("valgrind").context("valgrind not installed (Debian: valgrind)")?;
    let out_dir = TempDir::with_prefix("pgpivot-bench-callgrind-")?;
    // PgBouncer runs as an unprivileged account, and writes its dump here.
    fs::set_permissions(out_dir.path(), fs::Permissions::from_mode(0o1777))?;
    let dump = out_dir.path().join(DUMP);
    let mut cmd = Command::new(&valgrind);
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", dump.display()));
    let (port, mut peer) = subject.start(cluster, cmd)?;
    peer.wait_ready(&Target::local("callgrind", port), READY)
        .await?;
    // Work still under way after start-up (pgpivot's first monitor polls,
    // say) lands in the warm-up of every window alike.
    let warm_up = window(p.clients, (p.tx_per_client / 5).max(1), "");
    pgbench(cluster, "127.0.0.1", port, &warm_up).await?;
    let run = pgbench(cluster, "127.0.0.1", port, &window(p.clients, n, flags)).await?;
    peer.terminate(EXIT_TIMEOUT).await?;
    let ir = total_ir(&dump)?;
    if let Some((dir, name)) = keep {
        keep_dump(&dump, dir, &name)?;
    }
    Ok((run.tx, ir))
}

/// pgbench's arguments for a window of `n` transactions per client.
fn window(clients: u32, n: u64, flags: &str) -> Vec<String> {
    format!("-n -S -M extended -c {clients} -j 1 -t {n}{flags}")
        .split(' ')
        .map(str::to_owned)
        .collect()
}

/// The file name a kept dump of `label`'s window gets.
fn window_name(label: &str, n: u64, flags: &str) -> String {
    let name: String = format!("{label} t{n}{flags}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{DUMP}.{name}")
}

/// Copies `dump` into the directory `keep` as `name`.
fn keep_dump(dump: &Path, keep: &Path, name: &str) -> anyhow::Result<()> {
    fs::create_dir_all(keep)?;
    let to = keep.join(name);
    fs::copy(dump, &to).with_context(|| format!("cannot copy the dump to {}", to.display()))?;
    eprintln!("callgrind: kept {} (callgrind_annotate it)", to.display());
    Ok(())
}

/// The Ir count since the last zeroing (`summary:` line, else `totals:`)
/// of `path`.
fn total_ir(path: &Path) -> anyhow::Result<u64> {
    let text = fs::read_to_string(path)?;
    let count = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    count("summary:")
        .or_else(|| count("totals:"))
        .with_context(|| format!("no summary in {}", path.display()))
}

/// Runs the case for pgpivot as configured by default, pgpivot without
/// session moves (no state tracking: the difference is what tracking
/// costs), and PgBouncer and HAProxy when installed (a note says when one
/// is not).
pub async fn callgrind_cases(
    cluster: &LocalCluster,
    pgpivot: &Path,
    p: &CallgrindParams,
    notes: &mut Vec<String>,
) -> Vec<(&'static str, anyhow::Result<CallgrindResult>)> {
    let tools = find_or_install(&["pgbouncer", "haproxy"], notes);
    let mut subjects = vec![
        (
            PGPIVOT,
            Subject::Pgpivot {
                binary: pgpivot,
                extra: "",
            },
        ),
        (
            PGPIVOT_MOVES_OFF,
            Subject::Pgpivot {
                binary: pgpivot,
                extra: MOVES_OFF,
            },
        ),
    ];
    if let Some(bin) = &tools[0] {
        subjects.push((PGBOUNCER, Subject::Pgbouncer(bin)));
    }
    if let Some(bin) = &tools[1] {
        subjects.push(("haproxy (tcp)", Subject::Haproxy(bin)));
    }
    let mut results = Vec::new();
    for (label, subject) in subjects {
        results.push((label, callgrind_case(cluster, subject, p, label).await));
    }
    results
}

/// The label of pgpivot as configured by default.
const PGPIVOT: &str = "pgpivot";
/// The label of pgpivot without session moves (no state tracking).
const PGPIVOT_MOVES_OFF: &str = "pgpivot (move_sessions off)";
/// The label of the row the ratios are to.
const PGBOUNCER: &str = "pgbouncer (session)";

/// Prints the callgrind table: per proxy, Ir per transaction and per
/// connection opened, with ratios to PgBouncer's, then each run's windows.
pub fn print_callgrind(results: &[(&str, anyhow::Result<CallgrindResult>)], p: &CallgrindParams) {
    println!(
        "callgrind: user-space instructions of the proxy process, pgbench -n -S -M extended -c {} -j 1: -t {small}, -t {}, -t {small} -C per client",
        p.clients,
        p.tx_per_client,
        small = (p.tx_per_client / 5).max(1)
    );
    let of = |label: &str| {
        results
            .iter()
            .find(|(l, _)| *l == label)
            .and_then(|(_, r)| r.as_ref().ok())
    };
    let base = of(PGBOUNCER);
    let ratio = |v: f64, pick: fn(&CallgrindResult) -> f64| match base {
        Some(b) => format!("{:.2}", v / pick(b)),
        None => "-".to_owned(),
    };
    println!(
        "{:<28} {:>9} {:>5} {:>11} {:>5}",
        "target", "Ir/tx", "/pgb", "Ir/connect", "/pgb"
    );
    for (label, result) in results {
        match result {
            Ok(r) => println!(
                "{:<28} {:>9.0} {:>5} {:>11.0} {:>5}",
                label,
                r.ir_per_tx,
                ratio(r.ir_per_tx, |b| b.ir_per_tx),
                r.ir_per_connection,
                ratio(r.ir_per_connection, |b| b.ir_per_connection),
            ),
            Err(err) => println!("{label:<28} skipped: {err:#}"),
        }
    }
    if let (Some(on), Some(off)) = (of(PGPIVOT), of(PGPIVOT_MOVES_OFF)) {
        println!(
            "state tracking for moves: {:+.0} Ir/tx ({:+.1} %)",
            on.ir_per_tx - off.ir_per_tx,
            100.0 * (on.ir_per_tx / off.ir_per_tx - 1.0)
        );
    }
    for (label, result) in results {
        if let Ok(r) = result {
            let windows: Vec<String> = r
                .windows
                .iter()
                .map(|(tx, ir)| format!("{tx} tx: {ir} Ir"))
                .collect();
            println!("{label} windows: {}", windows.join("; "));
        }
    }
}

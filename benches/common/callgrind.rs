//! The relay bench's instruction count: the `pgpivot` binary under
//! `valgrind --tool=callgrind`, user-space instructions (Ir) per
//! transaction and per connection opened.
//!
//! One pgpivot process runs a warm-up, then three windows, each bracketed by
//! `callgrind_control --zero` and `--dump`, of pgbench `-n -S -M extended`
//! with a few clients: `-t N/5`, then `-t N` transactions per client, then
//! `-t N/5 -C` (a new connection per transaction). The first two open the
//! same connections, so the difference of their Ir over the difference of
//! their transactions is the cost of a transaction alone (repeatable
//! within a few %); the third's Ir per transaction minus that is the cost of
//! opening a connection. The monitor polls once at start-up and then not
//! again for the rest of the run (a 10 min interval), so it stays out of
//! the windows.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use pgpivot::localcluster::LocalCluster;

use super::cost::pgbench;
use super::fleet::{start_pgpivot_with, which, Target};

/// Monitor settings under valgrind: one poll at start-up, generous timeout.
const MONITOR: &str = "interval_ms = 600000\ntimeout_ms = 30000\n";
/// How long pgpivot under valgrind gets to answer its first query.
const READY: Duration = Duration::from_secs(120);

/// Parameters of the callgrind case.
#[derive(Debug, Clone)]
pub struct CallgrindParams {
    /// Transactions per client of the big window (the small one runs a fifth).
    pub tx_per_client: u64,
    /// pgbench clients (`-c`; one thread).
    pub clients: u32,
    /// Where to copy the big window's dump for `callgrind_annotate`, if
    /// anywhere.
    pub keep: Option<PathBuf>,
}

/// What the callgrind case found.
pub struct CallgrindResult {
    /// Instructions per transaction (slope between the two windows).
    pub ir_per_tx: f64,
    /// Instructions per connection opened: Ir/tx of the `-C` window minus
    /// [`CallgrindResult::ir_per_tx`].
    pub ir_per_connection: f64,
    /// (transactions, Ir) of each window: `-t N/5`, `-t N`, `-t N/5 -C`.
    pub windows: Vec<(u64, u64)>,
}

/// Runs the case against pgpivot `binary`, its config given `extra` TOML.
pub async fn callgrind_case(
    cluster: &LocalCluster,
    binary: &Path,
    p: &CallgrindParams,
    label: &str,
    extra: &str,
) -> anyhow::Result<CallgrindResult> {
    let valgrind = which("valgrind").context("valgrind not installed (Debian: valgrind)")?;
    let control = which("callgrind_control").context("callgrind_control not installed")?;
    let out_dir = TempDir::with_prefix("pgpivot-bench-callgrind-")?;
    let out_file = out_dir.path().join("callgrind.out");
    let (port, mut peer) = start_pgpivot_with(cluster, MONITOR, extra, |config| {
        let mut cmd = Command::new(&valgrind);
        cmd.arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(binary)
            .arg("--config")
            .arg(config);
        cmd
    })?;
    let target = Target::local("pgpivot (callgrind)", port);
    peer.wait_ready(&target, READY).await?;
    let pid = peer.child.id();
    let mut windows = Vec::new();
    // Two windows on the same connections, then one opening a connection
    // per transaction (pgbench -C).
    let small = (p.tx_per_client / 5).max(1);
    // A warm-up window first, not measured: work still under way after
    // start-up (the monitor's first polls, say) would otherwise land in the
    // small window and skew the slope.
    pgbench(cluster, "127.0.0.1", port, &window(p.clients, small, "")).await?;
    let plans = [(small, ""), (p.tx_per_client, ""), (small, " -C")];
    for (n, flags) in plans {
        eprintln!(
            "callgrind: {} clients x {n} transactions{flags} ...",
            p.clients
        );
        callgrind_control(&control, "--zero", pid)?;
        let run = pgbench(cluster, "127.0.0.1", port, &window(p.clients, n, flags)).await?;
        let before = dumps(out_dir.path())?;
        callgrind_control(&control, "--dump", pid)?;
        let dump = new_dump(out_dir.path(), &before)?;
        windows.push((run.tx, total_ir(&dump)?));
        if let (Some(keep), true) = (&p.keep, n == p.tx_per_client && flags.is_empty()) {
            keep_dump(&dump, keep, label)?;
        }
    }
    let [(tx1, ir1), (tx2, ir2), (tx3, ir3)] = windows[..] else {
        unreachable!("three windows")
    };
    if tx2 <= tx1 {
        bail!("the big window ran no more transactions ({tx2}) than the small one ({tx1})");
    }
    let ir_per_tx = (ir2 as f64 - ir1 as f64) / (tx2 - tx1) as f64;
    let ir_per_connection = ir3 as f64 / tx3 as f64 - ir_per_tx;
    Ok(CallgrindResult {
        ir_per_tx,
        ir_per_connection,
        windows,
    })
}

/// pgbench's arguments for a window of `n` transactions per client.
fn window(clients: u32, n: u64, flags: &str) -> Vec<String> {
    format!("-n -S -M extended -c {clients} -j 1 -t {n}{flags}")
        .split(' ')
        .map(str::to_owned)
        .collect()
}

/// Runs `callgrind_control ACTION PID`.
fn callgrind_control(control: &Path, action: &str, pid: u32) -> anyhow::Result<()> {
    let out = Command::new(control)
        .arg(action)
        .arg(pid.to_string())
        .output()
        .context("cannot run callgrind_control")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {action} failed: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The files in `dir`.
fn dumps(dir: &Path) -> anyhow::Result<HashSet<PathBuf>> {
    fs::read_dir(dir)?.map(|e| Ok(e?.path())).collect()
}

/// The one dump in `dir` that is not in `before`.
fn new_dump(dir: &Path, before: &HashSet<PathBuf>) -> anyhow::Result<PathBuf> {
    let mut new: Vec<PathBuf> = dumps(dir)?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    match new.pop() {
        Some(path) if new.is_empty() => Ok(path),
        _ => bail!("expected one new callgrind dump, found {new:?}"),
    }
}

/// Copies `dump` into the directory `keep` under a name made of `label`.
fn keep_dump(dump: &Path, keep: &Path, label: &str) -> anyhow::Result<()> {
    fs::create_dir_all(keep)?;
    let name: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let to = keep.join(format!("callgrind.out.{name}"));
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

/// Prints the callgrind line of the pgpivot deployment called `label`.
pub fn print_callgrind(label: &str, result: &anyhow::Result<CallgrindResult>, p: &CallgrindParams) {
    println!(
        "{label} under callgrind, pgbench -n -S -M extended -c {} -j 1: -t {small}, -t {}, -t {small} -C per client",
        p.clients,
        p.tx_per_client,
        small = (p.tx_per_client / 5).max(1)
    );
    match result {
        Ok(r) => {
            let windows: Vec<String> = r
                .windows
                .iter()
                .map(|(tx, ir)| format!("{tx} tx: {ir} Ir"))
                .collect();
            println!(
                "user-space instructions: {:.0} Ir/tx, {:.0} Ir per connection opened ({})",
                r.ir_per_tx,
                r.ir_per_connection,
                windows.join("; ")
            );
        }
        Err(err) => println!("callgrind: skipped: {err:#}"),
    }
}

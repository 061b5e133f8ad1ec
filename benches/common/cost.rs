//! The relay bench's fixed-rate cost case: what one transaction costs in
//! CPU, measured the same way for every target (the method of
//! `shared/tools/cost.sh`).
//!
//! pgbench runs select-only at a fixed rate below every target's maximum
//! (`-n -S -M extended -c 8 -j 2 -R RATE -T SECS`); around each run the case
//! reads the proxy's utime+stime (`/proc/PID/stat`; utime alone too), the sum of voluntary
//! and nonvoluntary context switches over its threads
//! (`/proc/PID/task/*/status`) and the whole machine's busy time
//! (`/proc/stat`: user, nice, system, irq, softirq), and divides each by the
//! transactions pgbench actually processed. Rounds interleave the targets;
//! medians are reported. A separate pass (one run per target, `perf stat -e
//! raw_syscalls:sys_enter -p PID` attached) counts the proxy's syscalls, so
//! perf's own overhead stays out of the CPU figures.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use pgpivot::localcluster::{LocalCluster, PASSWORD, SUPERUSER};

use super::fleet::{which, Target};

/// pgbench clients and threads of the fixed-rate runs.
const CLIENTS: u32 = 8;
const THREADS: u32 = 2;
/// Time perf gets to attach before pgbench starts.
const PERF_ATTACH: Duration = Duration::from_millis(300);

/// Parameters of the cost case.
#[derive(Debug, Clone, Copy)]
pub struct CostParams {
    /// Transactions per second pgbench aims at (`-R`).
    pub rate: u32,
    /// Seconds of each run (`-T`).
    pub seconds: u64,
    /// Interleaved rounds; medians are reported.
    pub rounds: usize,
    /// Whether to run the perf pass for syscalls per transaction.
    pub syscalls: bool,
}

/// What one pgbench run reported.
pub struct PgbenchRun {
    /// "number of transactions actually processed".
    pub tx: u64,
    /// "latency average", ms (absent with `-t` on some versions).
    pub latency_ms: f64,
}

/// Runs the cluster's pgbench against `127.0.0.1:port` as the superuser,
/// database `postgres`, with `args` in front.
pub async fn pgbench(
    cluster: &LocalCluster,
    host: &str,
    port: u16,
    args: &[String],
) -> anyhow::Result<PgbenchRun> {
    let mut cmd = cluster.command("pgbench");
    cmd.args(args)
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            SUPERUSER,
            "postgres",
        ])
        .env("PGPASSWORD", PASSWORD);
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .context("cannot run pgbench")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let tx: u64 = field("number of transactions actually processed: ")
        .and_then(|v| v.split('/').next()?.parse().ok())
        .unwrap_or(0);
    if !out.status.success() || tx == 0 {
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        bail!("pgbench failed ({}): {}", out.status, tail.join(" | "));
    }
    let latency_ms = field("latency average = ")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(PgbenchRun { tx, latency_ms })
}

/// Creates pgbench's tables (scale 1) on the primary.
pub async fn pgbench_init(cluster: &LocalCluster) -> anyhow::Result<()> {
    let mut cmd = cluster.command("pgbench");
    cmd.args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p"])
        .arg(cluster.node(0).port.to_string())
        .args(["-U", SUPERUSER, "postgres"])
        .env("PGPASSWORD", PASSWORD);
    let out = tokio::process::Command::from(cmd).output().await?;
    if !out.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime and stime of process `pid`, in ticks, from `/proc/PID/stat`.
fn proc_ticks(pid: u32) -> anyhow::Result<CpuTicks> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        let value = fields
            .get(i)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?;
        Ok(value.parse()?)
    };
    Ok(CpuTicks {
        user: field(11)?,
        system: field(12)?,
    })
}

/// A process's CPU time so far, in clock ticks.
#[derive(Clone, Copy)]
struct CpuTicks {
    user: u64,
    system: u64,
}

/// Voluntary plus nonvoluntary context switches over every thread of `pid`.
fn proc_csw(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = fs::read_to_string(task?.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

/// The machine's busy ticks (user, nice, system, irq, softirq of the `cpu`
/// line of `/proc/stat`).
fn machine_busy() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if v.len() < 7 {
        bail!("short cpu line in /proc/stat");
    }
    Ok(v[0] + v[1] + v[2] + v[5] + v[6])
}

/// Counters read before and after a run.
#[derive(Clone, Copy)]
struct Counters {
    proxy_ticks: Option<CpuTicks>,
    proxy_csw: Option<u64>,
    machine_ticks: u64,
}

impl Counters {
    fn read(pid: Option<u32>) -> anyhow::Result<Counters> {
        Ok(Counters {
            proxy_ticks: pid.map(proc_ticks).transpose()?,
            proxy_csw: pid.map(proc_csw).transpose()?,
            machine_ticks: machine_busy()?,
        })
    }
}

/// One fixed-rate run's figures, or (as [`CostResult`]) the medians of the
/// rounds, plus the syscall pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct CostResult {
    /// Proxy CPU µs per transaction (none for direct or in-process).
    pub proxy_us: Option<f64>,
    /// The user-space part of it (utime; the rest is stime). Tick-sampled,
    /// so a rough split.
    pub proxy_user_us: Option<f64>,
    /// Machine busy CPU µs per transaction.
    pub machine_us: f64,
    /// Proxy context switches per transaction.
    pub csw: Option<f64>,
    /// Proxy syscalls per transaction, from the perf pass.
    pub syscalls: Option<f64>,
    /// pgbench's average latency, ms.
    pub latency_ms: f64,
    /// Transactions processed / (rate × seconds).
    pub achieved: f64,
}

/// The pgbench arguments of a fixed-rate run.
fn rate_args(p: &CostParams, seconds: u64) -> Vec<String> {
    format!(
        "-n -S -M extended -c {CLIENTS} -j {THREADS} -R {} -T {seconds}",
        p.rate
    )
    .split(' ')
    .map(str::to_owned)
    .collect()
}

/// One fixed-rate run against `target`.
async fn cost_run(
    cluster: &LocalCluster,
    target: &Target,
    p: &CostParams,
    hz: f64,
) -> anyhow::Result<CostResult> {
    let before = Counters::read(target.pid)?;
    let run = pgbench(cluster, &target.host, target.port, &rate_args(p, p.seconds)).await?;
    let after = Counters::read(target.pid)?;
    let tx = run.tx as f64;
    let per_tx_us = |a: u64, b: u64| (b - a) as f64 * 1e6 / hz / tx;
    Ok(CostResult {
        proxy_us: before
            .proxy_ticks
            .zip(after.proxy_ticks)
            .map(|(a, b)| per_tx_us(a.user + a.system, b.user + b.system)),
        proxy_user_us: before
            .proxy_ticks
            .zip(after.proxy_ticks)
            .map(|(a, b)| per_tx_us(a.user, b.user)),
        machine_us: per_tx_us(before.machine_ticks, after.machine_ticks),
        csw: before
            .proxy_csw
            .zip(after.proxy_csw)
            .map(|(a, b)| (b - a) as f64 / tx),
        syscalls: None,
        latency_ms: run.latency_ms,
        achieved: tx / (f64::from(p.rate) * p.seconds as f64),
    })
}

/// Median of `values` (mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Medians, field by field, of the rounds of one target.
fn medians(rounds: &[CostResult]) -> CostResult {
    let opt = |f: fn(&CostResult) -> Option<f64>| {
        let v: Option<Vec<f64>> = rounds.iter().map(f).collect();
        v.map(median)
    };
    let all = |f: fn(&CostResult) -> f64| median(rounds.iter().map(f).collect());
    CostResult {
        proxy_us: opt(|r| r.proxy_us),
        proxy_user_us: opt(|r| r.proxy_user_us),
        machine_us: all(|r| r.machine_us),
        csw: opt(|r| r.csw),
        syscalls: None,
        latency_ms: all(|r| r.latency_ms),
        achieved: all(|r| r.achieved),
    }
}

/// The cost case against every target: `rounds` interleaved rounds, then
/// (if asked and perf works) the syscall pass. Problems with perf become
/// notes; a target whose pgbench fails gets an error.
pub async fn cost_case(
    cluster: &LocalCluster,
    targets: &[Target],
    p: &CostParams,
    notes: &mut Vec<String>,
) -> Vec<anyhow::Result<CostResult>> {
    let hz = clock_ticks();
    let load = |when: &str| {
        let avg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let avg: Vec<&str> = avg.split_whitespace().take(3).collect();
        format!("{when} {}", avg.join(" "))
    };
    let load_before = load("before");
    let mut runs: Vec<anyhow::Result<Vec<CostResult>>> =
        targets.iter().map(|_| Ok(Vec::new())).collect();
    for round in 1..=p.rounds {
        for (target, slot) in targets.iter().zip(&mut runs) {
            let Ok(done) = slot else { continue };
            eprintln!("cost: {} round {round}/{} ...", target.name, p.rounds);
            match cost_run(cluster, target, p, hz).await {
                Ok(r) => done.push(r),
                Err(err) => {
                    eprintln!("cost: {}: failed: {err:#}", target.name);
                    *slot = Err(err);
                }
            }
        }
    }
    let mut results: Vec<anyhow::Result<CostResult>> = runs
        .into_iter()
        .map(|r| r.map(|rounds| medians(&rounds)))
        .collect();
    notes.push(format!(
        "cost: machine µs/tx counts every process on the machine (load average {}, {})",
        load_before,
        load("after")
    ));
    if p.syscalls {
        syscall_pass(cluster, targets, p, &mut results, notes).await;
    }
    results
}

/// Seconds of each run of the syscall pass.
fn syscall_seconds(p: &CostParams) -> u64 {
    (p.seconds / 2).max(2)
}

/// One run per proxy process with `perf stat` attached, filling
/// [`CostResult::syscalls`]. Stops at the first perf failure, with a note.
async fn syscall_pass(
    cluster: &LocalCluster,
    targets: &[Target],
    p: &CostParams,
    results: &mut [anyhow::Result<CostResult>],
    notes: &mut Vec<String>,
) {
    let Some(perf) = which("perf") else {
        notes.push("syscalls/tx: perf not installed (Debian: linux-perf), column skipped".into());
        return;
    };
    for (target, slot) in targets.iter().zip(results) {
        let (Some(pid), Ok(result)) = (target.pid, slot) else {
            continue;
        };
        eprintln!("cost: {} syscall pass ...", target.name);
        match count_syscalls(cluster, &perf, target, pid, p).await {
            Ok(n) => result.syscalls = Some(n),
            Err(err) => {
                notes.push(format!(
                    "syscalls/tx: perf stat failed, column skipped: {err:#}"
                ));
                return;
            }
        }
    }
}

/// Syscalls of `pid` per transaction over one fixed-rate run.
async fn count_syscalls(
    cluster: &LocalCluster,
    perf: &Path,
    target: &Target,
    pid: u32,
    p: &CostParams,
) -> anyhow::Result<f64> {
    let perf_run = tokio::process::Command::new(perf)
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            "raw_syscalls:sys_enter",
            "-p",
            &pid.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run perf")?;
    tokio::time::sleep(PERF_ATTACH).await;
    let run = pgbench(
        cluster,
        &target.host,
        target.port,
        &rate_args(p, syscall_seconds(p)),
    )
    .await;
    let perf_pid = perf_run.id().context("perf exited early")?;
    // perf stat prints its counts when interrupted.
    std::process::Command::new("kill")
        .args(["-INT", &perf_pid.to_string()])
        .status()?;
    let out = perf_run.wait_with_output().await?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .with_context(|| format!("no count in perf's output: {}", text.trim()))?;
    let count: f64 = line
        .split(',')
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("perf: {line}"))?;
    Ok(count / run?.tx as f64)
}

/// `value / baseline` with two decimals, or a dash.
fn ratio(value: Option<f64>, baseline: Option<f64>) -> String {
    match (value, baseline) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".to_owned(),
    }
}

/// A figure with `decimals`, or a dash.
fn figure(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Prints the cost table. `/pgb` columns divide by the PgBouncer row's
/// figure; `hop µs/tx` is machine µs/tx minus direct's.
pub fn print_cost(targets: &[Target], results: &[anyhow::Result<CostResult>], p: &CostParams) {
    println!(
        "fixed rate {} tx/s: pgbench -n -S -M extended -c {CLIENTS} -j {THREADS}, {} s x {} interleaved rounds (medians); syscalls: one {} s run under perf",
        p.rate,
        p.seconds,
        p.rounds,
        syscall_seconds(p)
    );
    println!(
        "{:<28} {:>11} {:>5} {:>7} {:>13} {:>5} {:>9} {:>7} {:>5} {:>11} {:>5} {:>7} {:>7}",
        "target",
        "proxy µs/tx",
        "/pgb",
        "user µs",
        "machine µs/tx",
        "/pgb",
        "hop µs/tx",
        "csw/tx",
        "/pgb",
        "syscalls/tx",
        "/pgb",
        "lat ms",
        "rate ok"
    );
    let ok = |i: usize| results.get(i).and_then(|r| r.as_ref().ok());
    let pgb = targets
        .iter()
        .position(|t| t.name.starts_with("pgbouncer"))
        .and_then(ok);
    let direct = ok(0).map(|d| d.machine_us);
    for (target, result) in targets.iter().zip(results) {
        let r = match result {
            Ok(r) => r,
            Err(err) => {
                println!("{:<28} failed: {err:#}", target.name);
                continue;
            }
        };
        println!(
            "{:<28} {:>11} {:>5} {:>7} {:>13.2} {:>5} {:>9} {:>7} {:>5} {:>11} {:>5} {:>7.3} {:>7.2}",
            target.name,
            figure(r.proxy_us, 2),
            ratio(r.proxy_us, pgb.and_then(|b| b.proxy_us)),
            figure(r.proxy_user_us, 2),
            r.machine_us,
            ratio(Some(r.machine_us), pgb.map(|b| b.machine_us)),
            figure(direct.map(|d| r.machine_us - d), 2),
            figure(r.csw, 3),
            ratio(r.csw, pgb.and_then(|b| b.csw)),
            figure(r.syscalls, 2),
            ratio(r.syscalls, pgb.and_then(|b| b.syscalls)),
            r.latency_ms,
            r.achieved,
        );
    }
    if pgb.is_none() {
        println!("note: no PgBouncer row, so no /pgb ratios");
    }
}

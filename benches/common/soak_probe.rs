//! The soak bench's readings of the pgpivot process and the clients, the
//! table they print as, and the flatness check.

use std::fs;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::soak_load::{new_histogram, Totals};

/// A reading within this fraction of the warm-up reading is flat.
pub const FLAT_TOLERANCE: f64 = 0.05;

/// One look at pgpivot and the clients.
pub struct Reading {
    pub label: String,
    /// Since the sessions were all connected (0 before).
    pub at: Duration,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    pub cpu_ticks: u64,
    pub sessions_active: Option<u64>,
    pub backends: i64,
    pub queries: u64,
    pub copies: u64,
    pub reconnects: u64,
    pub errors: u64,
    /// Short-query latency since the previous reading: p50, p99, max (ms).
    pub latency: Option<[f64; 3]>,
}

/// What the readings are taken from.
pub struct Probe {
    pub pid: u32,
    pub admin: String,
    /// A direct connection to the primary, for `pg_stat_activity`.
    pub direct: tokio_postgres::Client,
    pub totals: Arc<Totals>,
}

impl Probe {
    pub async fn read(&self, label: &str, at: Duration) -> anyhow::Result<Reading> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("pgpivot has exited")?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            let value = line.split_whitespace().next().unwrap_or_default();
            Ok(value.parse()?)
        };
        let fds = fs::read_dir(format!("/proc/{}/fd", self.pid))?.count() as u64;
        let backends: i64 = self
            .direct
            .query_one(
                "select count(*) from pg_stat_activity \
                 where backend_type = 'client backend' and pid <> pg_backend_pid()",
                &[],
            )
            .await?
            .get(0);
        let latency = {
            let mut h = self.totals.latency.lock().unwrap();
            let out = (!h.is_empty())
                .then(|| [0.5, 0.99, 1.0].map(|q| h.value_at_quantile(q) as f64 / 1e6));
            *h = new_histogram();
            out
        };
        let t = &self.totals;
        Ok(Reading {
            label: label.to_owned(),
            at,
            rss_kib: field("VmRSS:")?,
            fds,
            threads: field("Threads:")?,
            cpu_ticks: cpu_ticks(self.pid)?,
            sessions_active: self.sessions_active().await,
            backends,
            queries: t.queries.load(Ordering::Relaxed),
            copies: t.copies_out.load(Ordering::Relaxed) + t.copies_in.load(Ordering::Relaxed),
            reconnects: t.reconnects.load(Ordering::Relaxed),
            errors: t.error_count(),
            latency,
        })
    }

    /// `pgpivot_client_sessions_active` from `/metrics`.
    pub async fn sessions_active(&self) -> Option<u64> {
        let text = pgpivot::admin::client::get(&self.admin, "/metrics", None)
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("pgpivot_client_sessions_active "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    }
}

/// utime + stime of `pid`, in clock ticks (`/proc/PID/stat` fields 14, 15).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    Ok(fields.iter().sum())
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn header() -> String {
    format!(
        "{:<8} {:>6} {:>9} {:>6} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>7} {:>7} {:>8} {:>6} {:>6}",
        "reading",
        "t s",
        "RSS MiB",
        "fds",
        "threads",
        "cpu %",
        "sessions",
        "backends",
        "q/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "copies",
        "reconn",
        "errors"
    )
}

/// One table row; rates and CPU are since `prev`.
pub fn row(r: &Reading, prev: Option<&Reading>, ticks_per_s: f64) -> String {
    let (cpu, qps) = match prev {
        Some(p) if r.at > p.at => {
            let secs = (r.at - p.at).as_secs_f64();
            (
                format!(
                    "{:.1}",
                    (r.cpu_ticks - p.cpu_ticks) as f64 / ticks_per_s / secs * 100.0
                ),
                format!("{:.0}", (r.queries - p.queries) as f64 / secs),
            )
        }
        _ => ("-".to_owned(), "-".to_owned()),
    };
    let [p50, p99, max] = match r.latency {
        Some(l) => l.map(|v| format!("{v:.2}")),
        None => ["-", "-", "-"].map(str::to_owned),
    };
    let sessions = r.sessions_active.map_or("?".to_owned(), |s| s.to_string());
    format!(
        "{:<8} {:>6.0} {:>9.1} {:>6} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>7} {:>7} {:>8} {:>6} {:>6}",
        r.label,
        r.at.as_secs_f64(),
        r.rss_kib as f64 / 1024.0,
        r.fds,
        r.threads,
        cpu,
        sessions,
        r.backends,
        qps,
        p50,
        p99,
        max,
        r.copies,
        r.reconnects,
        r.errors
    )
}

/// Flatness of one figure over `loaded` (warm-up reading first): its
/// range and largest deviation from the warm-up value.
pub fn flatness(name: &str, loaded: &[&Reading], get: impl Fn(&Reading) -> u64) -> (String, bool) {
    let base = get(loaded[0]) as f64;
    let values: Vec<u64> = loaded.iter().map(|r| get(r)).collect();
    let (min, max) = (values.iter().min().unwrap(), values.iter().max().unwrap());
    let worst = values
        .iter()
        .map(|&v| (v as f64 - base).abs() / base.max(1.0))
        .fold(0.0, f64::max);
    let flat = worst <= FLAT_TOLERANCE;
    let line = format!(
        "{name:<8} warm-up {base:>8.0}  range {min}..{max}  max deviation {:>5.1} %  {}",
        worst * 100.0,
        if flat { "flat" } else { "NOT FLAT" }
    );
    (line, flat)
}

/// The first process below `root` whose command name is `comm`.
pub fn descendant(root: u32, comm: &str) -> Option<u32> {
    let mut parents = Vec::new();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(').map_or("", |(_, n)| n);
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        parents.push((pid, ppid, name.to_owned()));
    }
    let mut below = vec![root];
    while let Some(parent) = below.pop() {
        for (pid, ppid, name) in &parents {
            if *ppid == parent {
                if name == comm {
                    return Some(*pid);
                }
                below.push(*pid);
            }
        }
    }
    None
}

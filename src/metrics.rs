//! Counters and latency histograms, shared by every session.
//!
//! Counters are relaxed atomics (one add per relayed chunk, not per
//! message). Latencies go into hdrhistogram behind a std Mutex held only to
//! record one value. The admin endpoint renders them for Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (sessions open now).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    /// Counts one until the guard drops.
    pub fn track(&self) -> GaugeGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(self)
    }
}

pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Latencies in microseconds, 1 µs to 1 hour, 3 significant digits.
#[derive(Debug)]
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        let h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Latency(Mutex::new(h))
    }
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let micros = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.record(micros);
    }

    /// (quantile, microseconds) for the usual quantiles, plus max and count.
    pub fn snapshot(&self) -> LatencySnapshot {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        LatencySnapshot {
            count: h.len(),
            quantiles: [0.5, 0.9, 0.99, 0.999].map(|q| (q, h.value_at_quantile(q))),
            max: h.max(),
            sum: (h.mean() * h.len() as f64) as u64,
        }
    }
}

impl Latency {
    /// Records a batch under one lock.
    pub fn record_all(&self, micros: &[u32]) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for &m in micros {
            let _ = h.record(u64::from(m).clamp(1, 3_600_000_000));
        }
    }
}

/// A session's share of a shared counter, added to it in batches: relaying
/// a message then costs no write to a cache line every session shares.
pub struct LocalCounter<'a> {
    shared: &'a Counter,
    pending: u64,
}

impl<'a> LocalCounter<'a> {
    /// Flushed to `shared` every this many units (bytes) and on drop.
    const BATCH: u64 = 64 * 1024;

    pub fn new(shared: &'a Counter) -> Self {
        LocalCounter { shared, pending: 0 }
    }

    pub fn add(&mut self, n: u64) {
        self.pending += n;
        if self.pending >= Self::BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending > 0 {
            self.shared.add(std::mem::take(&mut self.pending));
        }
    }
}

impl Drop for LocalCounter<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A session's latency samples, recorded into a shared histogram in batches
/// (one lock per batch rather than per round trip).
///
/// The batch is inline, not a `Vec`: it lives as long as the session, and
/// a small allocation made while relaying would stay among the relay's
/// buffers after they are freed, holding the heap apart.
pub struct LocalLatency<'a> {
    shared: &'a Latency,
    /// µs, saturated at `u32::MAX` (71 minutes; the histogram stops at 60).
    micros: [u32; LATENCY_BATCH],
    len: usize,
}

/// Round trips a session records before taking the histogram's lock.
const LATENCY_BATCH: usize = 16;

impl<'a> LocalLatency<'a> {
    pub fn new(shared: &'a Latency) -> Self {
        LocalLatency {
            shared,
            micros: [0; LATENCY_BATCH],
            len: 0,
        }
    }

    pub fn record(&mut self, d: Duration) {
        self.micros[self.len] = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.len += 1;
        if self.len == LATENCY_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.len > 0 {
            self.shared.record_all(&self.micros[..self.len]);
            self.len = 0;
        }
    }
}

impl Drop for LocalLatency<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[derive(Debug, Clone)]
pub struct LatencySnapshot {
    pub count: u64,
    pub quantiles: [(f64, u64); 4],
    pub max: u64,
    pub sum: u64,
}

/// Everything pgpivot counts.
#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_accepted: Counter,
    pub sessions_active: Gauge,
    pub sessions_rejected_limit: Counter,
    pub sessions_held: Counter,
    /// Sessions waiting for an eligible node right now.
    pub sessions_waiting: Gauge,
    pub sessions_hold_timeout: Counter,
    pub fallbacks: Counter,
    pub cancel_requests: Counter,
    pub bytes_from_clients: Counter,
    pub bytes_to_clients: Counter,
    /// Sessions the proxy ended, by reason (see `session::ending`).
    pub ended_demoted: Counter,
    pub ended_node_lost: Counter,
    pub ended_promoted: Counter,
    pub ended_shutdown: Counter,
    pub ended_lagging: Counter,
    /// Sessions in a transaction or with answers pending, by class; what a
    /// pause waits for.
    pub busy_writers: Gauge,
    pub busy_readers: Gauge,
    /// Timing of round trips and byte counts in the relay (`[metrics]
    /// enabled`); the per-node figures live in `topology::NodeStats`.
    pub relay_timing: bool,
    /// How long held sessions waited for an eligible node.
    pub hold_time: Latency,
    /// Topology changes by kind.
    topology_changes: LabelCounts,
    /// Sessions moved to another node, and those that could not be.
    pub moves: MoveMetrics,
}

/// Counts by label, for events that happen a handful of times per failover
/// (a std Mutex, never held across an await).
#[derive(Debug, Default)]
pub struct LabelCounts(Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl LabelCounts {
    pub fn inc(&self, label: &'static str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(label).or_default() += 1;
    }

    pub fn get(&self) -> Vec<(&'static str, u64)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn total(&self) -> u64 {
        self.get().iter().map(|(_, n)| n).sum()
    }
}

/// What `[failover] move_sessions` did.
#[derive(Debug, Default)]
pub struct MoveMetrics {
    /// Sessions moved, by cause (why their node stopped being eligible).
    pub moved: LabelCounts,
    /// Moves tried that failed, by reason.
    pub failed: LabelCounts,
    /// Sessions ended instead of moved, by what kept them (pin reason,
    /// no credential).
    pub blocked: LabelCounts,
    /// From the relay stopping to the session relaying on its new node.
    pub move_time: Latency,
    /// Work in flight at a crash answered by pgpivot, by SQLSTATE (40001:
    /// rolled back, retry; 08007: outcome unknown).
    pub in_flight_answered: LabelCounts,
    /// Moved sessions that were LISTENing: notifications sent while they
    /// were between nodes are lost.
    pub moved_listening: Counter,
    /// Bytes of session state (SQL text, names) tracked for moves, over
    /// every open session.
    pub state_bytes: Gauge,
    /// Sessions that kept a credential to log in again.
    pub with_credential: Counter,
    /// Sessions whose role has no credential to log in again.
    pub without_credential: Counter,
    /// The roles those sessions logged in as (shown in `/status`; a std
    /// Mutex, touched once per such session).
    roles_without_credential: Mutex<std::collections::BTreeSet<String>>,
}

impl MoveMetrics {
    /// Counts a session of `role` that cannot move for want of a credential.
    pub fn no_credential(&self, role: &str) {
        self.without_credential.inc();
        let mut roles = self
            .roles_without_credential
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !roles.contains(role) {
            roles.insert(role.to_string());
        }
    }

    pub fn roles_without_credential(&self) -> Vec<String> {
        let roles = self
            .roles_without_credential
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        roles.iter().cloned().collect()
    }
}

impl Metrics {
    pub fn new(relay_timing: bool) -> Metrics {
        Metrics {
            relay_timing,
            ..Metrics::default()
        }
    }

    pub fn topology_change(&self, kind: &'static str) {
        self.topology_changes.inc(kind);
    }

    pub fn topology_changes(&self) -> Vec<(&'static str, u64)> {
        self.topology_changes.get()
    }

    /// The busy gauge of a session's class (writers need the primary).
    pub fn busy(&self, needs_primary: bool) -> &Gauge {
        if needs_primary {
            &self.busy_writers
        } else {
            &self.busy_readers
        }
    }

    /// Sessions ended because the topology changed under them.
    pub fn ended_by_topology(&self) -> u64 {
        self.ended_demoted.get() + self.ended_node_lost.get() + self.ended_promoted.get()
    }

    /// Counts a session the proxy ended itself.
    pub fn ended(&self, kind: EndKind) {
        match kind {
            EndKind::Demoted => self.ended_demoted.inc(),
            EndKind::NodeLost => self.ended_node_lost.inc(),
            EndKind::Promoted => self.ended_promoted.inc(),
            EndKind::Lagging => self.ended_lagging.inc(),
            EndKind::Shutdown => self.ended_shutdown.inc(),
        }
    }
}

/// Why the proxy ended a session, as counted (one counter each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    Demoted,
    NodeLost,
    Promoted,
    Lagging,
    Shutdown,
}

impl EndKind {
    /// The metric label and log field.
    pub fn as_label(self) -> &'static str {
        match self {
            EndKind::Demoted => "demoted",
            EndKind::NodeLost => "node_lost",
            EndKind::Promoted => "promoted",
            EndKind::Lagging => "lagging",
            EndKind::Shutdown => "shutdown",
        }
    }
}

//! The decider: the one writer of the topology snapshot.
//!
//! It receives every monitor [`Report`], applies hysteresis, records the
//! primary's WAL position for lag, and runs the pure
//! [`topology::decide`](crate::topology::decide). Each result is stored in an
//! `ArcSwap` (sessions `load()` it to route); when the generation changes it
//! is also announced on a `watch` channel, so sessions whose node stopped
//! being eligible learn of it at once, and the change is logged with its
//! figures.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::MonitorSettings;
use crate::metrics::Metrics;
use crate::monitor::MonitorHandle;
use crate::monitor::Report;
use crate::topology::{
    decide, Health, LsnHistory, NodeId, NodeInput, NodeSpec, Role, Status, Topology,
};

/// Read side of the snapshot, cloned into every session.
#[derive(Debug, Clone)]
pub struct TopologyHandle {
    current: Arc<ArcSwap<Topology>>,
    changes: watch::Receiver<u64>,
    events: Arc<ChangeLog>,
    metrics: Arc<Metrics>,
}

impl TopologyHandle {
    /// The current snapshot (cheap: an atomic load and a refcount).
    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// A receiver that wakes on every new generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Recent topology changes, newest last.
    pub fn changes(&self) -> Vec<ChangeRecord> {
        self.events.recent(SessionMarks::now(&self.metrics))
    }
}

#[cfg(test)]
impl TopologyHandle {
    /// A handle on `topology` that no decider writes, for stage tests; the
    /// returned functions publish a new snapshot as a decider would.
    pub(crate) fn fixed(topology: Topology) -> (TopologyHandle, impl Fn(Topology)) {
        let current = Arc::new(ArcSwap::from_pointee(topology));
        let (changes, rx) = watch::channel(0);
        let handle = TopologyHandle {
            current: current.clone(),
            changes: rx,
            events: Arc::default(),
            metrics: Arc::default(),
        };
        let publish = move |next: Topology| {
            current.store(Arc::new(next));
            changes.send_modify(|g| *g += 1);
        };
        (handle, publish)
    }
}

/// One topology change and its figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChangeRecord {
    /// Wall-clock time, ms since the Unix epoch.
    pub at_unix_ms: u64,
    pub generation: u64,
    /// `promotion`, `primary_lost`, `fenced`, `node_down`, `node_up`,
    /// `stale_primary`, `foreign_system`, `initial`.
    pub kind: &'static str,
    pub summary: String,
    /// Primary lost → new primary published (writes unavailable), when this
    /// change ended such a gap.
    pub write_gap_ms: Option<u64>,
    /// Sessions waiting for an eligible node when the change was published
    /// (released by a promotion, held by a loss).
    pub sessions_waiting: u64,
    /// Sessions pgpivot ended (node demoted, lost or promoted under them)
    /// from this change until the next one.
    pub sessions_ended: u64,
    /// Sessions moved to another node from this change until the next one.
    pub sessions_moved: u64,
    /// Of the sessions ended, those that could not move, by reason (pin,
    /// no credential) or failed move.
    pub sessions_not_moved: Vec<(&'static str, u64)>,
    /// The session counters when this change was published.
    #[serde(skip)]
    before: SessionMarks,
}

/// The counters a change's session figures are differences of.
#[derive(Debug, Clone, Default)]
struct SessionMarks {
    ended: u64,
    moved: u64,
    not_moved: Vec<(&'static str, u64)>,
}

impl SessionMarks {
    fn now(m: &Metrics) -> SessionMarks {
        let mut not_moved = m.moves.blocked.get();
        not_moved.extend(m.moves.failed.get());
        SessionMarks {
            ended: m.ended_by_topology(),
            moved: m.moves.moved.total(),
            not_moved,
        }
    }
}

impl ChangeRecord {
    /// Fills the session figures: what happened between `self.before` and
    /// `until`.
    fn settle(&mut self, until: &SessionMarks) {
        self.sessions_ended = until.ended.saturating_sub(self.before.ended);
        self.sessions_moved = until.moved.saturating_sub(self.before.moved);
        let earlier = |label: &str| {
            let found = self.before.not_moved.iter().find(|(l, _)| *l == label);
            found.map_or(0, |(_, n)| *n)
        };
        self.sessions_not_moved = until
            .not_moved
            .iter()
            .map(|(label, n)| (*label, n.saturating_sub(earlier(label))))
            .filter(|(_, n)| *n > 0)
            .collect();
    }

    /// "N sessions moved, M ended (temp_object 2, login 1)".
    pub fn sessions_summary(&self) -> String {
        let mut out = format!(
            "{} sessions moved, {} ended",
            self.sessions_moved,
            self.sessions_ended + self.sessions_not_moved.iter().map(|(_, n)| n).sum::<u64>()
        );
        if !self.sessions_not_moved.is_empty() {
            let why: Vec<String> = self
                .sessions_not_moved
                .iter()
                .map(|(l, n)| format!("{l} {n}"))
                .collect();
            out += &format!(" ({})", why.join(", "));
        }
        out
    }
}

/// Bounded history of changes (a std Mutex: pushed by the decider, read by
/// the admin endpoint, never held across an await).
#[derive(Debug, Default)]
struct ChangeLog(Mutex<VecDeque<ChangeRecord>>);

const CHANGES_KEPT: usize = 64;

impl ChangeLog {
    fn push(&self, record: ChangeRecord) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == CHANGES_KEPT {
            log.pop_front();
        }
        log.push_back(record);
    }

    /// The records, each with the sessions ended and moved between it and
    /// the next (or `now`).
    fn recent(&self, now: SessionMarks) -> Vec<ChangeRecord> {
        let log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<ChangeRecord> = log.iter().cloned().collect();
        let next_marks: Vec<SessionMarks> = records
            .iter()
            .skip(1)
            .map(|r| r.before.clone())
            .chain([now])
            .collect();
        for (record, until) in records.iter_mut().zip(&next_marks) {
            record.settle(until);
        }
        records
    }
}

/// After each topology change, once what happened to its sessions has
/// settled (the same figures two looks a second apart), logs it:
/// `generation 4 (promotion): 22 sessions moved, 1 ended (temp_object 1)`.
/// Changes that touched no session are not logged again.
pub async fn log_session_figures(topology: TopologyHandle, stop: CancellationToken) {
    let mut reported = 0u64;
    let mut last_look: Vec<(u64, String)> = Vec::new();
    let mut tick = crate::timers::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let look: Vec<(u64, String)> = topology
            .changes()
            .into_iter()
            .filter(|c| c.generation > reported)
            .map(|c| {
                let touched =
                    c.sessions_moved + c.sessions_ended > 0 || !c.sessions_not_moved.is_empty();
                let line = format!(
                    "generation {} ({}): {}",
                    c.generation,
                    c.kind,
                    c.sessions_summary()
                );
                (c.generation, if touched { line } else { String::new() })
            })
            .collect();
        for (generation, line) in &look {
            if last_look.contains(&(*generation, line.clone())) {
                if !line.is_empty() {
                    tracing::info!("{line}");
                }
                reported = reported.max(*generation);
            } else {
                break; // report in order
            }
        }
        last_look = look;
    }
}

/// A new node list and monitor settings, from a reload.
#[derive(Debug)]
pub struct Reconfigure {
    pub specs: Vec<NodeSpec>,
    pub settings: MonitorSettings,
    /// Answered once the snapshot with the new node list is published, so
    /// the next reload merges against it rather than against an older one.
    pub applied: oneshot::Sender<()>,
}

/// The decider task's state.
pub struct Decider {
    specs: Vec<NodeSpec>,
    inputs: Vec<NodeInput>,
    health: Vec<Health>,
    history: LsnHistory,
    settings: MonitorSettings,
    current: Arc<ArcSwap<Topology>>,
    changes: watch::Sender<u64>,
    events: Arc<ChangeLog>,
    /// When writes last became impossible (primary lost or fenced).
    write_gap_since: Option<Instant>,
    /// Last successful poll of each node (to say how long ago a lost primary
    /// last answered).
    last_ok: Vec<Option<Instant>>,
    /// The last primary, remembered through a gap with none.
    previous_primary: Option<NodeId>,
    metrics: Arc<Metrics>,
    /// Told to poll urgently while there is no primary.
    monitor: Arc<MonitorHandle>,
}

impl Decider {
    /// A decider for `specs` and the handle sessions read from.
    pub fn new(
        specs: Vec<NodeSpec>,
        settings: MonitorSettings,
        metrics: Arc<Metrics>,
        monitor: Arc<MonitorHandle>,
    ) -> (Decider, TopologyHandle) {
        let initial = Topology::initial(&specs);
        let current = Arc::new(ArcSwap::from_pointee(initial));
        let (changes, rx) = watch::channel(0);
        let events = Arc::new(ChangeLog::default());
        let handle = TopologyHandle {
            current: current.clone(),
            changes: rx,
            events: events.clone(),
            metrics: metrics.clone(),
        };
        let n = specs.len();
        let decider = Decider {
            specs,
            inputs: vec![NodeInput::default(); n],
            health: vec![Health::default(); n],
            history: LsnHistory::default(),
            settings,
            current,
            changes,
            events,
            write_gap_since: None,
            last_ok: vec![None; n],
            previous_primary: None,
            metrics,
            monitor,
        };
        (decider, handle)
    }

    /// Applies reports and reconfigurations until shutdown.
    pub async fn run(
        mut self,
        mut reports: mpsc::Receiver<Report>,
        mut reconfigure: mpsc::Receiver<Reconfigure>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                r = reports.recv() => match r {
                    Some(r) => self.apply(r),
                    None => return,
                },
                Some(r) = reconfigure.recv() => self.reconfigure(r),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Takes a new node list (same ids for kept nodes, new ones appended,
    /// removed ones marked) and monitor settings.
    fn reconfigure(&mut self, r: Reconfigure) {
        let n = r.specs.len();
        self.inputs.resize(n, NodeInput::default());
        self.health.resize(n, Health::default());
        self.last_ok.resize(n, None);
        for (i, spec) in r.specs.iter().enumerate() {
            let moved = self
                .specs
                .get(i)
                .is_some_and(|old| old.address != spec.address);
            if spec.removed || moved {
                // Whatever was observed belongs to the old address.
                self.inputs[i] = NodeInput::default();
                self.health[i] = Health::default();
            }
        }
        self.specs = r.specs;
        self.settings = r.settings;
        self.publish();
        // The reload may have given up waiting (shutdown): nothing to do.
        let _ = r.applied.send(());
    }

    fn apply(&mut self, report: Report) {
        let id = report.node;
        if id >= self.specs.len() || self.specs[id].removed {
            return; // a late report from a monitor stopped by a reload
        }
        let s = &self.settings;
        let up = self.health[id].record(report.result.is_ok(), s.failures, s.successes);
        self.inputs[id].polled_at = Some(report.at);
        match &report.result {
            Ok(obs) => {
                self.inputs[id].last = Some(*obs);
                self.last_ok[id] = Some(report.at);
                self.specs[id].stats.last_error.store(None);
            }
            Err(e) => {
                tracing::debug!(node = %self.specs[id].name, error = %e, "poll failed");
                let error = Some(Arc::new(e.to_string()));
                self.specs[id].stats.last_error.store(error);
            }
        }
        if let Some(obs) = report
            .result
            .as_ref()
            .ok()
            .filter(|o| o.role == Role::Primary)
        {
            self.history.record(report.at, obs.lsn);
        }
        let was_up = self.inputs[id].up;
        self.inputs[id].up = up;
        if was_up && !up {
            if let Err(e) = &report.result {
                tracing::warn!(node = %self.specs[id].name, error = %e, "node is down");
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let prev = self.current.load_full();
        let next = decide(
            &prev,
            &self.specs,
            &self.inputs,
            &self.history,
            Instant::now(),
        );
        let changed = next.generation != prev.generation;
        if changed {
            self.describe(&prev, &next);
        }
        let generation = next.generation;
        self.monitor.set_urgent(next.primary.is_none());
        self.current.store(Arc::new(next));
        if changed {
            self.changes.send_replace(generation);
        }
    }

    /// Logs and records what changed between two generations.
    fn describe(&mut self, prev: &Topology, next: &Topology) {
        let name = |id: NodeId| next.nodes[id].name.as_str();
        let now = Instant::now();
        for (before, after) in prev.nodes.iter().zip(&next.nodes) {
            if before.status == after.status {
                continue;
            }
            let (kind, summary) = node_change(&after.name, before.status, after.status);
            if kind == "stale_primary" || kind == "foreign_system" {
                tracing::error!(generation = next.generation, "{summary}");
            } else {
                tracing::info!(generation = next.generation, "{summary}");
            }
            self.record(next, kind, summary, None);
        }
        match (prev.primary, next.primary) {
            (old, Some(new)) if old != Some(new) => {
                let gap = self.write_gap_since.take().map(|t| now - t);
                let timeline = next.nodes[new].timeline.unwrap_or(0);
                let mut summary = format!("{} is primary on timeline {timeline}", name(new));
                if let Some(old) = old.or(self.previous_primary) {
                    let ago = self.last_ok[old].map_or(String::new(), |t| {
                        format!(" (last answered {} ms ago)", (now - t).as_millis())
                    });
                    summary.push_str(&format!(", replacing {}{ago}", name(old)));
                }
                if let Some(gap) = gap {
                    let waiting = self.metrics.sessions_waiting.get();
                    summary.push_str(&format!(
                        "; writes held for {} ms, {waiting} waiting sessions released",
                        gap.as_millis()
                    ));
                }
                let kind = if old.or(self.previous_primary).is_none() {
                    "initial"
                } else {
                    "promotion"
                };
                self.previous_primary = Some(new);
                tracing::info!(generation = next.generation, "{summary}");
                self.record(next, kind, summary, gap.map(|g| g.as_millis() as u64));
            }
            (Some(old), None) => {
                self.write_gap_since = Some(now);
                self.previous_primary = Some(old);
                let why = if next.fenced {
                    "writes fenced"
                } else {
                    "no primary"
                };
                let kind = if next.fenced {
                    "fenced"
                } else {
                    "primary_lost"
                };
                let summary = format!(
                    "primary {} lost: {why}; new write sessions are held",
                    name(old)
                );
                if next.fenced {
                    tracing::error!(generation = next.generation, "{summary}");
                } else {
                    tracing::warn!(generation = next.generation, "{summary}");
                }
                self.record(next, kind, summary, None);
            }
            _ => {}
        }
    }

    fn record(&self, t: &Topology, kind: &'static str, summary: String, gap: Option<u64>) {
        self.metrics.topology_change(kind);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
        self.events.push(ChangeRecord {
            at_unix_ms: now.map_or(0, |d| d.as_millis() as u64),
            generation: t.generation,
            kind,
            summary,
            write_gap_ms: gap,
            sessions_waiting: self.metrics.sessions_waiting.get(),
            sessions_ended: 0,
            sessions_moved: 0,
            sessions_not_moved: Vec::new(),
            before: SessionMarks::now(&self.metrics),
        });
    }
}

/// Kind and sentence for one node's status change.
fn node_change(name: &str, before: Status, after: Status) -> (&'static str, String) {
    match after {
        Status::Down => ("node_down", format!("{name} is down (was {})", before.name())),
        Status::StalePrimary { timeline, current } => (
            "stale_primary",
            format!(
                "{name} is a primary on old timeline {timeline} (newest is {current}): never a write target"
            ),
        ),
        Status::ForeignSystem { system_id } => (
            "foreign_system",
            format!("{name} belongs to another cluster (system identifier {system_id}): excluded"),
        ),
        Status::Fenced => ("fenced", format!("{name} is fenced: another primary on the same timeline")),
        Status::Removed => ("node_removed", format!("{name} was removed from the configuration")),
        _ if before == Status::Down => ("node_up", format!("{name} is up as {}", after.name())),
        _ => ("role_change", format!("{name} is now {} (was {})", after.name(), before.name())),
    }
}

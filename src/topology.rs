//! The cluster as pgpivot sees it, and the rules that decide it.
//!
//! Everything here is pure: the [`decider`](crate::decider) task feeds in
//! what the monitors observed and publishes the [`Topology`] that
//! [`decide`] returns. Keeping the rules free of I/O lets the unit tests below
//! walk through every failover case without a server.
//!
//! The rules (README, "Topology rules"):
//! - The primary is the reachable node that is not in recovery.
//! - Two such nodes: the higher timeline wins. A tie leaves no write target
//!   (fenced) until it resolves.
//! - A node that was primary and comes back on a lower timeline than the
//!   highest ever seen is a stale primary, never a write target again.
//! - A node whose system identifier differs from the cluster's is excluded.

use crate::address::BackendAddress;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{Counter, Latency};

/// Index of a node in the configured node list.
pub type NodeId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
}

/// What one successful poll of a node read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub role: Role,
    pub timeline: u32,
    /// On a primary its current WAL position; on a standby its replay
    /// position (0 before it replayed anything).
    pub lsn: u64,
    pub system_id: u64,
}

/// The decider's input for one node: health after hysteresis and the last
/// successful observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeInput {
    pub up: bool,
    pub last: Option<Observation>,
    /// When the node was last polled, successfully or not.
    pub polled_at: Option<Instant>,
}

/// What a node is good for in this topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Status {
    /// The write target.
    Primary,
    /// A hot standby, a read target within the lag budgets.
    Standby,
    /// Not reachable (or not yet polled).
    Down,
    /// Not in recovery, but on a timeline below the cluster's newest.
    StalePrimary { timeline: u32, current: u32 },
    /// Not in recovery and tied with another such node on the newest
    /// timeline: no write target until it resolves.
    Fenced,
    /// Belongs to another cluster (different system identifier).
    ForeignSystem { system_id: u64 },
    /// Removed from the configuration by a reload.
    Removed,
}

impl Status {
    /// The status as one word, for logs, `/status` and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Status::Primary => "primary",
            Status::Standby => "standby",
            Status::Down => "down",
            Status::StalePrimary { .. } => "stale_primary",
            Status::Fenced => "fenced",
            Status::ForeignSystem { .. } => "foreign_system",
            Status::Removed => "removed",
        }
    }
}

/// Live figures of one node: sessions routed to it now (shared by every
/// snapshot, so routing sees live counts without a new snapshot per session)
/// and its latency histograms.
#[derive(Debug, Default)]
pub struct NodeStats {
    sessions: AtomicUsize,
    /// Opening a session's backend connection: TCP, TLS, the startup packet
    /// and the server's first answer.
    pub connect_latency: Latency,
    /// A client message that expects an answer → the ReadyForQuery closing it.
    pub round_trip: Latency,
    pub connects: Counter,
    pub connect_failures: Counter,
    /// Why the last poll failed; cleared by a successful one. Shown in
    /// `/status` so that a node marked down says why (a TLS certificate for
    /// another name, say).
    pub last_error: arc_swap::ArcSwapOption<String>,
}

impl NodeStats {
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Counts one session until the guard drops.
    pub fn enter(self: &Arc<Self>) -> LoadGuard {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        LoadGuard(self.clone())
    }
}

#[derive(Debug)]
pub struct LoadGuard(Arc<NodeStats>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One node in a snapshot.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub address: BackendAddress,
    pub weight: u32,
    pub status: Status,
    pub timeline: Option<u32>,
    pub lsn: Option<u64>,
    /// WAL bytes behind the primary (standbys only, when measurable).
    pub lag_bytes: Option<u64>,
    /// How old the standby's replayed state is, on pgpivot's clock.
    pub lag: Option<Duration>,
    pub stats: Arc<NodeStats>,
    /// When the monitor last reported on this node.
    pub polled_at: Option<Instant>,
}

impl NodeView {
    pub fn is_standby(&self) -> bool {
        self.status == Status::Standby
    }
}

/// An immutable snapshot of the cluster. `generation` changes exactly when
/// what a session may be routed to changes (not on lag updates).
#[derive(Debug, Clone)]
pub struct Topology {
    pub generation: u64,
    pub nodes: Vec<NodeView>,
    pub primary: Option<NodeId>,
    /// Two primaries tied on the newest timeline: writes are refused.
    pub fenced: bool,
    /// Highest timeline any primary was seen on.
    pub max_timeline: u32,
    /// The cluster's system identifier, fixed by the first observation.
    pub system_id: Option<u64>,
}

/// A node as configured, for building snapshots.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub address: BackendAddress,
    pub weight: u32,
    pub stats: Arc<NodeStats>,
    /// Removed by a reload: kept as a tombstone so node ids stay stable.
    pub removed: bool,
}

impl NodeSpec {
    /// A configured node with fresh figures.
    pub fn new(name: &str, address: &BackendAddress, weight: u32) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            address: address.clone(),
            weight,
            stats: Arc::default(),
            removed: false,
        }
    }
}

impl Topology {
    /// The snapshot before any poll: every node down, no primary.
    pub fn initial(specs: &[NodeSpec]) -> Topology {
        let inputs = vec![NodeInput::default(); specs.len()];
        let empty = Topology {
            generation: 0,
            nodes: Vec::new(),
            primary: None,
            fenced: false,
            max_timeline: 0,
            system_id: None,
        };
        let mut t = decide(
            &empty,
            specs,
            &inputs,
            &LsnHistory::default(),
            Instant::now(),
        );
        t.generation = 0;
        t
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeView> {
        self.nodes.get(id)
    }

    pub fn primary_view(&self) -> Option<&NodeView> {
        self.primary.and_then(|id| self.node(id))
    }

    /// What routing depends on; a change here is a new generation.
    fn routing_shape(&self) -> RoutingShape<'_> {
        let nodes = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), &n.address, n.status))
            .collect();
        (self.primary, self.fenced, nodes)
    }
}

/// Primary, fenced, and each node's (name, address, status).
type RoutingShape<'a> = (
    Option<NodeId>,
    bool,
    Vec<(&'a str, &'a BackendAddress, Status)>,
);

/// Computes the next topology from the previous one and the current inputs
/// (one per spec, same order).
pub fn decide(
    prev: &Topology,
    specs: &[NodeSpec],
    inputs: &[NodeInput],
    history: &LsnHistory,
    now: Instant,
) -> Topology {
    let observed = |i: usize| inputs[i].last.filter(|_| inputs[i].up && !specs[i].removed);
    let system_id = prev
        .system_id
        .or_else(|| (0..inputs.len()).find_map(|i| observed(i).map(|o| o.system_id)));
    let ours = |i: usize| observed(i).filter(|o| Some(o.system_id) == system_id);
    let primaries: Vec<(NodeId, u32)> = (0..inputs.len())
        .filter_map(|i| {
            ours(i)
                .filter(|o| o.role == Role::Primary)
                .map(|o| (i, o.timeline))
        })
        .collect();
    let max_timeline = primaries
        .iter()
        .map(|&(_, tl)| tl)
        .fold(prev.max_timeline, u32::max);
    let newest: Vec<NodeId> = primaries
        .iter()
        .filter(|&&(_, tl)| tl == max_timeline)
        .map(|&(i, _)| i)
        .collect();
    let fenced = newest.len() > 1;
    let primary = (newest.len() == 1).then(|| newest[0]);
    let status = |i: usize| match (observed(i), ours(i)) {
        _ if specs[i].removed => Status::Removed,
        (None, _) => Status::Down,
        (Some(o), None) => Status::ForeignSystem {
            system_id: o.system_id,
        },
        (Some(o), Some(_)) if o.role == Role::Standby => Status::Standby,
        (Some(_), Some(_)) if primary == Some(i) => Status::Primary,
        (Some(_), Some(_)) if fenced && newest.contains(&i) => Status::Fenced,
        (Some(o), Some(_)) => Status::StalePrimary {
            timeline: o.timeline,
            current: max_timeline,
        },
    };
    let nodes = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let status = status(i);
            let last = inputs[i].last;
            let lag = (status == Status::Standby)
                .then(|| last.and_then(|o| history.lag(o.lsn, now)))
                .flatten();
            NodeView {
                id: i,
                name: spec.name.clone(),
                address: spec.address.clone(),
                weight: spec.weight,
                status,
                timeline: last.map(|o| o.timeline),
                lsn: last.map(|o| o.lsn),
                lag_bytes: lag.map(|(bytes, _)| bytes),
                lag: lag.map(|(_, age)| age),
                stats: spec.stats.clone(),
                polled_at: inputs[i].polled_at,
            }
        })
        .collect();
    let mut next = Topology {
        generation: prev.generation,
        nodes,
        primary,
        fenced,
        max_timeline,
        system_id,
    };
    if next.routing_shape() != prev.routing_shape() {
        next.generation = prev.generation + 1;
    }
    next
}

/// Up/down with hysteresis: a node goes down after `failures` consecutive
/// failed polls and comes back after `successes` good ones. The very first
/// poll decides at once, so a starting proxy finds its primary immediately.
#[derive(Debug, Clone, Default)]
pub struct Health {
    up: Option<bool>,
    streak: u32,
}

impl Health {
    /// Records one poll result; returns whether the node counts as up.
    pub fn record(&mut self, ok: bool, failures: u32, successes: u32) -> bool {
        match self.up {
            None => {
                self.up = Some(ok);
                self.streak = 0;
            }
            Some(up) if up == ok => self.streak = 0,
            Some(up) => {
                self.streak += 1;
                let needed = if up { failures } else { successes };
                if self.streak >= needed {
                    self.up = Some(ok);
                    self.streak = 0;
                }
            }
        }
        self.up == Some(true)
    }
}

/// The primary's WAL position over time, on pgpivot's clock, to turn a
/// standby's replay position into an age without trusting either server's
/// clock: a standby replayed to L is as old as the first sample whose LSN
/// went past L. An idle primary adds no samples, so its standbys, once caught
/// up, show zero lag however long the primary stays idle.
#[derive(Debug, Default)]
pub struct LsnHistory {
    /// (when first seen, primary LSN), LSNs strictly increasing.
    samples: VecDeque<(Instant, u64)>,
}

/// Samples kept; at the default 250 ms interval, about 17 minutes of writes.
const HISTORY_LEN: usize = 4096;

impl LsnHistory {
    /// Records a primary LSN seen at `at`.
    pub fn record(&mut self, at: Instant, lsn: u64) {
        if self.samples.back().is_some_and(|&(_, last)| lsn <= last) {
            return;
        }
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back((at, lsn));
    }

    pub fn latest(&self) -> Option<u64> {
        self.samples.back().map(|&(_, lsn)| lsn)
    }

    /// (bytes behind, age) of a standby replayed to `replayed`; `None` before
    /// any primary sample exists.
    pub fn lag(&self, replayed: u64, now: Instant) -> Option<(u64, Duration)> {
        let latest = self.latest()?;
        if replayed >= latest {
            return Some((0, Duration::ZERO));
        }
        // First sample past `replayed`; when history does not reach back that
        // far, the oldest sample bounds the age from below.
        let idx = self.samples.partition_point(|&(_, lsn)| lsn <= replayed);
        let (since, _) = self.samples[idx.min(self.samples.len() - 1)];
        Some((latest - replayed, now.saturating_duration_since(since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS: u64 = 42;

    fn specs(n: usize) -> Vec<NodeSpec> {
        (0..n)
            .map(|i| NodeSpec {
                name: format!("pg{}", i + 1),
                address: BackendAddress::Tcp(format!("127.0.0.1:{}", 5432 + i)),
                weight: 1,
                stats: Arc::default(),
                removed: false,
            })
            .collect()
    }

    fn primary(timeline: u32) -> NodeInput {
        node(Role::Primary, timeline, SYS)
    }

    fn standby(timeline: u32) -> NodeInput {
        node(Role::Standby, timeline, SYS)
    }

    fn node(role: Role, timeline: u32, system_id: u64) -> NodeInput {
        NodeInput {
            up: true,
            last: Some(Observation {
                role,
                timeline,
                lsn: 100,
                system_id,
            }),
            polled_at: None,
        }
    }

    fn down() -> NodeInput {
        NodeInput::default()
    }

    /// Feeds a sequence of input rounds through `decide`, returning the last.
    fn run(rounds: &[Vec<NodeInput>]) -> Topology {
        let s = specs(rounds[0].len());
        let mut t = Topology::initial(&s);
        for inputs in rounds {
            t = decide(&t, &s, inputs, &LsnHistory::default(), Instant::now());
        }
        t
    }

    fn statuses(t: &Topology) -> Vec<Status> {
        t.nodes.iter().map(|n| n.status).collect()
    }

    #[test]
    fn the_node_not_in_recovery_is_primary() {
        let t = run(&[vec![primary(1), standby(1), standby(1)]]);
        assert_eq!(t.primary, Some(0));
        assert_eq!(
            statuses(&t),
            [Status::Primary, Status::Standby, Status::Standby]
        );
        assert_eq!(t.generation, 1);
    }

    #[test]
    fn no_reachable_primary_means_no_write_target() {
        let t = run(&[vec![down(), standby(1), standby(1)]]);
        assert_eq!(t.primary, None);
        assert!(!t.fenced);
    }

    #[test]
    fn promotion_to_a_higher_timeline_wins_even_before_the_old_primary_is_down() {
        let t = run(&[
            vec![primary(1), standby(1), standby(1)],
            vec![primary(1), primary(2), standby(1)],
        ]);
        assert_eq!(t.primary, Some(1));
        assert_eq!(
            t.nodes[0].status,
            Status::StalePrimary {
                timeline: 1,
                current: 2
            }
        );
    }

    #[test]
    fn a_tie_on_the_newest_timeline_fences_writes() {
        let t = run(&[vec![primary(3), primary(3), standby(3)]]);
        assert_eq!(t.primary, None);
        assert!(t.fenced);
        assert_eq!(statuses(&t)[..2], [Status::Fenced, Status::Fenced]);
    }

    #[test]
    fn a_tie_resolves_when_one_side_goes() {
        let t = run(&[vec![primary(3), primary(3)], vec![down(), primary(3)]]);
        assert_eq!(t.primary, Some(1));
        assert!(!t.fenced);
    }

    #[test]
    fn an_old_primary_returning_on_a_lower_timeline_is_never_a_write_target() {
        let t = run(&[
            vec![primary(1), standby(1)],
            vec![down(), primary(2)],
            // The new primary is lost, then the old one comes back as primary.
            vec![down(), down()],
            vec![primary(1), down()],
        ]);
        assert_eq!(t.primary, None);
        assert_eq!(
            t.nodes[0].status,
            Status::StalePrimary {
                timeline: 1,
                current: 2
            }
        );
    }

    #[test]
    fn a_node_from_another_cluster_is_excluded() {
        let t = run(&[vec![primary(1), node(Role::Primary, 5, 7), standby(1)]]);
        assert_eq!(t.primary, Some(0));
        assert_eq!(t.nodes[1].status, Status::ForeignSystem { system_id: 7 });
        assert_eq!(t.max_timeline, 1, "a foreign timeline must not count");
    }

    #[test]
    fn generation_changes_only_with_the_routing_shape() {
        let s = specs(2);
        let t0 = Topology::initial(&s);
        let inputs = vec![primary(1), standby(1)];
        let mut h = LsnHistory::default();
        let t1 = decide(&t0, &s, &inputs, &h, Instant::now());
        h.record(Instant::now(), 500);
        let t2 = decide(&t1, &s, &inputs, &h, Instant::now());
        assert_eq!(
            t1.generation, t2.generation,
            "lag alone is not a new generation"
        );
        assert_eq!(t2.nodes[1].lag_bytes, Some(400));
        let t3 = decide(&t2, &s, &[down(), standby(1)], &h, Instant::now());
        assert_eq!(t3.generation, t2.generation + 1);
    }

    #[test]
    fn health_has_hysteresis() {
        let mut h = Health::default();
        assert!(h.record(true, 2, 2), "first poll decides at once");
        assert!(h.record(false, 2, 2), "one failure is not enough");
        assert!(h.record(true, 2, 2));
        assert!(h.record(false, 2, 2));
        assert!(!h.record(false, 2, 2), "two in a row are");
        assert!(!h.record(true, 2, 2));
        assert!(!h.record(false, 2, 2), "a failure resets the streak");
        assert!(!h.record(true, 2, 2));
        assert!(h.record(true, 2, 2));
        let mut fresh = Health::default();
        assert!(!fresh.record(false, 2, 2), "a first failure means down");
    }

    #[test]
    fn lag_is_measured_on_our_clock() {
        let t0 = Instant::now();
        let mut h = LsnHistory::default();
        assert_eq!(h.lag(0, t0), None);
        h.record(t0, 100);
        h.record(t0 + Duration::from_secs(1), 200);
        h.record(t0 + Duration::from_secs(2), 200); // idle: no new sample
        h.record(t0 + Duration::from_secs(3), 300);
        let now = t0 + Duration::from_secs(10);
        assert_eq!(h.lag(300, now), Some((0, Duration::ZERO)));
        assert_eq!(h.lag(400, now), Some((0, Duration::ZERO)));
        // Replayed to 250: the primary first passed 250 at t0+3.
        assert_eq!(h.lag(250, now), Some((50, Duration::from_secs(7))));
        // Replayed to 200 exactly: 300 at t0+3 was the first sample past it.
        assert_eq!(h.lag(200, now), Some((100, Duration::from_secs(7))));
        assert_eq!(h.lag(150, now), Some((150, Duration::from_secs(9))));
        // Older than the history: bounded by the oldest sample.
        assert_eq!(h.lag(50, now), Some((250, Duration::from_secs(10))));
    }
}

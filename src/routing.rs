//! Which node a new session goes to: a pure function of the session's target,
//! its lag budget and the current [`Topology`].
//!
//! Targets follow libpq's `target_session_attrs`. Standbys are eligible while
//! they are within both lag budgets; among eligible standbys the one with the
//! fewest sessions per unit of weight wins, ties broken round-robin.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topology::{NodeId, NodeView, Topology};

/// libpq's `target_session_attrs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The primary.
    #[default]
    ReadWrite,
    /// A standby within budget, else the primary with
    /// `default_transaction_read_only=on`.
    ReadOnly,
    /// The primary (same as read-write here).
    Primary,
    /// A standby within budget, or wait.
    Standby,
    /// A standby within budget, else the primary.
    PreferStandby,
    /// The primary or any standby within budget.
    Any,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        Some(match s {
            "read-write" => Target::ReadWrite,
            "read-only" => Target::ReadOnly,
            "primary" => Target::Primary,
            "standby" => Target::Standby,
            "prefer-standby" => Target::PreferStandby,
            "any" => Target::Any,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Target::ReadWrite => "read-write",
            Target::ReadOnly => "read-only",
            Target::Primary => "primary",
            Target::Standby => "standby",
            Target::PreferStandby => "prefer-standby",
            Target::Any => "any",
        }
    }

    /// Whether sessions of this target must be on the primary.
    pub fn needs_primary(self) -> bool {
        matches!(self, Target::ReadWrite | Target::Primary)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far behind the primary a standby may be to get new sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LagBudget {
    pub max_bytes: Option<u64>,
    pub max_lag: Option<Duration>,
}

impl LagBudget {
    /// Whether a standby is within the budget. Lag that cannot be measured
    /// (no primary sample yet) passes only an unlimited budget.
    pub fn admits(&self, node: &NodeView) -> bool {
        let bytes_ok = match (self.max_bytes, node.lag_bytes) {
            (None, _) => true,
            (Some(max), Some(lag)) => lag <= max,
            (Some(_), None) => false,
        };
        let time_ok = match (self.max_lag, node.lag) {
            (None, _) => true,
            (Some(max), Some(lag)) => lag <= max,
            (Some(_), None) => false,
        };
        bytes_ok && time_ok
    }
}

/// Where a session goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub node: NodeId,
    /// A read-only session placed on the primary: it must be made read-only.
    pub read_only_on_primary: bool,
    /// A standby target fell back to the primary (logged and counted).
    pub fell_back: bool,
}

/// Why no node can take the session right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// Two primaries tie on the newest timeline.
    Fenced,
    /// No primary is known.
    NoPrimary,
    /// No standby within budget (target `standby`).
    NoStandby,
}

impl std::fmt::Display for NoRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoRoute::Fenced => "writes are fenced: two primaries on the same timeline",
            NoRoute::NoPrimary => "no primary is available",
            NoRoute::NoStandby => "no standby within the lag budget is available",
        })
    }
}

/// Picks a node for a new session. `tiebreak` rotates among equally loaded
/// standbys (pass a counter that advances per session).
pub fn route(
    topology: &Topology,
    target: Target,
    budget: &LagBudget,
    tiebreak: usize,
) -> Result<Choice, NoRoute> {
    let primary = || match (topology.primary, topology.fenced) {
        (Some(node), _) => Ok(node),
        (None, true) => Err(NoRoute::Fenced),
        (None, false) => Err(NoRoute::NoPrimary),
    };
    let standby = || least_loaded(topology, budget, tiebreak, false);
    let on_primary = |read_only: bool| {
        primary().map(|node| Choice {
            node,
            read_only_on_primary: read_only,
            fell_back: true,
        })
    };
    let on = |node| Choice {
        node,
        read_only_on_primary: false,
        fell_back: false,
    };
    match target {
        Target::ReadWrite | Target::Primary => primary().map(on),
        Target::Standby => standby().map(on).ok_or(NoRoute::NoStandby),
        Target::PreferStandby => standby().map(on).map_or_else(|| on_primary(false), Ok),
        Target::ReadOnly => standby().map(on).map_or_else(|| on_primary(true), Ok),
        Target::Any => least_loaded(topology, budget, tiebreak, true)
            .map(on)
            .ok_or_else(|| primary().err().unwrap_or(NoRoute::NoPrimary)),
    }
}

/// The eligible node with the fewest sessions per weight; `with_primary`
/// adds the primary to the candidates.
fn least_loaded(
    topology: &Topology,
    budget: &LagBudget,
    tiebreak: usize,
    with_primary: bool,
) -> Option<NodeId> {
    let eligible = |n: &&NodeView| {
        n.weight > 0
            && ((n.is_standby() && budget.admits(n))
                || (with_primary && Some(n.id) == topology.primary))
    };
    // (sessions + 1) / weight, compared without division. Session counts
    // move under our feet, so each is read exactly once.
    let scored: Vec<(NodeId, (u64, u64))> = topology
        .nodes
        .iter()
        .filter(eligible)
        .map(|n| (n.id, (n.stats.sessions() as u64 + 1, n.weight as u64)))
        .collect();
    let better = |a: (u64, u64), b: (u64, u64)| (a.0 * b.1).cmp(&(b.0 * a.1));
    let best = scored
        .iter()
        .map(|&(_, s)| s)
        .min_by(|&a, &b| better(a, b))?;
    let tied: Vec<NodeId> = scored
        .iter()
        .filter(|&&(_, s)| better(s, best).is_eq())
        .map(|&(id, _)| id)
        .collect();
    Some(tied[tiebreak % tied.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{decide, LsnHistory, NodeInput, NodeSpec, Observation, Role};
    use std::sync::Arc;
    use std::time::Instant;

    fn input(role: Role, lsn: u64) -> NodeInput {
        NodeInput {
            up: true,
            last: Some(Observation {
                role,
                timeline: 1,
                lsn,
                system_id: 1,
            }),
            polled_at: None,
        }
    }

    /// A primary at LSN 1000 and standbys replayed to the given LSNs.
    fn cluster(standby_lsns: &[Option<u64>]) -> Topology {
        let n = standby_lsns.len() + 1;
        let specs: Vec<NodeSpec> = (0..n)
            .map(|i| NodeSpec {
                name: format!("pg{i}"),
                address: crate::address::BackendAddress::Tcp(String::new()),
                weight: 1,
                stats: Arc::default(),
                removed: false,
            })
            .collect();
        let mut inputs = vec![input(Role::Primary, 1000)];
        inputs.extend(standby_lsns.iter().map(|l| match l {
            Some(lsn) => input(Role::Standby, *lsn),
            None => NodeInput::default(),
        }));
        let mut h = LsnHistory::default();
        h.record(Instant::now(), 1000);
        decide(
            &Topology::initial(&specs),
            &specs,
            &inputs,
            &h,
            Instant::now(),
        )
    }

    const NONE: LagBudget = LagBudget {
        max_bytes: None,
        max_lag: None,
    };
    const TIGHT: LagBudget = LagBudget {
        max_bytes: Some(100),
        max_lag: None,
    };

    fn node(t: &Topology, target: Target, budget: &LagBudget) -> Result<NodeId, NoRoute> {
        route(t, target, budget, 0).map(|c| c.node)
    }

    #[test]
    fn writes_go_to_the_primary() {
        let t = cluster(&[Some(1000), Some(1000)]);
        assert_eq!(node(&t, Target::ReadWrite, &NONE), Ok(0));
        assert_eq!(node(&t, Target::Primary, &NONE), Ok(0));
    }

    #[test]
    fn reads_spread_over_standbys_round_robin_when_equally_loaded() {
        let t = cluster(&[Some(1000), Some(1000)]);
        let picks: Vec<_> = (0..4)
            .map(|i| route(&t, Target::PreferStandby, &NONE, i).unwrap().node)
            .collect();
        assert_eq!(picks, [1, 2, 1, 2]);
    }

    #[test]
    fn least_sessions_wins() {
        let t = cluster(&[Some(1000), Some(1000)]);
        let _busy = t.nodes[1].stats.enter();
        for i in 0..3 {
            assert_eq!(route(&t, Target::Standby, &NONE, i).unwrap().node, 2);
        }
    }

    #[test]
    fn weight_scales_the_share() {
        let mut t = cluster(&[Some(1000), Some(1000)]);
        t.nodes[1].weight = 3;
        let _a = t.nodes[1].stats.enter();
        let _b = t.nodes[1].stats.enter();
        // pg1: (2 + 1) / 3 = 1 beats pg2: (1 + 1) / 1 = 2.
        let _c = t.nodes[2].stats.enter();
        assert_eq!(node(&t, Target::Standby, &NONE), Ok(1));
        t.nodes[2].weight = 0;
        let _d = t.nodes[1].stats.enter();
        assert_eq!(
            node(&t, Target::Standby, &NONE),
            Ok(1),
            "weight 0 never reads"
        );
    }

    #[test]
    fn lagging_standbys_get_no_sessions() {
        let t = cluster(&[Some(500), Some(990)]);
        assert_eq!(node(&t, Target::Standby, &TIGHT), Ok(2));
        assert_eq!(
            node(&t, Target::Any, &TIGHT),
            Ok(0),
            "primary has no sessions either"
        );
    }

    #[test]
    fn fallbacks_follow_the_target() {
        let t = cluster(&[Some(10), None]);
        assert_eq!(node(&t, Target::Standby, &TIGHT), Err(NoRoute::NoStandby));
        let c = route(&t, Target::PreferStandby, &TIGHT, 0).unwrap();
        assert_eq!(
            (c.node, c.fell_back, c.read_only_on_primary),
            (0, true, false)
        );
        let c = route(&t, Target::ReadOnly, &TIGHT, 0).unwrap();
        assert_eq!((c.node, c.read_only_on_primary), (0, true));
    }

    #[test]
    fn no_primary_and_fenced_are_told_apart() {
        let mut t = cluster(&[Some(1000)]);
        t.primary = None;
        assert_eq!(node(&t, Target::ReadWrite, &NONE), Err(NoRoute::NoPrimary));
        t.fenced = true;
        assert_eq!(node(&t, Target::ReadWrite, &NONE), Err(NoRoute::Fenced));
        assert_eq!(node(&t, Target::PreferStandby, &NONE), Ok(1));
    }

    #[test]
    fn target_names_round_trip() {
        for t in [
            Target::ReadWrite,
            Target::ReadOnly,
            Target::Primary,
            Target::Standby,
            Target::PreferStandby,
            Target::Any,
        ] {
            assert_eq!(Target::parse(t.as_str()), Some(t));
        }
        assert_eq!(Target::parse("leader"), None);
    }
}

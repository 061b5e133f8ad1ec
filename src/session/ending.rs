//! Why the proxy ends a session itself, and when a session's node stops
//! being eligible for it.

use crate::metrics::EndKind;
use crate::protocol::sqlstate;
use crate::routing::Target;
use crate::topology::{NodeId, Status, Topology};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// A read-write session's node is no longer the primary.
    NotPrimary {
        node: String,
        new_primary: Option<String>,
    },
    /// The node is down or excluded.
    NodeLost { node: String },
    /// A standby session's node was promoted (targets that require a standby).
    Promoted { node: String },
    /// The session's standby fell behind its lag budget (`on_lag =
    /// "disconnect"`).
    Lagging { node: String },
    /// The proxy is shutting down.
    Shutdown,
}

impl EndReason {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            EndReason::NodeLost { .. } => sqlstate::CONNECTION_FAILURE,
            _ => sqlstate::ADMIN_SHUTDOWN,
        }
    }

    /// What the client is told: the reason, said once to come from pgpivot.
    pub fn message(&self) -> String {
        match self {
            EndReason::Shutdown => "pgpivot is shutting down".into(),
            _ => format!("pgpivot: {}", self.detail()),
        }
    }

    /// The reason without the "pgpivot: " prefix, for messages that carry
    /// their own (a failed connect's, say).
    pub fn detail(&self) -> String {
        match self {
            EndReason::NotPrimary { node, new_primary } => match new_primary {
                Some(p) => {
                    format!("{node} is no longer the primary; the new primary is {p}: reconnect")
                }
                None => format!(
                    "{node} is no longer the primary and no primary is available yet: reconnect"
                ),
            },
            EndReason::NodeLost { node } => format!("lost server {node}"),
            EndReason::Promoted { node } => {
                format!("{node} was promoted and is no longer a standby: reconnect")
            }
            EndReason::Lagging { node } => {
                format!("{node} fell behind the lag budget of this session: reconnect")
            }
            EndReason::Shutdown => "the proxy is shutting down".into(),
        }
    }

    /// Whether the session was cut because its node may no longer receive
    /// its traffic (ended at once, not at an idle point): what is still
    /// queued for the node is then discarded, not delivered.
    pub fn abandons_node(&self) -> bool {
        matches!(
            self,
            EndReason::NotPrimary { .. } | EndReason::NodeLost { .. } | EndReason::Promoted { .. }
        )
    }

    /// How this ending is counted and labelled.
    pub fn kind(&self) -> EndKind {
        match self {
            EndReason::NotPrimary { .. } => EndKind::Demoted,
            EndReason::NodeLost { .. } => EndKind::NodeLost,
            EndReason::Promoted { .. } => EndKind::Promoted,
            EndReason::Lagging { .. } => EndKind::Lagging,
            EndReason::Shutdown => EndKind::Shutdown,
        }
    }
}

/// Why a session on `node` with `target` must end under `topology`, if it
/// must. Sessions that needed a primary end as soon as their node is not the
/// primary (demoted, stale, fenced or down): none may keep writing to a stale
/// primary. Read sessions end when their node is lost; a standby that is
/// promoted stays valid for targets that accept a primary; `standby` and
/// `read-only` sessions that started on it end, since it now takes writes.
pub fn eligibility(
    topology: &Topology,
    node: NodeId,
    target: Target,
    placed_on_standby: bool,
) -> Option<EndReason> {
    let view = topology.node(node)?;
    let name = view.name.clone();
    if target.needs_primary() {
        if topology.primary == Some(node) {
            return None;
        }
        let new_primary = topology.primary_view().map(|p| p.name.clone());
        return Some(EndReason::NotPrimary {
            node: name,
            new_primary,
        });
    }
    match view.status {
        Status::Standby => None,
        Status::Primary => match target {
            Target::Standby | Target::ReadOnly if placed_on_standby => {
                Some(EndReason::Promoted { node: name })
            }
            _ => None,
        },
        _ => Some(EndReason::NodeLost { node: name }),
    }
}

/// Resolves when a session starting on `node` with `target` would have to
/// end (its node demoted, lost or excluded).
pub async fn lost(
    topology: &crate::decider::TopologyHandle,
    node: NodeId,
    target: Target,
    placed_on_standby: bool,
) -> EndReason {
    let mut changes = topology.subscribe();
    loop {
        if let Some(reason) = eligibility(&topology.load(), node, target, placed_on_standby) {
            return reason;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{decide, LsnHistory, NodeInput, NodeSpec, Observation, Role};
    use std::sync::Arc;
    use std::time::Instant;

    fn topology(roles: &[Option<(Role, u32)>]) -> Topology {
        let specs: Vec<NodeSpec> = (0..roles.len())
            .map(|i| NodeSpec {
                name: format!("pg{}", i + 1),
                address: crate::address::BackendAddress::Tcp(String::new()),
                weight: 1,
                stats: Arc::default(),
                removed: false,
            })
            .collect();
        let inputs: Vec<NodeInput> = roles
            .iter()
            .map(|r| NodeInput {
                up: r.is_some(),
                last: r.map(|(role, timeline)| Observation {
                    role,
                    timeline,
                    lsn: 0,
                    system_id: 1,
                }),
                polled_at: None,
            })
            .collect();
        decide(
            &Topology::initial(&specs),
            &specs,
            &inputs,
            &LsnHistory::default(),
            Instant::now(),
        )
    }

    #[test]
    fn writers_end_when_their_node_is_not_the_primary() {
        use Role::*;
        let before = topology(&[Some((Primary, 1)), Some((Standby, 1))]);
        assert_eq!(eligibility(&before, 0, Target::ReadWrite, false), None);
        let after = topology(&[Some((Primary, 1)), Some((Primary, 2))]);
        assert_eq!(
            eligibility(&after, 0, Target::ReadWrite, false),
            Some(EndReason::NotPrimary {
                node: "pg1".into(),
                new_primary: Some("pg2".into())
            })
        );
        let down = topology(&[None, Some((Standby, 1))]);
        assert!(matches!(
            eligibility(&down, 0, Target::Primary, false),
            Some(EndReason::NotPrimary {
                new_primary: None,
                ..
            })
        ));
        let fenced = topology(&[Some((Primary, 2)), Some((Primary, 2))]);
        assert!(eligibility(&fenced, 0, Target::ReadWrite, false).is_some());
    }

    #[test]
    fn readers_follow_their_standby() {
        use Role::*;
        let promoted = topology(&[None, Some((Primary, 2))]);
        assert_eq!(eligibility(&promoted, 1, Target::PreferStandby, true), None);
        assert_eq!(eligibility(&promoted, 1, Target::Any, true), None);
        assert!(matches!(
            eligibility(&promoted, 1, Target::Standby, true),
            Some(EndReason::Promoted { .. })
        ));
        assert_eq!(
            eligibility(&promoted, 1, Target::ReadOnly, false),
            None,
            "a read-only session placed on the primary stays"
        );
        assert!(matches!(
            eligibility(&promoted, 0, Target::PreferStandby, true),
            Some(EndReason::NodeLost { .. })
        ));
    }

    #[test]
    fn messages_name_pgpivot_once_and_details_not_at_all() {
        let node = || "pg1".to_string();
        let reasons = [
            EndReason::NotPrimary {
                node: node(),
                new_primary: Some("pg2".into()),
            },
            EndReason::NotPrimary {
                node: node(),
                new_primary: None,
            },
            EndReason::NodeLost { node: node() },
            EndReason::Promoted { node: node() },
            EndReason::Lagging { node: node() },
            EndReason::Shutdown,
        ];
        for r in reasons {
            assert_eq!(r.message().matches("pgpivot").count(), 1, "{r:?}");
            assert!(!r.detail().contains("pgpivot"), "{r:?}");
        }
    }
}

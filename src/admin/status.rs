//! `GET /status`: the topology, listeners and recent changes as JSON. The
//! same structs deserialize in `pgpivot status`.

use serde::{Deserialize, Serialize};

use crate::decider::ChangeRecord;
use crate::pause::PauseScope;
use crate::shared::Shared;
use crate::topology::{Role, Status};

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub generation: u64,
    pub primary: Option<String>,
    pub fenced: bool,
    pub paused: PauseScope,
    pub nodes: Vec<NodeReport>,
    pub listeners: Vec<ListenerReport>,
    pub changes: Vec<ChangeReport>,
    /// Roles whose sessions cannot move: no secret for them in `[auth]`, or
    /// a login method that cannot be replayed.
    #[serde(default)]
    pub roles_without_credential: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub address: String,
    /// primary, standby, down, stale_primary, fenced, foreign_system, removed
    pub status: String,
    pub role: Option<String>,
    pub up: bool,
    pub timeline: Option<u32>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub sessions: usize,
    pub weight: u32,
    /// Why the last poll failed, while it keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The node's backend `sslmode`.
    #[serde(default)]
    pub sslmode: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerReport {
    pub address: String,
    pub target: String,
    pub max_lag_bytes: Option<u64>,
    pub max_lag_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeReport {
    pub at_unix_ms: u64,
    pub generation: u64,
    pub kind: String,
    pub summary: String,
    pub write_gap_ms: Option<u64>,
    pub sessions_waiting: u64,
    pub sessions_ended: u64,
    /// Sessions moved to another node after this change.
    #[serde(default)]
    pub sessions_moved: u64,
    /// "N sessions moved, M ended (reason n, ...)".
    #[serde(default)]
    pub sessions: String,
}

impl From<ChangeRecord> for ChangeReport {
    fn from(c: ChangeRecord) -> Self {
        let sessions = c.sessions_summary();
        ChangeReport {
            at_unix_ms: c.at_unix_ms,
            generation: c.generation,
            kind: c.kind.to_string(),
            summary: c.summary,
            write_gap_ms: c.write_gap_ms,
            sessions_waiting: c.sessions_waiting,
            sessions_ended: c.sessions_ended,
            sessions_moved: c.sessions_moved,
            sessions,
        }
    }
}

/// The report for the proxy's current state.
pub fn report(shared: &Shared) -> StatusReport {
    let topology = shared.topology.load();
    let settings = shared.settings();
    let nodes = topology
        .nodes
        .iter()
        .map(|n| NodeReport {
            name: n.name.clone(),
            address: n.address.to_string(),
            status: n.status.name().into(),
            role: match n.status {
                Status::Primary | Status::StalePrimary { .. } | Status::Fenced => {
                    Some(Role::Primary)
                }
                Status::Standby => Some(Role::Standby),
                _ => None,
            }
            .map(|r| format!("{r:?}").to_lowercase()),
            up: !matches!(n.status, Status::Down | Status::Removed),
            timeline: n.timeline,
            lag_bytes: n.lag_bytes,
            lag_seconds: n.lag.map(|d| d.as_secs_f64()),
            sessions: n.stats.sessions(),
            last_error: n.stats.last_error.load_full().map(|e| e.to_string()),
            weight: n.weight,
            sslmode: settings
                .node(&n.name)
                .map_or("", |s| s.tls.mode.as_str())
                .into(),
        })
        .collect();
    // The bound addresses: a configured port 0 is resolved there.
    let listeners = settings
        .listeners
        .iter()
        .zip(&shared.listener_addresses)
        .map(|(l, address)| ListenerReport {
            address: address.to_string(),
            target: l.target.to_string(),
            max_lag_bytes: l.budget.max_bytes,
            max_lag_ms: l.budget.max_lag.map(|d| d.as_millis() as u64),
        })
        .collect();
    StatusReport {
        generation: topology.generation,
        primary: topology.primary_view().map(|p| p.name.clone()),
        fenced: topology.fenced,
        paused: shared.pause.scope(),
        nodes,
        listeners,
        changes: shared
            .topology
            .changes()
            .into_iter()
            .map(Into::into)
            .collect(),
        roles_without_credential: shared.metrics.moves.roles_without_credential(),
    }
}

/// A `patronictl list`-like table.
pub fn render_table(r: &StatusReport) -> String {
    let mut out = format!(
        "generation {}  primary {}  paused {}{}\n",
        r.generation,
        r.primary.as_deref().unwrap_or("-"),
        r.paused.describe(),
        if r.fenced { "  FENCED" } else { "" }
    );
    out.push_str(&format!(
        "{:<8} {:<22} {:<14} {:<4} {:>8} {:>12} {:>9} {:>8}\n",
        "node", "address", "status", "up", "timeline", "lag_bytes", "lag_s", "sessions"
    ));
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for n in &r.nodes {
        out.push_str(&format!(
            "{:<8} {:<22} {:<14} {:<4} {:>8} {:>12} {:>9} {:>8}\n",
            n.name,
            n.address,
            n.status,
            if n.up { "yes" } else { "no" },
            opt(n.timeline.map(|t| t.to_string())),
            opt(n.lag_bytes.map(|b| b.to_string())),
            opt(n.lag_seconds.map(|s| format!("{s:.3}"))),
            n.sessions
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(paused: PauseScope) -> StatusReport {
        StatusReport {
            generation: 3,
            primary: Some("pg1".into()),
            fenced: false,
            paused,
            nodes: Vec::new(),
            listeners: Vec::new(),
            changes: Vec::new(),
            roles_without_credential: Vec::new(),
        }
    }

    #[test]
    fn the_table_says_what_is_paused_in_words() {
        let header = |p| render_table(&report(p)).lines().next().unwrap().to_string();
        assert_eq!(
            header(PauseScope::None),
            "generation 3  primary pg1  paused no"
        );
        assert_eq!(
            header(PauseScope::Writes),
            "generation 3  primary pg1  paused writes"
        );
        assert_eq!(
            header(PauseScope::All),
            "generation 3  primary pg1  paused all"
        );
    }
}

//! Live reload (SIGHUP, `POST /reload`): re-read the config and apply what
//! can change without a restart.
//!
//! Applied: nodes added, removed or re-addressed, weights, lag budgets and
//! targets of existing listeners, hold timeout, monitor timings and
//! credentials, timeouts and message limits, TLS certificate and key.
//! Listener addresses, the admin endpoint and connection caps need a restart
//! (they stay as they are; the log says so). A config that does not validate
//! changes nothing.
//!
//! Node ids are positions in the node list and sessions hold them, so they
//! never move: a removed node stays as a tombstone (`Status::Removed`) and
//! new nodes are appended.

use std::sync::Arc;

use crate::config::{self, ConfigError, FileConfig, Settings};
use crate::decider::Reconfigure;
use crate::proxy::Shared;
use crate::topology::{NodeSpec, Status};

/// What a reload changed.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Settings that were not applied because they need a restart.
    pub restart_needed: Vec<String>,
}

/// Re-reads the proxy's config file (and environment) and applies it. The
/// file and certificate reads block, so they run off the async workers. A
/// rejected config is logged here and changes nothing.
pub async fn reload(shared: &Arc<Shared>) -> Result<ReloadReport, ConfigError> {
    let shared = shared.clone();
    let result = tokio::task::spawn_blocking(move || {
        let file = config::load(shared.config_path.as_deref())?;
        apply(&shared, &file)
    })
    .await
    .unwrap_or_else(|e| Err(ConfigError::new("reload", e)));
    if let Err(e) = &result {
        tracing::error!("reload rejected, old configuration stays: {e}");
    }
    result
}

/// Validates `file` and applies it; on error nothing changes.
pub fn apply(shared: &Shared, file: &FileConfig) -> Result<ReloadReport, ConfigError> {
    let mut new = file.validate()?;
    let old = shared.settings();
    let mut report = ReloadReport::default();
    keep_listeners(&old, &mut new, &mut report);
    let specs = merge_nodes(shared, &new, &mut report);
    let targets = crate::monitor::targets(&specs, &new);
    let reconfigure = Reconfigure {
        specs,
        settings: new.monitor.clone(),
    };
    if shared.control.reconfigure.try_send(reconfigure).is_err() {
        return Err(ConfigError::new("reload", "the decider is busy; try again"));
    }
    shared.monitor.restart(
        &targets,
        &new.monitor,
        &shared.control.reports,
        &shared.control.stop,
    );
    shared.store_settings(new);
    tracing::info!(
        added = ?report.added,
        removed = ?report.removed,
        changed = ?report.changed,
        "configuration reloaded"
    );
    if !report.restart_needed.is_empty() {
        tracing::warn!(settings = ?report.restart_needed, "these changes need a restart of pgpivot");
    }
    Ok(report)
}

/// Listeners stay bound as they are: a change of their number or addresses
/// needs a restart. Same addresses: the new targets and budgets apply.
fn keep_listeners(old: &Settings, new: &mut Settings, report: &mut ReloadReport) {
    let same = old.listeners.len() == new.listeners.len()
        && old
            .listeners
            .iter()
            .zip(&new.listeners)
            .all(|(a, b)| a.address == b.address);
    if !same {
        report.restart_needed.push("listeners (addresses)".into());
        new.listeners = old.listeners.clone();
    }
    if old.admin != new.admin {
        report.restart_needed.push("admin".into());
    }
    let caps = |s: &Settings| {
        let per_listener: Vec<usize> = s.listeners.iter().map(|l| l.max_connections).collect();
        (s.max_client_connections, per_listener)
    };
    if caps(old) != caps(new) {
        // The connection semaphores are sized at start.
        report.restart_needed.push("connection limits".into());
    }
}

/// The new node list: kept nodes at their ids (with their live figures),
/// new ones appended, missing ones marked removed.
fn merge_nodes(shared: &Shared, new: &Settings, report: &mut ReloadReport) -> Vec<NodeSpec> {
    let topology = shared.topology.load();
    let mut specs: Vec<NodeSpec> = topology
        .nodes
        .iter()
        .map(|n| NodeSpec {
            name: n.name.clone(),
            address: n.address.clone(),
            weight: n.weight,
            stats: n.stats.clone(),
            removed: n.status == Status::Removed,
        })
        .collect();
    for spec in specs.iter_mut().filter(|s| !s.removed) {
        match new.nodes.iter().find(|n| n.name == spec.name) {
            None => {
                spec.removed = true;
                report.removed.push(spec.name.clone());
            }
            Some(n) if n.address != spec.address || n.weight != spec.weight => {
                spec.address = n.address.clone();
                spec.weight = n.weight;
                report.changed.push(spec.name.clone());
            }
            Some(_) => {}
        }
    }
    for n in &new.nodes {
        if !specs.iter().any(|s| !s.removed && s.name == n.name) {
            specs.push(NodeSpec::new(&n.name, &n.address, n.weight));
            report.added.push(n.name.clone());
        }
    }
    specs
}

//! Live reload (SIGHUP, `POST /reload`): re-read the config and apply what
//! can change without a restart.
//!
//! Applied: nodes added, removed or re-addressed, weights, lag budgets and
//! targets of existing listeners, hold timeout, monitor timings and
//! credentials, timeouts and message limits, TLS certificate and key.
//! Listener addresses, the admin endpoint, connection caps and `[runtime]`
//! need a restart (they stay as they are; the log says so). A config that
//! does not validate changes nothing.
//!
//! Node ids are positions in the node list and sessions hold them, so they
//! never move: a removed node stays as a tombstone (`Status::Removed`) and
//! new nodes are appended.
//!
//! Reloads run one at a time, in one task (`serve`): each merges its node
//! list against the one the previous reload published. Two reloads at once
//! (SIGHUP and `POST /reload`) would both merge against the same snapshot
//! and could add a node twice or bring back one just removed.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, Settings, SettingsHandle};
use crate::decider::{Reconfigure, TopologyHandle};
use crate::monitor::{MonitorHandle, Report};
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

/// One reload asked of the reload task; the outcome goes back on it.
pub(crate) type Request = oneshot::Sender<Result<ReloadReport, ConfigError>>;

/// Where reloads are asked for (SIGHUP, `POST /reload`).
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<Request>);

impl ReloadHandle {
    pub(crate) fn new(requests: mpsc::Sender<Request>) -> ReloadHandle {
        ReloadHandle(requests)
    }

    /// Re-reads the proxy's config file (and environment) and applies it,
    /// after any reload already under way. Answers once the new node list is
    /// published. A rejected config is logged and changes nothing.
    pub async fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let stopping = || ConfigError::new("reload", "pgpivot is stopping");
        let (reply, answer) = oneshot::channel();
        if self.0.send(reply).await.is_err() {
            return Err(stopping());
        }
        answer.await.unwrap_or_else(|_| Err(stopping()))
    }
}

/// What the reload task changes: the settings, the decider's node list and
/// the monitors. Only this task writes them after start.
pub(crate) struct Reloader {
    pub settings: SettingsHandle,
    pub topology: TopologyHandle,
    pub monitor: Arc<MonitorHandle>,
    pub reports: mpsc::Sender<Report>,
    pub reconfigure: mpsc::Sender<Reconfigure>,
    /// Stops the task (and the monitors it starts).
    pub stop: CancellationToken,
    /// The file a reload re-reads (`None`: built in code, e.g. the demo).
    pub config_path: Option<PathBuf>,
}

/// The reload task: serves requests in arrival order until stopped.
pub(crate) async fn serve(reloader: Reloader, mut requests: mpsc::Receiver<Request>) {
    loop {
        let reply = tokio::select! {
            request = requests.recv() => match request {
                Some(reply) => reply,
                None => return,
            },
            _ = reloader.stop.cancelled() => return,
        };
        let result = reload_once(&reloader).await;
        if let Err(e) = &result {
            tracing::error!("reload rejected, old configuration stays: {e}");
        }
        // The asker may be gone (an HTTP client that hung up): the reload
        // stands all the same.
        let _ = reply.send(result);
    }
}

/// Reads and validates the file, then applies it. The file and certificate
/// reads block, so they run off the async workers.
async fn reload_once(reloader: &Reloader) -> Result<ReloadReport, ConfigError> {
    let path = reloader.config_path.clone();
    let settings = tokio::task::spawn_blocking(move || config::load(path.as_deref())?.validate())
        .await
        .unwrap_or_else(|e| Err(ConfigError::new("reload", e)))?;
    apply(reloader, settings).await
}

/// Applies validated settings: the decider takes the new node list (and
/// publishes it before this returns), the monitors restart, the settings
/// swap.
async fn apply(reloader: &Reloader, mut new: Settings) -> Result<ReloadReport, ConfigError> {
    let old = reloader.settings.load();
    let mut report = ReloadReport::default();
    keep_listeners(&old, &mut new, &mut report);
    note_restart_only(&old, &new, &mut report);
    let specs = merge_nodes(&reloader.topology, &new, &mut report);
    let targets = crate::monitor::targets(&specs, &new);
    let (applied, published) = oneshot::channel();
    let reconfigure = Reconfigure {
        specs,
        settings: new.monitor.clone(),
        applied,
    };
    // The decider only goes away when the proxy stops.
    let stopped = || ConfigError::new("reload", "pgpivot is stopping");
    if reloader.reconfigure.send(reconfigure).await.is_err() || published.await.is_err() {
        return Err(stopped());
    }
    reloader
        .monitor
        .restart(&targets, &new.monitor, &reloader.reports, &reloader.stop);
    reloader.settings.store(new);
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
}

/// The admin endpoint and the connection caps are fixed at start: a change
/// is reported as needing a restart (and does not apply).
fn note_restart_only(old: &Settings, new: &Settings, report: &mut ReloadReport) {
    if old.admin != new.admin {
        report.restart_needed.push("admin".into());
    }
    if old.runtime != new.runtime {
        report.restart_needed.push("runtime".into());
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
/// new ones appended, missing ones marked removed. Merged against the
/// published snapshot, which holds the previous reload's list: reloads are
/// serialized and each waits for its list to be published.
fn merge_nodes(
    topology: &TopologyHandle,
    new: &Settings,
    report: &mut ReloadReport,
) -> Vec<NodeSpec> {
    let topology = topology.load();
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

//! Node monitors: one task per node, each on its own tokio-postgres
//! connection, polling the node's replication state every interval.
//!
//! A poll reads role, timeline, WAL position and system identifier in one
//! prepared query and reports the result (or the failure) to the
//! [`decider`](crate::decider). The connect and the query are each bounded by
//! `monitor.timeout_ms`, so a node that hangs (postmaster stopped with
//! SIGSTOP) counts as a failed poll instead of stalling the monitor. Sessions
//! that notice a role change first (ParameterStatus `in_hot_standby`, SQLSTATE
//! 25006) [`poke`](MonitorHandle::poke) the node's monitor to poll at once.

use crate::address::BackendAddress;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use crate::backend_tls::{BackendTls, ControlLogin};
use crate::config::{MonitorSettings, Settings};
use crate::topology::{NodeId, NodeSpec, Observation, Role};

/// One poll's outcome, sent to the decider.
#[derive(Debug)]
pub struct Report {
    pub node: NodeId,
    /// When the poll ended.
    pub at: Instant,
    pub result: Result<Observation, PollError>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PollError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("poll query failed: {0}")]
    Query(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Role, WAL position, timeline and system identifier in one round trip.
/// The timeline of a primary comes from its current WAL file name, which
/// changes the moment it is promoted (the checkpoint timeline can trail).
const POLL_SQL: &str = "\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0'::pg_lsn)
            ELSE pg_current_wal_lsn() END,
       CASE WHEN pg_is_in_recovery()
            THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       (SELECT system_identifier FROM pg_control_system())";

/// The running monitors: wakes them for an immediate poll, and replaces
/// them all when the node list or timings change (reload).
#[derive(Debug, Default)]
pub struct MonitorHandle {
    current: ArcSwap<Generation>,
    /// Set by the decider while no primary is known: healthy nodes are then
    /// polled [`URGENT_SPEEDUP`] times as often, so a promotion is seen
    /// within a fraction of the interval.
    urgent: Arc<AtomicBool>,
}

/// How much faster nodes are polled while no primary is known.
pub const URGENT_SPEEDUP: u32 = 5;

/// One set of monitor tasks and the token that stops them.
#[derive(Debug, Default)]
struct Generation {
    /// Indexed by node id; removed nodes keep a placeholder.
    pokes: Vec<Arc<Notify>>,
    stop: CancellationToken,
}

impl MonitorHandle {
    /// Asks node `id`'s monitor to poll now rather than at its next interval.
    pub fn poke(&self, id: NodeId) {
        if let Some(n) = self.current.load().pokes.get(id) {
            n.notify_one();
        }
    }

    pub fn poke_all(&self) {
        self.current
            .load()
            .pokes
            .iter()
            .for_each(|n| n.notify_one());
    }

    /// Switches urgent polling on (no primary known) or off; switching it on
    /// also polls every node at once.
    pub fn set_urgent(&self, urgent: bool) {
        if !self.urgent.swap(urgent, Ordering::Relaxed) && urgent {
            self.poke_all();
        }
    }

    /// Stops the running monitors and starts one per target (`None`: a
    /// removed node, not monitored). Node ids are positions in `targets`.
    pub fn restart(
        &self,
        targets: &[Option<MonitorTarget>],
        settings: &MonitorSettings,
        reports: &mpsc::Sender<Report>,
        shutdown: &CancellationToken,
    ) {
        let stop = shutdown.child_token();
        let pokes: Vec<Arc<Notify>> = targets.iter().map(|_| Arc::default()).collect();
        for (id, target) in targets.iter().enumerate() {
            let Some(target) = target else { continue };
            let poller = Poller {
                node: id,
                address: target.address.clone(),
                tls: target.tls.clone(),
                settings: settings.clone(),
                session: None,
                urgent: self.urgent.clone(),
            };
            tokio::spawn(poller.run(reports.clone(), pokes[id].clone(), stop.clone()));
        }
        let old = self.current.swap(Arc::new(Generation { pokes, stop }));
        old.stop.cancel();
    }
}

/// What one monitor polls: the node's address and how to reach it.
#[derive(Debug, Clone)]
pub struct MonitorTarget {
    pub address: BackendAddress,
    pub tls: Arc<BackendTls>,
}

/// The monitor targets for `specs` (node ids are positions), with each
/// node's TLS from `settings`; removed nodes get none.
pub fn targets(specs: &[NodeSpec], settings: &Settings) -> Vec<Option<MonitorTarget>> {
    specs
        .iter()
        .map(|spec| {
            let node = settings.node(&spec.name).filter(|_| !spec.removed)?;
            Some(MonitorTarget {
                address: spec.address.clone(),
                tls: node.tls.clone(),
            })
        })
        .collect()
}

struct Poller {
    node: NodeId,
    address: BackendAddress,
    tls: Arc<BackendTls>,
    settings: MonitorSettings,
    /// The open connection and its prepared poll statement.
    session: Option<(Client, Statement)>,
    urgent: Arc<AtomicBool>,
}

impl Poller {
    async fn run(
        mut self,
        reports: mpsc::Sender<Report>,
        poke: Arc<Notify>,
        stop: CancellationToken,
    ) {
        let mut failures = 0u32;
        loop {
            let result = self.poll().await;
            failures = if result.is_ok() { 0 } else { failures + 1 };
            let report = Report {
                node: self.node,
                at: Instant::now(),
                result,
            };
            if reports.send(report).await.is_err() {
                return;
            }
            tokio::select! {
                _ = crate::timers::sleep(self.delay(failures)) => {}
                _ = poke.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The interval, backed off (up to 4x) while a node keeps failing, so a
    /// dead node costs little; the first failures are retried at the normal
    /// pace so that the down threshold is reached quickly.
    fn delay(&self, failures: u32) -> Duration {
        if failures == 0 && self.urgent.load(Ordering::Relaxed) {
            return self.settings.interval / URGENT_SPEEDUP;
        }
        let over = failures.saturating_sub(self.settings.failures + 1).min(2);
        self.settings.interval * (1 << over)
    }

    async fn poll(&mut self) -> Result<Observation, PollError> {
        let timeout = self.settings.timeout;
        let result = crate::timers::timeout(timeout, self.poll_once())
            .await
            .unwrap_or(Err(PollError::Timeout(timeout)));
        if result.is_err() {
            // Never reuse a connection that failed or timed out mid-query.
            self.session = None;
        }
        result
    }

    async fn poll_once(&mut self) -> Result<Observation, PollError> {
        if self.session.is_none() {
            self.session = Some(self.connect().await?);
        }
        let (client, statement) = self.session.as_ref().expect("connected above");
        let row = client
            .query_one(statement, &[])
            .await
            .map_err(|e| PollError::Query(e.to_string()))?;
        let in_recovery: bool = row.get(0);
        let lsn: PgLsn = row.get(1);
        let timeline: i32 = row.get(2);
        let system_id: i64 = row.get(3);
        Ok(Observation {
            role: if in_recovery {
                Role::Standby
            } else {
                Role::Primary
            },
            timeline: timeline as u32,
            lsn: u64::from(lsn),
            system_id: system_id as u64,
        })
    }

    async fn connect(&self) -> Result<(Client, Statement), PollError> {
        let s = &self.settings;
        let login = ControlLogin {
            user: &s.user,
            password: &s.password,
            database: &s.database,
            application_name: "pgpivot-monitor",
            timeout: s.timeout,
        };
        let client = self
            .tls
            .control_client(&self.address, &login)
            .await
            .map_err(PollError::Connect)?;
        let statement = client
            .prepare(POLL_SQL)
            .await
            .map_err(|e| PollError::Query(e.to_string()))?;
        Ok((client, statement))
    }
}

//! The state every task of one proxy shares, and nothing else: a leaf
//! module (it imports no stage), so the listener, the session stages, the
//! admin endpoint and the proxy can all depend on it without a cycle.
//!
//! Nothing in it is locked across an await: settings and topology are
//! `ArcSwap` snapshots, the rest are atomics, channels and semaphores.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cancel::CancelRegistry;
use crate::config::{Settings, SettingsHandle};
use crate::decider::TopologyHandle;
use crate::fanout::Fanout;
use crate::metrics::{Gauge, Metrics};
use crate::monitor::MonitorHandle;
use crate::pause::Pause;
use crate::reload::ReloadHandle;

/// State shared by every task of one proxy (behind an `Arc`).
pub struct Shared {
    pub settings: SettingsHandle,
    pub topology: TopologyHandle,
    pub monitor: Arc<MonitorHandle>,
    pub cancels: Arc<CancelRegistry>,
    /// Every relaying session's control watch (topology, shutdown, lag).
    pub fanout: Arc<Fanout>,
    pub metrics: Arc<Metrics>,
    pub pause: Pause,
    /// Sessions open now per listener (config order).
    pub listener_sessions: Vec<Gauge>,
    /// Bound listener addresses (port 0 resolved), config order: the
    /// configured ones may say port 0, and metrics and `/status` must tell
    /// listeners apart.
    pub listener_addresses: Vec<SocketAddr>,
    /// Client sessions over all listeners (`limits.max_client_connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// Cancelled to stop accepting and end sessions at their idle points.
    pub shutdown: CancellationToken,
    /// Cancelled last, to stop the control path (monitors, decider, reload
    /// task, admin endpoint).
    pub stop: CancellationToken,
    /// Asks the reload task for a reload (SIGHUP, `POST /reload`).
    pub reloads: ReloadHandle,
    /// Source of session ids (for logs).
    pub session_ids: AtomicU64,
    /// Round-robin tie-break among equally loaded standbys.
    pub tiebreak: AtomicUsize,
}

impl Shared {
    /// The settings in force now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load()
    }

    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

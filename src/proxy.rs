//! The running proxy: shared state, startup and shutdown.
//!
//! [`Shared`] is the one context every task gets (an `Arc`): settings, the
//! topology handle, the monitor's poke handle, the cancel registry and the
//! metrics. Nothing in it is locked across an await: the topology is an
//! `ArcSwap` snapshot, the settings too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cancel::CancelRegistry;
use crate::config::Settings;
use crate::decider::{Decider, TopologyHandle};
use crate::listener;
use crate::metrics::Metrics;
use crate::monitor::{self, MonitorHandle};
use crate::topology::NodeSpec;

/// State shared by every task of one proxy.
pub struct Shared {
    settings: ArcSwap<Settings>,
    pub topology: TopologyHandle,
    pub monitor: MonitorHandle,
    pub cancels: Arc<CancelRegistry>,
    pub metrics: Arc<Metrics>,
    pub pause: crate::pause::Pause,
    /// Cancelled to stop accepting and end sessions at their idle points.
    pub shutdown: CancellationToken,
    sessions: AtomicU64,
    tiebreak: AtomicUsize,
}

impl Shared {
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    pub fn next_session_id(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Advances the round-robin tie-break among equally loaded standbys.
    pub fn next_tiebreak(&self) -> usize {
        self.tiebreak.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// A started proxy.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// Bound listener addresses, in config order (port 0 resolved).
    pub addresses: Vec<SocketAddr>,
    /// Monitors and decider.
    control: CancellationToken,
    sessions: TaskTracker,
}

impl Proxy {
    /// Binds every listener, starts the monitors and the decider, and begins
    /// accepting.
    pub async fn start(settings: Settings) -> Result<Proxy, StartError> {
        let specs: Vec<NodeSpec> = settings
            .nodes
            .iter()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                address: n.address.clone(),
                weight: n.weight,
                stats: Arc::default(),
                removed: false,
            })
            .collect();
        let control = CancellationToken::new();
        let (reports_tx, reports_rx) = mpsc::channel(1024);
        let metrics = Arc::new(Metrics::new(settings.relay_timing));
        let (decider, topology) = Decider::new(specs, settings.monitor.clone(), metrics.clone());
        tokio::spawn(decider.run(reports_rx, control.clone()));
        let addresses: Vec<String> = settings.nodes.iter().map(|n| n.address.clone()).collect();
        let monitor = monitor::spawn(&addresses, &settings.monitor, reports_tx, control.clone());
        let mut bound = Vec::new();
        for l in &settings.listeners {
            let tcp = TcpListener::bind(l.address).await.map_err(|source| StartError::Bind {
                address: l.address,
                source,
            })?;
            bound.push(tcp);
        }
        let shared = Arc::new(Shared {
            metrics,
            pause: Default::default(),
            settings: ArcSwap::from_pointee(settings),
            topology,
            monitor,
            cancels: Arc::default(),
            shutdown: CancellationToken::new(),
            sessions: AtomicU64::new(0),
            tiebreak: AtomicUsize::new(0),
        });
        let sessions = TaskTracker::new();
        let mut addresses = Vec::new();
        for (i, tcp) in bound.into_iter().enumerate() {
            addresses.push(tcp.local_addr().expect("bound listener has an address"));
            let config = Arc::new(shared.settings().listeners[i].clone());
            tokio::spawn(listener::accept_loop(tcp, config, shared.clone(), sessions.clone()));
        }
        Ok(Proxy {
            shared,
            addresses,
            control,
            sessions,
        })
    }

    /// Waits until the topology has a primary, or the timeout passes.
    pub async fn wait_for_primary(&self, timeout: Duration) -> bool {
        let mut changes = self.shared.topology.subscribe();
        let wait = async {
            loop {
                if self.shared.topology.load().primary.is_some() {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && self.shared.topology.load().primary.is_some()
    }

    /// Graceful shutdown: stop accepting, end sessions at their next idle
    /// point (57P01), wait for them up to `timeout`, then stop the monitors.
    /// Returns the number of sessions still open at the deadline.
    pub async fn shutdown(self, timeout: Duration) -> usize {
        self.shared.shutdown.cancel();
        self.sessions.close();
        let _ = tokio::time::timeout(timeout, self.sessions.wait()).await;
        let left = self.sessions.len();
        self.control.cancel();
        left
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.control.cancel();
    }
}

//! The running proxy: binds the listeners, starts the control path (decider,
//! monitors, reload task) and the accept loops, and shuts them down.
//!
//! The state the tasks share is [`Shared`], in its own leaf module; this
//! module is the only one that sees every part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, SettingsHandle};
use crate::decider::Decider;
use crate::fanout::Fanout;
use crate::listener;
use crate::metrics::Metrics;
use crate::monitor::MonitorHandle;
use crate::pause::Pause;
use crate::reload::{self, ReloadHandle, Reloader};
pub use crate::shared::Shared;
use crate::topology::NodeSpec;
use crate::workers::Sessions;

/// Why the proxy did not start. The OS error is the `source`, not part of
/// the message: `pgpivot` prints the error chain, which would repeat it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on admin address {address}")]
    AdminBind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the worker threads")]
    Workers(#[source] std::io::Error),
}

/// A started proxy.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// Bound listener addresses, in config order (port 0 resolved).
    pub addresses: Vec<SocketAddr>,
    /// Bound admin address, when the endpoint is on.
    pub admin_address: Option<SocketAddr>,
    sessions: Sessions,
}

impl Proxy {
    /// Binds every listener, starts the monitors and the decider, and begins
    /// accepting. The control path and the accept loops run on the calling
    /// runtime; sessions too with `[runtime] flavor = "multi-thread"`, and on
    /// worker threads of their own (started here) with `per-core`.
    pub async fn start(settings: Settings) -> Result<Proxy, StartError> {
        Self::start_with_path(settings, None).await
    }

    /// Like [`Proxy::start`], remembering the config file for reloads.
    pub async fn start_with_path(
        settings: Settings,
        config_path: Option<PathBuf>,
    ) -> Result<Proxy, StartError> {
        let mut bound = Vec::new();
        let mut addresses = Vec::new();
        for l in &settings.listeners {
            let failed = |source| StartError::Bind {
                address: l.address,
                source,
            };
            let tcp = TcpListener::bind(l.address).await.map_err(failed)?;
            // Port 0 resolved: what metrics, `/status` and tests name.
            addresses.push(tcp.local_addr().map_err(failed)?);
            bound.push(tcp);
        }
        let admin = match &settings.admin {
            Some(a) => Some((
                TcpListener::bind(a.address)
                    .await
                    .map_err(|source| StartError::AdminBind {
                        address: a.address,
                        source,
                    })?,
                a.token.clone(),
            )),
            None => None,
        };
        let sessions = Sessions::start(settings.runtime, tokio::runtime::Handle::current())
            .map_err(StartError::Workers)?;
        let shared = start_control(settings, config_path, addresses.clone());
        let admin_address = admin.as_ref().and_then(|(l, _)| l.local_addr().ok());
        if let Some((listener, token)) = admin {
            let stop = shared.stop.clone();
            tokio::spawn(crate::admin::serve(listener, shared.clone(), token, stop));
        }
        for (i, tcp) in bound.into_iter().enumerate() {
            tokio::spawn(listener::accept_loop(
                tcp,
                i,
                shared.clone(),
                sessions.clone(),
            ));
        }
        Ok(Proxy {
            shared,
            addresses,
            admin_address,
            sessions,
        })
    }

    /// Waits until the topology has a primary, or the timeout passes.
    pub async fn wait_for_primary(&self, timeout: Duration) -> bool {
        let mut changes = self.shared.topology.subscribe();
        let topology = &self.shared.topology;
        let found = crate::timers::timeout(
            timeout,
            changes.wait_for(|_| topology.load().primary.is_some()),
        );
        found.await.is_ok_and(|r| r.is_ok())
    }

    /// Graceful shutdown: stop accepting, end sessions at their next idle
    /// point (57P01), wait for them up to `timeout`, then stop the worker
    /// threads and the monitors. Returns the number of sessions still open at
    /// the deadline (with `per-core`, when every session ended: the tasks
    /// still alive on the workers then, which a session should not leave).
    pub async fn shutdown(self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        self.shared.shutdown.cancel();
        self.sessions.close();
        let _ = crate::timers::timeout_at(deadline.into(), self.sessions.wait()).await;
        let open = self.sessions.len();
        let stray = self.sessions.stop_workers(deadline).await;
        self.shared.stop.cancel();
        if open > 0 {
            open
        } else {
            stray
        }
    }

    /// Sessions open on each worker thread now (`per-core`; empty for
    /// `multi-thread`).
    pub fn sessions_per_worker(&self) -> Vec<usize> {
        self.sessions.per_worker()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.stop.cancel();
    }
}

/// Starts the decider, the monitors and the reload task; returns the
/// shared state.
fn start_control(
    settings: Settings,
    config_path: Option<PathBuf>,
    listener_addresses: Vec<SocketAddr>,
) -> Arc<Shared> {
    let specs = node_specs(&settings);
    let stop = CancellationToken::new();
    let (reports, reports_rx) = mpsc::channel(1024);
    let (reconfigure, reconfigure_rx) = mpsc::channel(4);
    let (reloads, reloads_rx) = mpsc::channel(16);
    let metrics = Arc::new(Metrics::new(settings.relay_timing));
    let monitor = Arc::new(MonitorHandle::default());
    let (decider, topology) = Decider::new(
        specs.clone(),
        settings.monitor.clone(),
        metrics.clone(),
        monitor.clone(),
    );
    tokio::spawn(decider.run(reports_rx, reconfigure_rx, stop.clone()));
    tokio::spawn(crate::decider::log_session_figures(
        topology.clone(),
        stop.clone(),
    ));
    let targets = crate::monitor::targets(&specs, &settings);
    monitor.restart(&targets, &settings.monitor, &reports, &stop);
    let connection_slots = Arc::new(tokio::sync::Semaphore::new(settings.max_client_connections));
    let listener_sessions = settings
        .listeners
        .iter()
        .map(|_| Default::default())
        .collect();
    let settings = SettingsHandle::new(settings);
    let reloader = Reloader {
        settings: settings.clone(),
        topology: topology.clone(),
        monitor: monitor.clone(),
        reports,
        reconfigure,
        stop: stop.clone(),
        config_path,
    };
    tokio::spawn(reload::serve(reloader, reloads_rx));
    let shutdown = CancellationToken::new();
    let fanout = Arc::new(Fanout::new(topology.clone(), shutdown.clone()));
    let lag_check = settings.load().monitor.interval;
    tokio::spawn(fanout.clone().run(lag_check, stop.clone()));
    Arc::new(Shared {
        settings,
        topology,
        monitor,
        cancels: Arc::default(),
        fanout,
        metrics,
        pause: Pause::default(),
        connection_slots,
        listener_sessions,
        listener_addresses,
        shutdown,
        stop,
        reloads: ReloadHandle::new(reloads),
        session_ids: Default::default(),
        tiebreak: Default::default(),
    })
}

fn node_specs(settings: &Settings) -> Vec<NodeSpec> {
    settings
        .nodes
        .iter()
        .map(|n| NodeSpec::new(&n.name, &n.address, n.weight))
        .collect()
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

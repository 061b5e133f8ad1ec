//! Stages 2 and 3 of a session: route to a node, and open the backend
//! connection.
//!
//! When no node is eligible (no primary during a failover, no standby within
//! budget for target `standby`), or the chosen node refuses the connection
//! before the monitor has noticed it is gone, the session waits for the next
//! topology generation instead of failing, up to the hold timeout. A failover
//! then looks like a slow connect, not an error. A shutdown ends the wait at
//! once (57P01).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::address::BackendAddress;
use crate::backend_tls::BackendStream;
use crate::config::Settings;
use crate::decider::TopologyHandle;
use crate::metrics::Metrics;
use crate::monitor::MonitorHandle;
use bytes::BytesMut;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::error::ConnectError;
use super::params::SessionRequest;
use crate::protocol::frame::{fill_message, HEADER_LEN};
use crate::protocol::messages::{self, tag};
use crate::protocol::startup::StartupMessage;
use crate::routing::{route, Choice, NoRoute};
use crate::topology::{LoadGuard, NodeId, Status, Topology};

/// What connecting needs of the proxy's shared state, and nothing more.
#[derive(Clone, Copy)]
pub struct Routes<'a> {
    pub topology: &'a TopologyHandle,
    pub monitor: &'a MonitorHandle,
    pub metrics: &'a Metrics,
    /// Shutdown reaches a session waiting for a node at once.
    pub shutdown: &'a CancellationToken,
    /// The round-robin tie-break among equally loaded standbys.
    pub tiebreak: &'a AtomicUsize,
}

/// A backend connection with the startup packet sent.
pub struct Connected {
    pub backend: BackendStream,
    pub node: NodeId,
    pub name: String,
    pub address: BackendAddress,
    pub choice: Choice,
    /// Counts the session on its node while it lives.
    pub load: LoadGuard,
    /// The node's live figures.
    pub stats: std::sync::Arc<crate::topology::NodeStats>,
    /// How long the session waited for an eligible node.
    pub held: Duration,
    /// What the backend already sent (at least its first message).
    pub first: BytesMut,
}

/// Why the last attempt did not produce a connection.
enum Miss {
    NoRoute(NoRoute),
    Unreachable {
        id: NodeId,
        node: String,
        detail: String,
    },
}

/// Routes the session and connects to the chosen node, holding while needed.
/// `settings` is the session's one snapshot (a reload meanwhile does not
/// change this session's timeouts or a node's TLS halfway).
pub async fn connect(
    shared: Routes<'_>,
    settings: &Settings,
    request: &SessionRequest,
    startup: &StartupMessage,
) -> Result<Connected, ConnectError> {
    let started = Instant::now();
    let deadline = started + settings.hold_timeout;
    let mut changes = shared.topology.subscribe();
    let mut held = false;
    let mut _waiting = None;
    // Nodes this session just failed to reach: another eligible node is
    // tried at once instead of waiting for the monitor to mark them down.
    // Forgotten after each wait, so a node back from a blip is used again.
    let mut avoid: Vec<NodeId> = Vec::new();
    loop {
        changes.borrow_and_update();
        let miss = match try_once(shared, settings, request, startup, &avoid).await {
            Ok(mut connected) => {
                connected.held = started.elapsed();
                if held {
                    shared.metrics.hold_time.record(connected.held);
                    tracing::info!(held_ms = connected.held.as_millis() as u64, node = %connected.name, "held session released");
                }
                return Ok(connected);
            }
            Err(miss) => miss,
        };
        if let Miss::Unreachable { id, .. } = &miss {
            if !avoid.contains(id) {
                avoid.push(*id);
                continue;
            }
        }
        if Instant::now() >= deadline {
            shared.metrics.sessions_hold_timeout.inc();
            return Err(miss.into_error(started.elapsed().as_millis()));
        }
        if !held {
            held = true;
            shared.metrics.sessions_held.inc();
            _waiting = Some(shared.metrics.sessions_waiting.track());
        }
        // Wake on a new generation, or after one monitor interval: lag
        // figures (a standby catching up) and an unreachable node coming back
        // change no generation. A last attempt is made at the deadline.
        // A shutdown ends the wait at once: the hold timeout may be long.
        let wake = (Instant::now() + settings.monitor.interval).min(deadline);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return Err(ConnectError::ShuttingDown),
            _ = crate::timers::timeout_at(wake.into(), changes.changed()) => {}
        }
        avoid.clear();
    }
}

impl Miss {
    fn into_error(self, waited_ms: u128) -> ConnectError {
        match self {
            Miss::NoRoute(reason) => ConnectError::NoRoute { reason, waited_ms },
            Miss::Unreachable { node, detail, .. } => ConnectError::Unavailable {
                node,
                detail,
                waited_ms,
            },
        }
    }
}

async fn try_once(
    shared: Routes<'_>,
    settings: &Settings,
    request: &SessionRequest,
    startup: &StartupMessage,
    avoid: &[NodeId],
) -> Result<Connected, Miss> {
    let topology = without(shared.topology.load(), avoid);
    let choice = route(
        &topology,
        request.target,
        &request.budget,
        shared.tiebreak.fetch_add(1, Ordering::Relaxed),
    )
    .map_err(Miss::NoRoute)?;
    let node = &topology.nodes[choice.node];
    let load = node.stats.enter();
    let unreachable = |detail: String| {
        shared.monitor.poke(node.id);
        node.stats.connect_failures.inc();
        Miss::Unreachable {
            id: node.id,
            node: node.name.clone(),
            detail,
        }
    };
    let started = Instant::now();
    let timeout = settings.connect_timeout;
    let opened = crate::timers::timeout(timeout, open(settings, &node.name, &node.address)).await;
    let mut backend = match opened {
        Ok(Ok(stream)) => stream,
        Ok(Err(detail)) => return Err(unreachable(detail)),
        Err(_) => return Err(unreachable(format!("connect timed out after {timeout:?}"))),
    };
    let mut startup = startup.clone();
    if choice.read_only_on_primary {
        // A read-only session that fell back to the primary keeps its
        // meaning: PostgreSQL itself refuses its writes with 25006.
        startup.set_param("default_transaction_read_only", Some("on"));
    }
    if let Err(e) = super::stream::send(&mut backend, &startup.encode()).await {
        return Err(unreachable(e.to_string()));
    }
    // The backend's first answer tells whether it will take a session at
    // all. A server that is shutting down or starting up (57P0x), or that
    // closes at once, is treated like a refused connect: the session holds
    // and retries. Nothing has reached the client yet, so this is safe.
    let mut first = BytesMut::with_capacity(1024);
    let answer =
        crate::timers::timeout(timeout, fill_message(&mut backend, &mut first, 64 * 1024)).await;
    match answer {
        Err(_) => return Err(unreachable(format!("no answer within {timeout:?}"))),
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Ok(Ok(None)) => return Err(unreachable("closed the connection at once".into())),
        Ok(Ok(Some((tag::ERROR_RESPONSE, total)))) => {
            let code = messages::sqlstate(&first[HEADER_LEN..total]).unwrap_or_default();
            if code.starts_with(b"57P0") {
                let code = String::from_utf8_lossy(code).into_owned();
                return Err(unreachable(format!("refused sessions (SQLSTATE {code})")));
            }
        }
        Ok(Ok(Some(_))) => {}
    }
    node.stats.connects.inc();
    node.stats.connect_latency.record(started.elapsed());
    if choice.fell_back {
        shared.metrics.fallbacks.inc();
        tracing::info!(target_attrs = %request.target, node = %node.name, "no standby within budget: session placed on the primary");
    }
    Ok(Connected {
        backend,
        node: node.id,
        name: node.name.clone(),
        address: node.address.clone(),
        choice,
        load,
        stats: node.stats.clone(),
        held: Duration::ZERO,
        first,
    })
}

/// Opens a connection to the node `name` at `address`: TCP, then TLS as the
/// node's `sslmode` says; or its Unix socket, where nothing is negotiated
/// (PostgreSQL has no TLS there) and no TCP option applies. The error is the
/// reason, for the client and logs.
async fn open(
    settings: &Settings,
    name: &str,
    address: &BackendAddress,
) -> Result<BackendStream, String> {
    let socket = address.connect().await.map_err(|e| e.to_string())?;
    let tcp = match socket {
        Either::Right(_) => return Ok(BackendStream::Plain(socket)),
        Either::Left(tcp) => tcp,
    };
    crate::net::tune(&tcp, settings.tcp_keepalive);
    let Some(node) = settings.node(name) else {
        // Removed by a reload since this snapshot was taken.
        return Err("no longer configured".into());
    };
    let host = address.tcp_host().unwrap_or_default();
    node.tls
        .negotiate(tcp, host)
        .await
        .map_err(|e| e.to_string())
}

/// The snapshot as this session sees it: nodes it could not reach count as
/// down (a private copy, made only on a retry).
fn without(topology: Arc<Topology>, avoid: &[NodeId]) -> Arc<Topology> {
    if avoid.is_empty() {
        return topology;
    }
    let mut view = (*topology).clone();
    for &id in avoid {
        if let Some(node) = view.nodes.get_mut(id) {
            node.status = Status::Down;
        }
        if view.primary == Some(id) {
            view.primary = None;
        }
    }
    Arc::new(view)
}

#[cfg(test)]
mod tests;

//! Accepting clients: one loop per configured listener.
//!
//! Connection limits are checked here (global and per listener, with
//! semaphores); a client over the limit still gets its session task, which
//! reads its startup packet and answers 53300, as PostgreSQL does.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::{ListenerSettings, Settings};
use crate::session;
use crate::shared::Shared;
use crate::workers::Sessions;

/// Accepts until shutdown. `index` is the listener's position in the
/// config; its settings (target, budgets) are read afresh for every session,
/// so a reload applies to the next one. Returning at shutdown drops the
/// `TcpListener`, closing the socket at once: during the drain new clients
/// are refused rather than left in the backlog. Each session goes where
/// `sessions` puts it (a worker thread, with `[runtime] flavor = "per-core"`).
pub async fn accept_loop(
    listener: TcpListener,
    index: usize,
    shared: Arc<Shared>,
    sessions: Sessions,
) {
    let settings = shared.settings();
    let first = &settings.listeners[index];
    let global = shared.connection_slots.clone();
    let local = Arc::new(Semaphore::new(first.max_connections));
    let address = listener.local_addr().map_or(first.address, |a| a);
    tracing::info!(%address, target = %first.target, "listening");
    let mut current = Current::new(settings.clone(), index, address);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    crate::timers::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        shared.metrics.sessions_accepted.inc();
        // The listener's own slot first, so a refused client never holds a
        // global one.
        let permits = local
            .clone()
            .try_acquire_owned()
            .ok()
            .and_then(|l| Some((l, global.clone().try_acquire_owned().ok()?)));
        let config = current.get(&shared, index, address);
        let admission = session::Admission {
            listener_index: index,
            slots: permits,
        };
        sessions.spawn(tcp, |accepted| {
            session::serve(shared.clone(), config, accepted, peer, admission)
        });
    }
}

/// The listener's settings for new sessions, with its bound address: one
/// copy shared by every session until a reload swaps the settings, rather
/// than an allocation per connection.
struct Current {
    /// The snapshot `listener` was taken from.
    from: Arc<Settings>,
    listener: Arc<ListenerSettings>,
}

impl Current {
    fn new(from: Arc<Settings>, index: usize, address: SocketAddr) -> Current {
        let mut listener = from.listeners[index].clone();
        listener.address = address;
        Current {
            from,
            listener: Arc::new(listener),
        }
    }

    /// The settings in force now (taken afresh after a reload).
    fn get(&mut self, shared: &Shared, index: usize, address: SocketAddr) -> Arc<ListenerSettings> {
        let now = shared.settings();
        if !Arc::ptr_eq(&now, &self.from) {
            *self = Current::new(now, index, address);
        }
        self.listener.clone()
    }
}

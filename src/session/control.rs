//! A session's control signals: topology changes, shutdown and lag checks.
//!
//! A relaying session registers a [`SessionWatch`] with the proxy's
//! [fan-out](crate::fanout), whose one task calls it on every event. The
//! watch turns what concerns this session into a [`Signal`] on its
//! session-local [`Signals`], which is all the relay's hot loop waits on:
//! it never re-polls (and re-locks) structures that every session shares.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::ending::{eligibility, EndReason};
use crate::fanout::{Event, Fanout, Watcher, Watching};
use crate::routing::{LagBudget, Target};
use crate::topology::{NodeId, Topology};

/// What the relay must do.
#[derive(Debug)]
pub enum Signal {
    /// End the session as soon as the client stream is at a message
    /// boundary (its node is no longer eligible).
    EndNow(EndReason),
    /// End it at its next idle point (shutdown, lag with `on_lag =
    /// "disconnect"`).
    EndAtIdle(EndReason),
}

/// The latest signal and a notifier, owned by one session.
#[derive(Debug, Default)]
pub struct Signals {
    // A std Mutex: session-local, held for a swap.
    slot: Mutex<Option<Signal>>,
    notify: Notify,
}

impl Signals {
    /// Records a signal; an `EndNow` is never replaced by an `EndAtIdle`.
    pub(crate) fn raise(&self, signal: Signal) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*slot, Some(Signal::EndNow(_))) {
            *slot = Some(signal);
        }
        drop(slot);
        self.notify.notify_one();
    }

    /// Takes the pending signal, if any.
    pub fn take(&self) -> Option<Signal> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Resolves when a signal was raised (a raise before the wait counts).
    pub async fn raised(&self) {
        self.notify.notified().await
    }

    /// After a [`raised`](Self::raised) that only woke a waiting session:
    /// leaves the wake-up for the relay's own `raised`, which then takes
    /// the signal.
    pub fn pass_on(&self) {
        self.notify.notify_one();
    }
}

/// What one session's watch looks for.
pub struct Watch {
    pub node: NodeId,
    pub target: Target,
    /// The session was placed on a standby (not a fallback to the primary).
    pub placed_on_standby: bool,
    /// With `on_lag = "disconnect"` on a standby: the budget the node must
    /// stay within, checked at every lag check.
    pub lag_budget: Option<LagBudget>,
}

/// A session's watcher: its [`Watch`] and the signals it raises.
pub struct SessionWatch {
    watch: Watch,
    pub signals: Signals,
}

impl Watcher for SessionWatch {
    fn notice(&self, topology: &Topology, event: Event) {
        let w = &self.watch;
        let signal = match event {
            Event::Changed => {
                eligibility(topology, w.node, w.target, w.placed_on_standby).map(Signal::EndNow)
            }
            Event::ShuttingDown => Some(Signal::EndAtIdle(EndReason::Shutdown)),
            Event::LagCheck => lagging(w, topology).map(Signal::EndAtIdle),
        };
        if let Some(signal) = signal {
            self.signals.raise(signal);
        }
    }
}

/// Registers a session's watch with the fan-out until the returned
/// registration is dropped; its signals arrive on the returned watcher.
pub fn watch(fanout: &Fanout, watch: Watch) -> (Arc<SessionWatch>, Watching<'_>) {
    let watcher = Arc::new(SessionWatch {
        watch,
        signals: Signals::default(),
    });
    let registration = fanout.watch(watcher.clone());
    (watcher, registration)
}

/// The end reason for a session whose standby is past its lag budget.
fn lagging(w: &Watch, topology: &Topology) -> Option<EndReason> {
    let budget = w.lag_budget?;
    let node = topology.node(w.node)?;
    (node.is_standby() && !budget.admits(node)).then(|| EndReason::Lagging {
        node: node.name.clone(),
    })
}

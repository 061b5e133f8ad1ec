//! A session's control signals: topology changes, shutdown and lag checks.
//!
//! One small task per session ([`spawn`]) waits on the shared sources (the
//! topology watch channel, the shutdown token, a lag timer) and turns what
//! concerns this session into a [`Signal`] on a session-local [`Signals`].
//! It is a task of its own, not a branch of the relay's `select!`, so that
//! the relay's hot loop never re-polls (and re-locks) structures that every
//! session shares: it waits only on the session-local notifier.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ending::{eligibility, EndReason};
use crate::decider::TopologyHandle;
use crate::routing::{LagBudget, Target};
use crate::topology::NodeId;

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
}

/// What the control task watches, for one session.
pub struct Watch {
    pub topology: TopologyHandle,
    pub shutdown: CancellationToken,
    pub node: NodeId,
    pub target: Target,
    /// The session was placed on a standby (not a fallback to the primary).
    pub placed_on_standby: bool,
    /// With `on_lag = "disconnect"` on a standby: the budget the node must
    /// stay within, checked every `lag_check`.
    pub lag_budget: Option<LagBudget>,
    pub lag_check: Duration,
}

/// Aborts the control task when the session ends.
pub struct ControlTask(tokio::task::JoinHandle<()>);

impl Drop for ControlTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the control task; the signals it raises arrive on the returned
/// [`Signals`].
pub fn spawn(watch: Watch) -> (Arc<Signals>, ControlTask) {
    let signals = Arc::new(Signals::default());
    let task = tokio::spawn(run(watch, signals.clone()));
    (signals, ControlTask(task))
}

async fn run(w: Watch, signals: Arc<Signals>) {
    let mut changes = w.topology.subscribe();
    let mut lag_tick = tokio::time::interval(w.lag_check);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                if let Some(r) = eligibility(&w.topology.load(), w.node, w.target, w.placed_on_standby) {
                    signals.raise(Signal::EndNow(r));
                }
            }
            _ = w.shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                signals.raise(Signal::EndAtIdle(EndReason::Shutdown));
            }
            _ = lag_tick.tick(), if w.lag_budget.is_some() => {
                if let Some(r) = lagging(&w) {
                    signals.raise(Signal::EndAtIdle(r));
                }
            }
        }
    }
}

/// The end reason for a session whose standby is past its lag budget.
fn lagging(w: &Watch) -> Option<EndReason> {
    let topology = w.topology.load();
    let node = topology.node(w.node)?;
    let budget = w.lag_budget?;
    (node.is_standby() && !budget.admits(node)).then(|| EndReason::Lagging {
        node: node.name.clone(),
    })
}

//! A session's control signals: topology changes, shutdown and lag checks.
//!
//! One future per session ([`watch`]) waits on the shared sources (the
//! topology watch channel, the shutdown token, a lag timer) and turns what
//! concerns this session into a [`Signal`] on a session-local [`Signals`].
//! The relay's hot loop then waits only on that local notifier: no
//! registration on a structure every session shares, once per message.

use std::sync::Mutex;

use tokio::sync::Notify;

use super::ending::{eligibility, EndReason};
use super::relay::RelayContext;

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
    fn raise(&self, signal: Signal) {
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

/// Watches the shared sources for this session; never returns.
pub async fn watch(ctx: &RelayContext<'_>, signals: &Signals) {
    let mut changes = ctx.topology.subscribe();
    let mut lag_tick = tokio::time::interval(ctx.lag_check);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
                if let Some(r) = eligibility(&ctx.topology.load(), ctx.node, ctx.target, ctx.on_standby) {
                    signals.raise(Signal::EndNow(r));
                }
            }
            _ = ctx.shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                signals.raise(Signal::EndAtIdle(EndReason::Shutdown));
            }
            _ = lag_tick.tick(), if ctx.lag_budget.is_some() => {
                if let Some(r) = lagging(ctx) {
                    signals.raise(Signal::EndAtIdle(r));
                }
            }
        }
    }
}

/// The end reason for a session whose standby is past its lag budget.
fn lagging(ctx: &RelayContext<'_>) -> Option<EndReason> {
    let topology = ctx.topology.load();
    let node = topology.node(ctx.node)?;
    let budget = ctx.lag_budget?;
    (node.is_standby() && !budget.admits(node)).then(|| EndReason::Lagging {
        node: node.name.clone(),
    })
}

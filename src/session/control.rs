//! A session's control signals: topology changes, shutdown and lag checks.
//!
//! A relaying session registers a [`SessionWatch`] with the proxy's
//! [fan-out](crate::fanout), whose one task calls it on every event. The
//! watch turns what concerns this session into a [`Signal`] on its
//! session-local [`Signals`], which is all the relay's hot loop waits on:
//! it never re-polls (and re-locks) structures that every session shares.

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

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

/// The latest signal and the one waiter it wakes, owned by one session.
///
/// Only the session's own task ever waits here, so this is a flag and a
/// single waker rather than a [`tokio::sync::Notify`], whose waiter list
/// (a registration and a removal per wait) the relay paid for twice per
/// transaction.
#[derive(Debug, Default)]
pub struct Signals {
    // Std Mutexes: session-local, held for a swap.
    slot: Mutex<Option<Signal>>,
    /// Whether `slot` holds a signal: set and cleared under its lock, read
    /// without it by every wait.
    pending: AtomicBool,
    /// The session task's waker, from its last wait that found no signal.
    waker: Mutex<Option<Waker>>,
}

impl Signals {
    /// Records a signal; an `EndNow` is never replaced by an `EndAtIdle`.
    pub(crate) fn raise(&self, signal: Signal) {
        let mut slot = lock(&self.slot);
        if !matches!(*slot, Some(Signal::EndNow(_))) {
            *slot = Some(signal);
        }
        self.pending.store(true, Ordering::Release);
        drop(slot);
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
    }

    /// Takes the pending signal, if any.
    pub fn take(&self) -> Option<Signal> {
        let mut slot = lock(&self.slot);
        self.pending.store(false, Ordering::Relaxed);
        slot.take()
    }

    /// Whether a signal waits to be taken.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Resolves while a signal waits to be taken (one raised before the
    /// wait counts); it stays until [`take`](Self::take).
    pub fn raised(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| self.poll_raised(cx))
    }

    fn poll_raised(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending() {
            return Poll::Ready(());
        }
        {
            let mut waker = lock(&self.waker);
            match &*waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        // A raise between the first look and the waker's registration
        // found no waker to wake: look again.
        if self.pending() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Locks a session-local mutex; a panic elsewhere while it was held leaves
/// plain data, still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn end() -> Signal {
        Signal::EndAtIdle(EndReason::Shutdown)
    }

    /// Whether `raised()` resolves within a short wait.
    async fn fires(signals: &Signals) -> bool {
        tokio::time::timeout(Duration::from_millis(20), signals.raised())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_raise_is_seen_until_taken_whether_it_comes_before_or_during_the_wait() {
        let signals = Arc::new(Signals::default());
        signals.raise(end());
        assert!(fires(&signals).await, "a raise before the wait");
        assert!(signals.take().is_some());
        assert!(!fires(&signals).await, "the signal was taken");
        assert!(!signals.pending());

        let raiser = signals.clone();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            raiser.raise(end());
        });
        tokio::time::timeout(Duration::from_secs(5), signals.raised())
            .await
            .expect("a raise during the wait wakes it");
        later.await.unwrap();
        assert!(matches!(signals.take(), Some(Signal::EndAtIdle(_))));
        assert!(signals.take().is_none());
    }

    #[tokio::test]
    async fn a_wait_that_only_woke_leaves_the_signal_for_the_next() {
        let signals = Signals::default();
        signals.raise(end());
        assert!(fires(&signals).await);
        assert!(signals.pending());
        assert!(fires(&signals).await, "left for the next wait");
        assert!(signals.take().is_some());
        assert!(!fires(&signals).await);
    }

    #[test]
    fn an_end_now_is_not_replaced_by_an_end_at_idle() {
        let signals = Signals::default();
        signals.raise(Signal::EndNow(EndReason::Shutdown));
        signals.raise(end());
        assert!(matches!(signals.take(), Some(Signal::EndNow(_))));
    }
}

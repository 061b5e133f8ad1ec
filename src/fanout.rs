//! The control fan-out: one task tells every relaying session about the
//! events that may concern it (a new topology, shutdown, a lag check).
//!
//! Each session registers a [`Watcher`] for as long as it relays
//! ([`Fanout::watch`]); the fan-out task ([`Fanout::run`]) calls every
//! watcher on every event. A watcher decides what the event means for its
//! session and, if anything, records a signal and wakes it. So the relay's
//! hot loop waits only on its session-local signal, and an idle session
//! costs one registry entry here rather than a control task of its own
//! (a task, a watch receiver, a cancellation future and a lag timer: about
//! 1.5 KiB each, measured by the relay bench's memory case).
//!
//! A leaf: it knows the topology snapshot, not the session stages (the
//! session's watcher lives in `session::control`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::decider::TopologyHandle;
use crate::topology::Topology;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new topology was published (also sent to a watcher when it
    /// registers, so a change it raced with is not missed).
    Changed,
    /// The proxy is shutting down (also sent at registration once it is).
    ShuttingDown,
    /// Time to check lag budgets (every monitor interval).
    LagCheck,
}

/// A session's side of the fan-out. Called with the registry locked: it
/// must only look at the snapshot and record what it decides.
pub trait Watcher: Send + Sync {
    fn notice(&self, topology: &Topology, event: Event);
}

/// Every relaying session's watcher.
pub struct Fanout {
    watchers: Mutex<Watchers>,
    topology: TopologyHandle,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct Watchers {
    next_key: u64,
    by_key: HashMap<u64, Arc<dyn Watcher>>,
}

/// A registration; dropping it removes the watcher.
pub struct Watching<'a> {
    fanout: &'a Fanout,
    key: u64,
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.fanout.lock().by_key.remove(&self.key);
    }
}

impl Fanout {
    pub fn new(topology: TopologyHandle, shutdown: CancellationToken) -> Fanout {
        Fanout {
            watchers: Mutex::default(),
            topology,
            shutdown,
        }
    }

    /// Registers `watcher` until the returned guard is dropped. It is told
    /// about the current topology (and a shutdown under way) at once.
    pub fn watch(&self, watcher: Arc<dyn Watcher>) -> Watching<'_> {
        let key = {
            let mut watchers = self.lock();
            let key = watchers.next_key;
            watchers.next_key += 1;
            watchers.by_key.insert(key, watcher.clone());
            key
        };
        // After the insert: an event from here on reaches it through `run`
        // too, and a second notice of the same state changes nothing.
        let topology = self.topology.load();
        watcher.notice(&topology, Event::Changed);
        if self.shutdown.is_cancelled() {
            watcher.notice(&topology, Event::ShuttingDown);
        }
        Watching { fanout: self, key }
    }

    /// Sessions registered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    /// The fan-out task: until `stop`, passes every event to every watcher.
    pub async fn run(self: Arc<Self>, lag_check: Duration, stop: CancellationToken) {
        let mut changes = self.topology.subscribe();
        // The first lag check one period from now: a registration already
        // checks the present, and an immediate tick would race the first
        // registrations.
        let mut lag_tick =
            crate::timers::interval_at(tokio::time::Instant::now() + lag_check, lag_check);
        lag_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut shutting_down = false;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => match changed {
                    Ok(()) => Event::Changed,
                    Err(_) => return,
                },
                _ = self.shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    Event::ShuttingDown
                }
                _ = lag_tick.tick() => Event::LagCheck,
            };
            self.tell(event);
        }
    }

    fn tell(&self, event: Event) {
        let topology = self.topology.load();
        for watcher in self.lock().by_key.values() {
            watcher.notice(&topology, event);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the events it was told about.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Event)>>);

    impl Watcher for Recorder {
        fn notice(&self, topology: &Topology, event: Event) {
            self.0.lock().unwrap().push((topology.generation, event));
        }
    }

    impl Recorder {
        fn seen(&self) -> Vec<(u64, Event)> {
            self.0.lock().unwrap().clone()
        }
    }

    fn topology(generation: u64) -> Topology {
        Topology {
            generation,
            nodes: Vec::new(),
            primary: None,
            fenced: false,
            max_timeline: 1,
            system_id: None,
        }
    }

    /// Polls `seen` until it holds `want` (the fan-out task runs beside the
    /// test).
    async fn until_seen(recorder: &Recorder, want: &[(u64, Event)]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while recorder.seen() != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "saw {:?}, want {want:?}",
                recorder.seen()
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn every_watcher_hears_each_event_until_it_leaves() {
        let (handle, publish) = TopologyHandle::fixed(topology(1));
        let shutdown = CancellationToken::new();
        let stop = CancellationToken::new();
        let fanout = Arc::new(Fanout::new(handle, shutdown.clone()));
        // No lag check within the test.
        let task = tokio::spawn(fanout.clone().run(Duration::from_secs(3600), stop.clone()));
        // Let the task start (it subscribes to the topology's changes).
        tokio::task::yield_now().await;

        let first = Arc::new(Recorder::default());
        let watching = fanout.watch(first.clone());
        // Told about the current topology at once.
        assert_eq!(first.seen(), [(1, Event::Changed)]);
        publish(topology(2));
        until_seen(&first, &[(1, Event::Changed), (2, Event::Changed)]).await;

        shutdown.cancel();
        let all = [
            (1, Event::Changed),
            (2, Event::Changed),
            (2, Event::ShuttingDown),
        ];
        until_seen(&first, &all).await;
        // Registered after the shutdown began: told at once.
        let late = Arc::new(Recorder::default());
        let _late = fanout.watch(late.clone());
        assert_eq!(late.seen(), [(2, Event::Changed), (2, Event::ShuttingDown)]);

        assert_eq!(fanout.len(), 2);
        drop(watching);
        assert_eq!(fanout.len(), 1);
        publish(topology(3));
        until_seen(
            &late,
            &[
                (2, Event::Changed),
                (2, Event::ShuttingDown),
                (3, Event::Changed),
            ],
        )
        .await;
        assert_eq!(first.seen(), all, "a watcher that left hears nothing more");
        stop.cancel();
        task.await.unwrap();
    }
}

//! Whether a session can move to another node, and what it carries there:
//! its tracked state ([`Tracker`]) and the credential that logs its role in
//! again.
//!
//! The relay feeds the tracker and asks [`Mobility::blocker`] when its node
//! stops being eligible; the move stage takes the credential and the
//! replay. The credential arrives a little after the login (the role's
//! secret is looked up in the background, so the session does not wait for
//! the auth query), through a slot that is written once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::state::{Pin, Tracker};
use crate::credentials::Credential;
use crate::metrics::Metrics;

/// Why a session cannot move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocker {
    /// State that no replay reproduces.
    Pinned(Pin),
    /// No credential to log in again: no secret for the role, a method that
    /// cannot be replayed, or the lookup has not finished.
    NoCredential,
}

impl Blocker {
    pub fn as_label(self) -> &'static str {
        match self {
            Blocker::Pinned(pin) => pin.as_label(),
            Blocker::NoCredential => "no_credential",
        }
    }

    /// What the client is told, after "cannot move the session: ".
    pub fn describe(self) -> &'static str {
        match self {
            Blocker::Pinned(Pin::TempObject) => "it has temporary objects",
            Blocker::Pinned(Pin::HoldCursor) => "it has a WITH HOLD cursor",
            Blocker::Pinned(Pin::AdvisoryLock) => "it holds a session advisory lock",
            Blocker::Pinned(Pin::SetConfig) => "it called set_config()",
            Blocker::Pinned(Pin::Load) => "it loaded a library (LOAD)",
            Blocker::Pinned(Pin::Unparsed) => "it ran statements pgpivot cannot follow",
            Blocker::Pinned(Pin::TooMuchState) => "its session state is too large",
            Blocker::NoCredential => "pgpivot has no credential to log its role in again",
        }
    }
}

/// A movable session's state and credential.
#[derive(Debug, Default)]
pub struct Mobility {
    // A std Mutex, uncontended: the relay's two directions (one task) take
    // it for a message's worth of bookkeeping, never across an await.
    tracker: Mutex<Tracker>,
    credential: Arc<OnceLock<Option<Credential>>>,
    /// Where the session's tracked bytes are summed, and its share.
    metrics: Option<Arc<Metrics>>,
    counted: AtomicUsize,
}

impl Drop for Mobility {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.moves
                .state_bytes
                .sub(self.counted.load(Ordering::Relaxed) as u64);
        }
    }
}

impl Mobility {
    /// A session's mobility, its tracked bytes counted in `metrics`.
    pub fn counted_in(metrics: Arc<Metrics>) -> Mobility {
        Mobility {
            tracker: Mutex::default(),
            credential: Arc::default(),
            metrics: Some(metrics),
            counted: AtomicUsize::new(0),
        }
    }

    /// After a ReadyForQuery: brings the session's share of the tracked
    /// bytes gauge up to date if its state changed (rare: SET, PREPARE).
    pub fn recount(&self, tracker: &mut Tracker) {
        let Some(m) = &self.metrics else { return };
        if tracker.take_changed() {
            let now = tracker.state_bytes();
            let before = self.counted.swap(now, Ordering::Relaxed);
            m.moves.state_bytes.add(now as u64);
            m.moves.state_bytes.sub(before as u64);
        }
    }

    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot the background lookup fills (`None`: no credential).
    pub fn credential_slot(&self) -> Arc<OnceLock<Option<Credential>>> {
        self.credential.clone()
    }

    pub fn credential(&self) -> Option<&Credential> {
        self.credential.get().and_then(Option::as_ref)
    }

    /// Why the session cannot move now, if it cannot.
    pub fn blocker(&self) -> Option<Blocker> {
        if let Some(pin) = self.tracker().pinned() {
            return Some(Blocker::Pinned(pin));
        }
        self.credential().is_none().then_some(Blocker::NoCredential)
    }
}

//! Whether a session can move to another node, and what it carries there:
//! its tracked state ([`Tracker`]) and the credential that logs its role in
//! again.
//!
//! The relay feeds the tracker and asks [`Mobility::blocker`] when its node
//! stops being eligible; the move stage takes the credential and the
//! replay. The credential arrives a little after the login (the role's
//! secret is looked up in the background, so the session does not wait for
//! the auth query), through a slot that is written once.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::state::{Pin, Tracker};
use crate::credentials::Credential;

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
}

impl Mobility {
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

//! Pause and resume, for planned switchovers (`POST /pause`, `/resume`).
//!
//! While paused, new sessions wait before routing, and running sessions
//! finish their current transaction and then wait at their next idle point
//! before sending anything more, so an operator can promote a standby with no
//! client error. A pause covers writes only (sessions that need the primary)
//! or all sessions.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PauseScope {
    /// Running normally.
    #[default]
    None,
    /// Sessions that need the primary wait.
    Writes,
    /// Every session waits.
    All,
}

impl PauseScope {
    /// What `pgpivot status` prints: "no", "writes" or "all".
    pub fn describe(self) -> &'static str {
        match self {
            PauseScope::None => "no",
            PauseScope::Writes => "writes",
            PauseScope::All => "all",
        }
    }

    /// Whether a session of this class must wait.
    pub fn holds(self, needs_primary: bool) -> bool {
        match self {
            PauseScope::None => false,
            PauseScope::Writes => needs_primary,
            PauseScope::All => true,
        }
    }
}

/// The pause switch, shared by every session.
#[derive(Debug)]
pub struct Pause {
    scope: watch::Sender<PauseScope>,
    /// The scope as a plain atomic, for the per-message check (reading the
    /// watch channel takes a shared lock).
    current: AtomicU8,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            scope: watch::channel(PauseScope::None).0,
            current: AtomicU8::new(PauseScope::None as u8),
        }
    }
}

impl Pause {
    pub fn set(&self, scope: PauseScope) {
        self.current.store(scope as u8, Ordering::SeqCst);
        self.scope.send_replace(scope);
    }

    pub fn scope(&self) -> PauseScope {
        match self.current.load(Ordering::SeqCst) {
            x if x == PauseScope::Writes as u8 => PauseScope::Writes,
            x if x == PauseScope::All as u8 => PauseScope::All,
            _ => PauseScope::None,
        }
    }

    /// Whether a session of this class must wait now.
    pub fn holds(&self, needs_primary: bool) -> bool {
        self.scope().holds(needs_primary)
    }

    /// Waits for the pause to let this class through, counted in `busy`
    /// from the moment it may go: the caller keeps the returned guard while it
    /// works. Counting before checking closes the race with a pause that
    /// starts in between (the pauser would see the session busy, not parked).
    pub async fn enter<'a>(
        &self,
        needs_primary: bool,
        busy: &'a crate::metrics::Gauge,
    ) -> crate::metrics::GaugeGuard<'a> {
        loop {
            let guard = busy.track();
            if !self.holds(needs_primary) {
                return guard;
            }
            drop(guard);
            self.wait_resumed(needs_primary).await;
        }
    }

    /// Returns at once unless a pause holds this class of session; then
    /// waits for the resume.
    pub async fn wait_resumed(&self, needs_primary: bool) {
        let mut rx = self.scope.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|s| !s.holds(needs_primary)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_pause_holds_its_scope_until_resumed() {
        let pause = std::sync::Arc::new(Pause::default());
        pause.wait_resumed(true).await;
        pause.set(PauseScope::Writes);
        pause.wait_resumed(false).await; // readers pass a writes-only pause
        let waiter = tokio::spawn({
            let pause = pause.clone();
            async move { pause.wait_resumed(true).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        pause.set(PauseScope::None);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}

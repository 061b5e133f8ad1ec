//! CancelRequest routing.
//!
//! Each session's client gets a BackendKeyData with the backend's real pid
//! (clients compare it with `pg_backend_pid()` and NOTIFY sender pids) and a
//! secret key issued by the proxy. The registry maps (pid, proxy secret) to
//! the backend's address and real key. A CancelRequest arrives on a fresh
//! connection; if its key is known the proxy sends the real one to the
//! backend (over TCP, or the node's Unix socket), otherwise it drops it
//! silently, as PostgreSQL does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::RngCore;
use tokio::io::AsyncWriteExt;

use crate::address::BackendAddress;
use crate::protocol::startup::CancelKey;

/// Where a cancel for one session must go.
#[derive(Debug, Clone)]
struct CancelTarget {
    backend: BackendAddress,
    key: CancelKey,
}

/// The proxy-issued keys of live sessions.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    // A std Mutex: held only for a map insert, remove or lookup, never across
    // an await.
    keys: Mutex<HashMap<CancelKey, CancelTarget>>,
}

/// A session's registration; dropping it forgets the key.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<CancelRegistry>,
    /// The key the client was given.
    pub issued: CancelKey,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.issued);
    }
}

impl Registration {
    /// Points the client's key at another backend (its session moved): the
    /// client keeps the key it was given, cancels reach the new backend.
    pub fn retarget(&self, backend: &BackendAddress, real: CancelKey) {
        let target = CancelTarget {
            backend: backend.clone(),
            key: real,
        };
        self.registry.lock().insert(self.issued.clone(), target);
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, CancelTarget>> {
        // A panic elsewhere while holding this lock cannot leave the map
        // inconsistent (single insert/remove), so poisoning is ignored.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues a proxy key (same pid, fresh secret of the backend key's
    /// length) for a backend's real key.
    pub fn register(self: &Arc<Self>, backend: &BackendAddress, real: CancelKey) -> Registration {
        let mut secret = vec![0u8; real.secret.len()];
        let issued = loop {
            rand::rng().fill_bytes(&mut secret);
            let candidate = CancelKey {
                pid: real.pid,
                secret: Bytes::copy_from_slice(&secret),
            };
            let mut keys = self.lock();
            if !keys.contains_key(&candidate) {
                let target = CancelTarget {
                    backend: backend.clone(),
                    key: real.clone(),
                };
                keys.insert(candidate.clone(), target);
                break candidate;
            }
        };
        Registration {
            registry: self.clone(),
            issued,
        }
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forwards a client's CancelRequest to the right backend. Unknown keys
    /// are ignored (and reported as `false`).
    pub async fn cancel(&self, key: &CancelKey, timeout: Duration) -> bool {
        let Some(target) = self.lock().get(key).cloned() else {
            tracing::debug!(pid = key.pid, "cancel request with an unknown key ignored");
            return false;
        };
        let send = async {
            let mut stream = target.backend.connect().await?;
            stream.write_all(&target.key.encode_request()).await?;
            stream.shutdown().await
        };
        match crate::timers::timeout(timeout, send).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(backend = %target.backend, error = %e, "cancel request not delivered");
                false
            }
            Err(_) => {
                tracing::warn!(backend = %target.backend, "cancel request timed out");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_the_pid_and_are_forgotten_on_drop() {
        let registry = Arc::new(CancelRegistry::default());
        let real = CancelKey {
            pid: 4242,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        };
        let reg = registry.register(&BackendAddress::Tcp("127.0.0.1:1".into()), real.clone());
        assert_eq!(reg.issued.pid, 4242);
        assert_eq!(reg.issued.secret.len(), 4);
        assert_eq!(registry.len(), 1);
        drop(reg);
        assert!(registry.is_empty());
    }
}

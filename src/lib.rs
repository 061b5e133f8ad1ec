//! # pgpivot
//!
//! A failover-aware PostgreSQL proxy: one stable endpoint; read-write
//! sessions go to the current primary, read-only sessions to hot standbys
//! within a lag budget; promotions are detected by watching every node's
//! replication state, and the view of the cluster is swapped atomically.
//!
//! # Layout
//!
//! Data path, one task per client session (see [`session`]):
//! - [`listener`]: accept loops and connection limits.
//! - [`workers`]: where sessions run (`[runtime]`): one worker thread per
//!   core, each session on one thread for its life, or one multi-thread
//!   runtime.
//! - [`session`]: handshake → params → connect (route + hold) → auth
//!   (pass-through) → relay → end, one module per stage, each with its own
//!   error type (joined in [`session::error::SessionError`]) and in-memory
//!   tests beside it (`handshake/tests.rs`, `auth/tests.rs`,
//!   `relay/tests.rs`).
//! - [`protocol`]: startup packets, the header framer, the few messages the
//!   proxy reads or writes.
//! - [`routing`]: target + lag budget + snapshot → node (pure).
//! - [`cancel`]: proxy-issued cancel keys → real backends.
//! - [`readable`]: waiting for bytes without holding a read buffer (TCP
//!   and Unix sockets), so idle sessions hold none.
//! - [`address`]: where a node is (`host:port` or a Unix socket) and the
//!   plain connection to it.
//! - [`tls`]: rustls server config (client side); [`backend_tls`]: TLS to
//!   the nodes with libpq's `sslmode` meanings (sessions and monitor).
//!
//! Control path, one task per node plus one decider and one fan-out:
//! - [`monitor`]: tokio-postgres pollers, one per node.
//! - [`decider`]: hysteresis, lag history, publishes [`topology::Topology`]
//!   snapshots through arc-swap and announces generations on a watch channel.
//! - [`topology`]: the snapshot types and the rules (pure).
//! - [`fanout`]: tells every relaying session about topology changes,
//!   shutdown and lag checks (one task, one registry entry per session).
//!
//! Operating surface:
//! - [`admin`]: the HTTP endpoint (/metrics, /status, /health, /ready,
//!   /pause, /resume, /reload) and the `pgpivot status` client.
//! - [`pause`]: the pause switch sessions check at idle points.
//! - [`reload`]: applying a re-read config (SIGHUP, /reload), one at a time
//!   in its own task.
//!
//! Around them: [`config`] (figment, validation), [`credentials`] (role
//! secrets, ClientKeys and re-login, for moving sessions), [`shared`] (the state
//! every task shares: a leaf, so no stage imports another through it),
//! [`proxy`] (start and graceful shutdown), [`metrics`], [`net`] (socket
//! options), [`timers`] (every timer, on the control runtime's driver when
//! made on a session worker), [`localcluster`] (a real primary + standbys for tests, benches
//! and the demo), [`demo`].

// Unit tests run on their own runtimes, where tokio's timers are fine.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod address;
pub mod admin;
pub mod backend_tls;
pub mod cancel;
pub mod config;
pub mod credentials;
pub mod decider;
pub mod demo;
pub mod fanout;
pub mod listener;
pub mod localcluster;
pub mod maybe_tls;
pub mod metrics;
pub mod monitor;
pub mod net;
pub mod pause;
pub mod protocol;
pub mod proxy;
pub mod readable;
pub mod reload;
pub mod routing;
pub mod session;
pub mod shared;
pub mod timers;
pub mod tls;
pub mod topology;
pub mod workers;

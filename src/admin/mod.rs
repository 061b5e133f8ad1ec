//! The admin HTTP endpoint (`[admin] address`), never on a client listener.
//!
//! - `GET /health`: 200 while the process serves.
//! - `GET /ready`: 200 only while a primary is known (503 otherwise).
//! - `GET /metrics`: Prometheus text ([`exposition`]).
//! - `GET /status`: JSON topology, listeners, recent changes ([`status`]).
//! - `POST /pause?scope=writes|all&timeout_ms=N`: sessions finish their
//!   transaction and wait at their next idle point, new sessions wait;
//!   answers once every affected session is parked or the timeout passed.
//! - `POST /resume`: polls every node afresh, then lets sessions go.
//! - `POST /reload`: re-reads the config file ([`crate::reload`]).
//!
//! With a configured token every request needs `Authorization: Bearer <token>`.

pub mod client;
pub mod exposition;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pause::PauseScope;
use crate::shared::Shared;

/// Serves the admin API on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Option<String>,
    stop: CancellationToken,
) {
    let router = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/reload", post(reload))
        .layer(middleware::from_fn_with_state(Arc::new(token), authorize))
        .with_state(shared);
    let served = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
    if let Err(e) = served.await {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

async fn authorize(
    State(token): State<Arc<Option<String>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token) {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response()
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    match shared.topology.load().primary_view() {
        Some(p) => (StatusCode::OK, format!("ready: primary {}\n", p.name)).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no primary\n").into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let body = exposition::render(&shared);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn status_json(State(shared): State<Arc<Shared>>) -> Json<status::StatusReport> {
    Json(status::report(&shared))
}

#[derive(Deserialize)]
struct PauseParams {
    #[serde(default = "writes")]
    scope: PauseScope,
    #[serde(default = "thirty_seconds")]
    timeout_ms: u64,
}

fn writes() -> PauseScope {
    PauseScope::Writes
}

fn thirty_seconds() -> u64 {
    30_000
}

#[derive(serde::Serialize)]
struct PauseAnswer {
    paused: PauseScope,
    /// Every affected session reached an idle point.
    parked: bool,
    busy_writers: u64,
    busy_readers: u64,
}

async fn pause(
    State(shared): State<Arc<Shared>>,
    Query(p): Query<PauseParams>,
) -> Json<PauseAnswer> {
    shared.pause.set(p.scope);
    tracing::info!(scope = ?p.scope, "paused by the admin endpoint");
    let m = &shared.metrics;
    let busy = || {
        let readers = if p.scope == PauseScope::All {
            m.busy_readers.get()
        } else {
            0
        };
        m.busy_writers.get() + readers
    };
    let deadline = Instant::now() + Duration::from_millis(p.timeout_ms);
    // Sessions report idleness through gauges; a short poll is simplest.
    while busy() > 0 && Instant::now() < deadline {
        crate::timers::sleep(Duration::from_millis(5)).await;
    }
    Json(PauseAnswer {
        paused: p.scope,
        parked: busy() == 0,
        busy_writers: m.busy_writers.get(),
        busy_readers: m.busy_readers.get(),
    })
}

#[derive(serde::Serialize)]
struct ResumeAnswer {
    resumed: bool,
    primary: Option<String>,
    /// Every node answered a poll made after the resume request.
    fresh: bool,
}

/// Before letting sessions go, every node is polled afresh, so that a
/// promotion done during the pause is known and nothing is routed by a stale
/// view.
async fn resume(State(shared): State<Arc<Shared>>) -> Json<ResumeAnswer> {
    let asked = Instant::now();
    shared.monitor.poke_all();
    let settings = shared.settings();
    let deadline = asked + settings.monitor.timeout * 2 + settings.monitor.interval;
    let fresh = || {
        let t = shared.topology.load();
        t.nodes
            .iter()
            .filter(|n| n.status != crate::topology::Status::Removed)
            .all(|n| n.polled_at.is_some_and(|at| at >= asked))
    };
    while !fresh() && Instant::now() < deadline {
        crate::timers::sleep(Duration::from_millis(5)).await;
    }
    shared.pause.set(PauseScope::None);
    let primary = shared
        .topology
        .load()
        .primary_view()
        .map(|p| p.name.clone());
    tracing::info!(primary = ?primary, "resumed by the admin endpoint");
    Json(ResumeAnswer {
        resumed: true,
        primary,
        fresh: fresh(),
    })
}

async fn reload(State(shared): State<Arc<Shared>>) -> Response {
    match shared.reloads.reload().await {
        Ok(report) => Json(report).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

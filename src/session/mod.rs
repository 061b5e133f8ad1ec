//! One client session, from accept to end.
//!
//! ```text
//! handshake ──► params ──► connect ──────────► auth ──────────► relay ─────────► end
//! SSLRequest    pgpivot.*  route + hold,       pass-through,    framed bulk      Terminate, backend
//! (rustls),     settings   backend TCP(+TLS),  proxy cancel     copy; state      gone, shutdown, a
//! startup/cancel           startup packet      key, in_hot_     tracker fed      session that
//!                                              standby check,        │  ▲        cannot move
//!                                              login noted   MovePoint ▼  │ Moved
//!                                                            moving: goodbye check, in-flight
//!                                                            answers, pause gate, connect,
//!                                                            re-login, replay
//! HandshakeError AdmitError ConnectError       AuthError        RelayEnd / MoveError
//! ```
//!
//! Each stage is a module with its own function and error type; this one
//! runs them in order inside the session's tracing span, with one settings
//! snapshot, turns a stage's error into the client's ErrorResponse, and
//! closes the client's connection the way PostgreSQL does (`close`). After
//! the login, `Relayed` alternates relay and move for as long as the
//! session can move (`[failover] move_sessions`, see [`mobility`]).

pub mod auth;
pub mod connect;
pub mod control;
pub mod ending;
pub mod error;
pub mod handshake;
pub mod mobility;
pub mod moving;
pub mod params;
pub mod relay;
pub mod state;
pub mod stream;
#[cfg(test)]
mod test_support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::backend_tls::BackendStream;
use crate::config::{ListenerSettings, OnLag, Settings, TlsMode};
use crate::credentials::{self, Login};
use crate::protocol::messages;
use crate::protocol::messages::{Severity, TxStatus};
use crate::protocol::sqlstate;
use crate::protocol::startup::StartupMessage;
use crate::shared::Shared;
use crate::workers::Accepted;
use error::{AdmitError, AuthError, ClientError, ConnectError, SessionError};
use handshake::Hello;
use mobility::Mobility;
use relay::{ReadBuffer, RelayContext, RelayEnd};
use stream::ClientStream;
use tokio_util::either::Either;

/// PostgreSQL's default `authentication_timeout`.
pub(crate) const AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What an accepted client holds while its session lives.
pub struct Admission {
    /// The listener's position in the config (its sessions gauge).
    pub listener_index: usize,
    /// Its connection slots, the listener's and the global one; `None`
    /// when a limit was hit: the client then gets 53300 after its startup
    /// packet. Released when the session ends.
    pub slots: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// Serves one accepted connection, in the session's tracing span.
///
/// Not an `async fn`: the span is made here, and the session's future is
/// the instrumented `run` alone, with no outer state machine keeping the
/// arguments a second time (an idle session's task is sized by it).
pub fn serve(
    shared: Arc<Shared>,
    listener: Arc<ListenerSettings>,
    accepted: Accepted,
    peer: SocketAddr,
    admission: Admission,
) -> impl Future<Output = ()> + Send + 'static {
    let id = shared.next_session_id();
    let span = tracing::info_span!("session", id, client = %peer, listener = %listener.address, node = tracing::field::Empty);
    run(shared, listener, accepted, admission).instrument(span)
}

/// The session itself, from registering its socket to its end.
async fn run(
    shared: Arc<Shared>,
    listener: Arc<ListenerSettings>,
    accepted: Accepted,
    admission: Admission,
) {
    let _open = shared.listener_sessions[admission.listener_index].track();
    let _active = shared.metrics.sessions_active.track();
    let (tcp, _placed) = match accepted.into_stream() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register a connection on its worker");
            return;
        }
    };
    let admitted = admission.slots.is_some();
    // Two steps one after the other, the first boxed: an idle session's
    // task is sized by the relaying step alone (plus what the login handed
    // it). Matched by reference: a binding by value would be a second copy
    // in the task.
    let mut logged_in = Box::pin(log_in(&shared, &listener, tcp, admitted)).await;
    match &mut logged_in {
        Ok(Some(session)) => session.relay(&shared, &listener).await,
        Ok(None) => {}
        Err(e) if e.is_client_gone() => tracing::debug!("{e}"),
        Err(e) => tracing::info!(kind = e.as_label(), "session failed: {e}"),
    }
}

/// A session past its login, as the relay takes it over.
struct LoggedIn {
    settings: Arc<Settings>,
    client: ClientStream,
    connected: connect::Connected,
    request: params::SessionRequest,
    startup: StartupMessage,
    status: TxStatus,
    in_hot_standby: bool,
    /// Kept alive for the session: dropping it forgets the cancel key.
    cancel: Option<crate::cancel::Registration>,
    mobility: Option<Mobility>,
}

impl LoggedIn {
    /// Relays (and moves) the session until it ends.
    async fn relay(&mut self, shared: &Shared, listener: &ListenerSettings) {
        let session = Relayed {
            shared,
            settings: &self.settings,
            listener,
            request: &self.request,
            startup: &self.startup,
            busy_gauge: shared.metrics.busy(self.request.target.needs_primary()),
            cancel: self.cancel.as_ref(),
            mobility: self.mobility.as_ref(),
        };
        session
            .relay(
                &mut self.client,
                &mut self.connected,
                self.status,
                self.in_hot_standby,
            )
            .await;
    }
}

/// The stages up to the login: `None` for a cancel request (served here).
async fn log_in(
    shared: &Shared,
    listener: &ListenerSettings,
    tcp: TcpStream,
    admitted: bool,
) -> Result<Option<LoggedIn>, SessionError> {
    let settings = shared.settings();
    crate::net::tune(&tcp, settings.tcp_keepalive);
    let deadline = Instant::now() + settings.startup_timeout;
    let (mut client, mut startup) =
        match Box::pin(handshake::negotiate(tcp, settings.tls.as_ref(), deadline)).await? {
            Hello::Cancel(mut client, key) => {
                shared.metrics.cancel_requests.inc();
                shared.cancels.cancel(&key, settings.connect_timeout).await;
                // As PostgreSQL does: close once the cancel is sent (libpq
                // 17 waits for this close to count the cancel as done).
                close(&mut client).await;
                return Ok(None);
            }
            Hello::Startup(client, startup) => (client, startup),
        };
    let checked = admit(shared, &settings, listener, &client, &mut startup, admitted);
    let request = or_reply(&mut client, checked).await?;
    tracing::debug!(user = startup.param("user"), database = startup.param("database"), target = %request.target, "startup");
    // Until the relay starts, a session past the pause gate counts as busy:
    // a pause waits for it, and a paused proxy holds it here.
    let busy_gauge = shared.metrics.busy(request.target.needs_primary());
    let deadline = Instant::now() + settings.hold_timeout;
    let entered = crate::timers::timeout_at(
        deadline.into(),
        shared
            .pause
            .enter(request.target.needs_primary(), busy_gauge),
    );
    // A shutdown reaches a session waiting here at once (and one that
    // arrives after it began goes no further: it would be ended at its
    // first idle point anyway).
    let entered = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => Err(ConnectError::ShuttingDown),
        entered = entered => entered.map_err(|_| ConnectError::Paused),
    };
    let starting = or_reply(&mut client, entered).await?;
    // The stages before the relay are boxed: a session's task is sized by its
    // largest future, and an idle session spends its life in the relay.
    let connected = Box::pin(connect::connect(
        routes(shared),
        &settings,
        &request,
        &startup,
    ))
    .await;
    let mut connected = or_reply(&mut client, connected).await?;
    tracing::Span::current().record("node", connected.name.as_str());
    let authenticated = Box::pin(authenticate(shared, &request, &mut connected, &mut client)).await;
    let authenticated = or_reply(&mut client, authenticated).await?;
    let mobility = mobility_for(shared, &settings, &startup, authenticated.login);
    drop(starting);
    Ok(Some(LoggedIn {
        settings,
        client,
        connected,
        request,
        startup,
        status: authenticated.status,
        in_hot_standby: authenticated.in_hot_standby,
        cancel: authenticated.cancel,
        mobility,
    }))
}

/// Where the relay picks up after a move.
struct AfterMove {
    status: TxStatus,
    lost_block: bool,
    in_hot_standby: bool,
}

/// A session past its login: relays, and moves it when its node stops being
/// eligible (if it can move), until it ends.
struct Relayed<'a> {
    shared: &'a Shared,
    settings: &'a Settings,
    listener: &'a ListenerSettings,
    request: &'a params::SessionRequest,
    startup: &'a StartupMessage,
    busy_gauge: &'a crate::metrics::Gauge,
    cancel: Option<&'a crate::cancel::Registration>,
    mobility: Option<&'a Mobility>,
}

impl Relayed<'_> {
    async fn relay(
        &self,
        client: &mut ClientStream,
        connected: &mut connect::Connected,
        mut status: TxStatus,
        mut on_standby: bool,
    ) {
        let shared = self.shared;
        // The client's bytes not yet relayed; a move keeps them.
        let mut held = ReadBuffer::new();
        let mut lost_block = false;
        loop {
            let (watcher, _watching) = control::watch(
                &shared.fanout,
                control::Watch {
                    node: connected.node,
                    target: self.request.target,
                    // The server's own word, now that it has spoken.
                    placed_on_standby: on_standby,
                    lag_budget: (self.listener.on_lag == OnLag::Disconnect && on_standby)
                        .then_some(self.request.budget),
                },
            );
            if std::mem::take(&mut lost_block) {
                let max = self.settings.max_message_bytes;
                if moving::answer_lost_block(client, &mut held, max)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let ctx = RelayContext {
                node: connected.node,
                target: self.request.target,
                status,
                monitor: &shared.monitor,
                max_message_bytes: self.settings.max_message_bytes,
                metrics: &shared.metrics,
                signals: &watcher.signals,
                stats: &connected.stats,
                pause: &shared.pause,
                busy_gauge: self.busy_gauge,
                mobility: self.mobility,
            };
            let end = relay_streams(client, &mut connected.backend, &ctx, &mut held).await;
            let point = match end {
                RelayEnd::Move(point) => point,
                end => {
                    if let RelayEnd::Ended(reason) = &end {
                        if reason.abandons_node() {
                            if let Some(tcp) = connected.backend.tcp() {
                                crate::net::discard_on_close(tcp);
                            }
                        }
                        self.count_blocked();
                    }
                    report(shared, end);
                    return;
                }
            };
            // Boxed: rare, and large (inline it would size every idle
            // session's task).
            let moved = Box::pin(self.move_or_end(point, client, connected, on_standby)).await;
            let Some(moved) = moved else {
                return;
            };
            status = moved.status;
            lost_block = moved.lost_block;
            on_standby = moved.in_hot_standby;
        }
    }

    /// Moves the session to a new backend (which replaces `connected`), or,
    /// if it cannot move, ends it (`None`).
    async fn move_or_end(
        &self,
        point: relay::MovePoint,
        client: &mut ClientStream,
        connected: &mut connect::Connected,
        on_standby: bool,
    ) -> Option<AfterMove> {
        let shared = self.shared;
        let started = Instant::now();
        let cause = moving::cause_label(&point.cause);
        let reason = match &point.cause {
            relay::MoveCause::Ineligible(reason) => Some(reason.message()),
            relay::MoveCause::Goodbye { .. } => None,
        };
        let context = self.move_context(connected, on_standby);
        let moved = match moving::move_session(&context, point, client).await {
            Ok(moved) => moved,
            Err(e) => {
                self.end_unmoved(client, e, reason, connected, on_standby)
                    .await;
                return None;
            }
        };
        let from = std::mem::replace(connected, moved.connected);
        let moves = &shared.metrics.moves;
        moves.moved.inc(cause);
        moves.move_time.record(started.elapsed());
        if self.mobility.is_some_and(|m| m.tracker().listens()) {
            moves.moved_listening.inc();
        }
        tracing::Span::current().record("node", connected.name.as_str());
        tracing::info!(from = %from.name, cause, move_ms = started.elapsed().as_millis() as u64, "session moved");
        Some(AfterMove {
            status: moved.status,
            lost_block: moved.lost_block,
            in_hot_standby: moved.in_hot_standby,
        })
    }

    fn move_context<'c>(
        &'c self,
        connected: &'c connect::Connected,
        on_standby: bool,
    ) -> moving::MoveContext<'c> {
        moving::MoveContext {
            routes: routes(self.shared),
            settings: self.settings,
            request: self.request,
            startup: self.startup,
            pause: &self.shared.pause,
            busy_gauge: self.busy_gauge,
            secrets: self.settings.secrets.as_deref(),
            mobility: self.mobility.expect("only a movable session moves"),
            cancel: self.cancel,
            node: connected.node,
            node_name: &connected.name,
            node_address: &connected.address,
            placed_on_standby: on_standby,
        }
    }

    /// A move that did not happen: the client is told why (or, when the
    /// server ended just this session, gets the server's own goodbye).
    async fn end_unmoved(
        &self,
        client: &mut ClientStream,
        e: moving::MoveError,
        reason: Option<String>,
        left: &connect::Connected,
        on_standby: bool,
    ) {
        let moves = &self.shared.metrics.moves;
        if let moving::MoveError::EndedByServer { said } = &e {
            if said.is_empty() {
                let why = "pgpivot: connection to the server was lost";
                let error =
                    messages::error_bytes(Severity::Fatal, sqlstate::CONNECTION_FAILURE, why);
                let _ = stream::send(client, &error).await;
            } else {
                let _ = stream::send(client, said).await;
            }
            close(client).await;
            tracing::debug!("session ended by the server");
            return;
        }
        match &e {
            moving::MoveError::Blocked(b) => moves.blocked.inc(b.as_label()),
            other => moves.failed.inc(other.as_label()),
        }
        let reason = match (reason, &e) {
            (None, moving::MoveError::Blocked(_)) => {
                self.wait_for_reason(left.node, on_standby).await
            }
            (reason, _) => reason,
        };
        let message = match reason {
            Some(reason) => format!("{reason} ({e})"),
            None => format!(
                "pgpivot: the server closed the connection and the session could not move: {e}"
            ),
        };
        tracing::info!(reason = e.as_label(), "session ended, not moved: {message}");
        if !matches!(e, moving::MoveError::ClientGone) {
            let error = messages::error_bytes(Severity::Fatal, sqlstate::ADMIN_SHUTDOWN, &message);
            let _ = stream::send(client, &error).await;
        }
        close(client).await;
    }

    /// The reason a session's node is no longer eligible, once the topology
    /// says so, naming the new primary once there is one (a client told to
    /// reconnect then knows it can). Waits at most the hold timeout.
    async fn wait_for_reason(
        &self,
        node: crate::topology::NodeId,
        on_standby: bool,
    ) -> Option<String> {
        let topology = &self.shared.topology;
        let mut changes = topology.subscribe();
        let target = self.request.target;
        let wait = async {
            let mut last = None;
            loop {
                let reason = ending::eligibility(&topology.load(), node, target, on_standby);
                if let Some(ending::EndReason::NotPrimary {
                    new_primary: None, ..
                })
                | None = &reason
                {
                    last = reason.or(last);
                } else {
                    return reason;
                }
                if changes.changed().await.is_err() {
                    return last;
                }
            }
        };
        let waited = tokio::select! {
            _ = self.shared.shutdown.cancelled() => None,
            reason = crate::timers::timeout(self.settings.hold_timeout, wait) => reason.ok().flatten(),
        };
        waited.map(|r| r.message())
    }

    /// Counts a movable session ended by a topology change because it could
    /// not move.
    fn count_blocked(&self) {
        if let Some(blocker) = self.mobility.and_then(Mobility::blocker) {
            self.shared.metrics.moves.blocked.inc(blocker.as_label());
            tracing::info!(
                reason = blocker.as_label(),
                "session not moved: {}",
                blocker.describe()
            );
        }
    }
}

/// The state tracker and credential of a session that may move (`None`
/// with `move_sessions = false`). The role's secret is looked up in the
/// background; until it is found the session cannot move.
fn mobility_for(
    shared: &Shared,
    settings: &Settings,
    startup: &StartupMessage,
    login: Login,
) -> Option<Mobility> {
    let store = settings.secrets.clone()?;
    let mobility = Mobility::counted_in(shared.metrics.clone());
    let slot = mobility.credential_slot();
    let role = startup.param("user").unwrap_or_default().to_string();
    match login {
        Login::Md5 | Login::Scram(_) => {
            // Known already (a role's sessions come again and again): no
            // task, whose few KiB would come and go in every login.
            if let Some(secret) = store.cached(&role) {
                settle(&shared.metrics, &slot, &role, &login, secret.as_ref());
                return Some(mobility);
            }
            let primary = shared
                .topology
                .load()
                .primary_view()
                .map(|p| (p.name.clone(), p.address.clone()));
            let tls = primary
                .as_ref()
                .and_then(|(name, _)| settings.node(name))
                .map(|n| n.tls.clone());
            let metrics = shared.metrics.clone();
            let timeout = settings.connect_timeout + settings.monitor.timeout;
            // On the control runtime: tokio-postgres times its connect.
            crate::timers::spawn_with_timers(async move {
                let secret = match (primary, tls) {
                    (Some((name, address)), Some(tls)) => {
                        let lookup = store.lookup(&role, &name, &address, &tls);
                        match crate::timers::timeout(timeout, lookup).await {
                            Ok(Ok(secret)) => secret,
                            Ok(Err(e)) if e.is_repeat() => {
                                tracing::debug!(role, "{e}");
                                None
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(role, "{e}; sessions of this role cannot move");
                                None
                            }
                            Err(_) => None,
                        }
                    }
                    _ => None,
                };
                settle(&metrics, &slot, &role, &login, secret.as_ref());
            });
        }
        Login::Other => {
            no_credential(&shared.metrics, &role);
            let _ = slot.set(None);
        }
        login => {
            shared.metrics.moves.with_credential.inc();
            let _ = slot.set(credentials::credential_for(&login, None));
        }
    }
    Some(mobility)
}

/// Derives the session's credential from its login and the role's
/// `secret`, counts it, and makes it the session's.
fn settle(
    metrics: &crate::metrics::Metrics,
    slot: &OnceLock<Option<credentials::Credential>>,
    role: &str,
    login: &Login,
    secret: Option<&credentials::Secret>,
) {
    let credential = credentials::credential_for(login, secret);
    match &credential {
        Some(_) => metrics.moves.with_credential.inc(),
        None => no_credential(metrics, role),
    }
    let _ = slot.set(credential);
}

/// Counts and logs a session whose role cannot log in again.
fn no_credential(metrics: &crate::metrics::Metrics, role: &str) {
    metrics.moves.no_credential(role);
    tracing::info!(
        role,
        "no credential to log this role in again: its sessions cannot move"
    );
}

/// The narrow handle the connect stage takes.
fn routes(shared: &Shared) -> connect::Routes<'_> {
    connect::Routes {
        topology: &shared.topology,
        monitor: &shared.monitor,
        metrics: &shared.metrics,
        shutdown: &shared.shutdown,
        tiebreak: &shared.tiebreak,
    }
}

/// Checks the connection limit and TLS requirement, then reads the
/// session's own settings.
fn admit(
    shared: &Shared,
    settings: &Settings,
    listener: &ListenerSettings,
    client: &ClientStream,
    startup: &mut StartupMessage,
    admitted: bool,
) -> Result<params::SessionRequest, AdmitError> {
    let tls_required = settings
        .tls
        .as_ref()
        .is_some_and(|t| t.mode == TlsMode::Require);
    if !admitted {
        shared.metrics.sessions_rejected_limit.inc();
        Err(AdmitError::TooManyConnections)
    } else if tls_required && !client.is_tls() {
        Err(AdmitError::TlsRequired)
    } else {
        params::extract(startup, listener)
    }
}

/// Runs the pass-through authentication. A backend that hangs
/// mid-authentication (its postmaster stopped, say) must not hold the client
/// forever: this gives up when the monitor declares the node ineligible, or
/// after PostgreSQL's own authentication timeout.
async fn authenticate(
    shared: &Shared,
    request: &params::SessionRequest,
    connected: &mut connect::Connected,
    client: &mut ClientStream,
) -> Result<auth::Authenticated, AuthError> {
    let auth_ctx = auth::AuthContext {
        node: &connected.name,
        backend_address: &connected.address,
        cancels: &shared.cancels,
        needs_primary: request.target.needs_primary(),
        received: std::mem::take(&mut connected.first),
    };
    // Before the server reports in_hot_standby, routing's word for it.
    let placed_on_standby = !request.target.needs_primary() && !connected.choice.fell_back;
    let lost = ending::lost(
        &shared.topology,
        connected.node,
        request.target,
        placed_on_standby,
    );
    let result =
        auth::authenticate_bounded(client, &mut connected.backend, auth_ctx, AUTH_TIMEOUT, lost)
            .await;
    if let Err(AuthError::NotPrimary { .. }) = &result {
        shared.monitor.poke(connected.node);
    }
    result
}

/// Logs (and counts) how a relay ended.
fn report(shared: &Shared, end: RelayEnd) {
    match end {
        RelayEnd::Ended(reason) => {
            shared.metrics.ended(reason.kind());
            tracing::info!(
                reason = reason.kind().as_label(),
                "session ended by pgpivot: {}",
                reason.message()
            );
        }
        RelayEnd::ClientProtocol(e) => tracing::info!("client protocol violation: {e}"),
        other => tracing::debug!(end = ?other, "session ended"),
    }
}

/// Splits both streams and relays between them. Plain TCP splits into
/// borrowed halves for free; a TLS stream goes through `tokio::io::split`,
/// whose halves share the one rustls state.
async fn relay_streams(
    client: &mut ClientStream,
    backend: &mut BackendStream,
    ctx: &RelayContext<'_>,
    held: &mut ReadBuffer,
) -> RelayEnd {
    match client {
        ClientStream::Plain(tcp) => {
            let (mut cr, mut cw) = tcp.split();
            relay_to(&mut cr, &mut cw, backend, ctx, held).await
        }
        ClientStream::Tls(tls) => {
            let (mut cr, mut cw) = tokio::io::split(&mut **tls);
            relay_to(&mut cr, &mut cw, backend, ctx, held).await
        }
    }
}

/// The backend half of [`relay_streams`].
async fn relay_to<CR, CW>(
    cr: &mut CR,
    cw: &mut CW,
    backend: &mut BackendStream,
    ctx: &RelayContext<'_>,
    held: &mut ReadBuffer,
) -> RelayEnd
where
    CR: tokio::io::AsyncRead + crate::readable::WaitReadable + Unpin,
    CW: AsyncWrite + Unpin,
{
    match backend {
        BackendStream::Plain(Either::Left(tcp)) => {
            let (mut br, mut bw) = tcp.split();
            relay::relay(cr, cw, &mut br, &mut bw, ctx, held).await
        }
        BackendStream::Plain(Either::Right(unix)) => {
            let (mut br, mut bw) = unix.split();
            relay::relay(cr, cw, &mut br, &mut bw, ctx, held).await
        }
        BackendStream::Tls(tls) => {
            let (mut br, mut bw) = tokio::io::split(&mut **tls);
            relay::relay(cr, cw, &mut br, &mut bw, ctx, held).await
        }
    }
}

/// Passes a stage's result through; on an error, tells the client why and
/// closes its connection.
async fn or_reply<T, E: Into<SessionError>>(
    client: &mut ClientStream,
    result: Result<T, E>,
) -> Result<T, SessionError> {
    let result = result.map_err(Into::into);
    if let Err(e) = &result {
        refuse(client, e.client_error()).await;
    }
    result
}

/// Sends the client the ErrorResponse an error calls for, if any, and closes
/// the connection.
pub(crate) async fn refuse<W: AsyncWrite + Unpin>(client: &mut W, shown: Option<ClientError>) {
    if let Some(shown) = shown {
        let error = messages::error_bytes(shown.severity, shown.code, &shown.message);
        let _ = stream::send(client, &error).await;
    }
    close(client).await;
}

/// How long closing a client connection may take: a client that reads
/// nothing must not keep the session's task alive.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes the client's connection the way PostgreSQL does: over TLS with a
/// close_notify alert first (OpenSSL 3 clients report "unexpected eof while
/// reading" without it, and libpq 17 then counts an encrypted cancel as
/// failed), then a TCP FIN.
pub(crate) async fn close<W: AsyncWrite + Unpin>(client: &mut W) {
    let _ = crate::timers::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
}

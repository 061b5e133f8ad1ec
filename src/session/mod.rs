//! One client session, from accept to end.
//!
//! ```text
//! handshake ──► params ──► connect ──────────► auth ──────────► relay ──► end
//! SSLRequest    pgpivot.*  route + hold,       pass-through,    framed     Terminate, backend
//! (rustls),     settings   backend TCP(+TLS),  proxy cancel     bulk       gone, node no longer
//! startup/cancel           startup packet      key, in_hot_     copy       eligible, shutdown
//!                                              standby check
//! HandshakeError AdmitError ConnectError       AuthError        RelayEnd
//! ```
//!
//! Each stage is a module with its own function and error type; this one
//! runs them in order inside the session's tracing span, with one settings
//! snapshot, turns a stage's error into the client's ErrorResponse, and
//! closes the client's connection the way PostgreSQL does ([`close`]).

pub mod auth;
pub mod connect;
pub mod control;
pub mod ending;
pub mod error;
pub mod handshake;
pub mod params;
pub mod relay;
pub mod state;
pub mod stream;
#[cfg(test)]
mod test_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::backend_tls::BackendStream;
use crate::config::{ListenerSettings, OnLag, Settings, TlsMode};
use crate::protocol::messages;
use crate::protocol::startup::StartupMessage;
use crate::shared::Shared;
use error::{AdmitError, AuthError, ClientError, ConnectError, SessionError};
use handshake::Hello;
use relay::{RelayContext, RelayEnd};
use stream::ClientStream;

/// PostgreSQL's default `authentication_timeout`.
const AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves one accepted connection. `admitted` is false when a connection
/// limit was hit: the client then gets 53300 after its startup packet.
pub async fn serve(
    shared: Arc<Shared>,
    listener: Arc<ListenerSettings>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: bool,
) {
    let id = shared.next_session_id();
    let span = tracing::info_span!("session", id, client = %peer, listener = %listener.address, node = tracing::field::Empty);
    async move {
        let _active = shared.metrics.sessions_active.track();
        match run(&shared, &listener, tcp, admitted).await {
            Ok(()) => {}
            Err(e) if e.is_client_gone() => tracing::debug!("{e}"),
            Err(e) => tracing::info!(kind = e.as_label(), "session failed: {e}"),
        }
    }
    .instrument(span)
    .await
}

async fn run(
    shared: &Shared,
    listener: &ListenerSettings,
    tcp: TcpStream,
    admitted: bool,
) -> Result<(), SessionError> {
    let settings = shared.settings();
    crate::net::tune(&tcp, settings.tcp_keepalive);
    let deadline = Instant::now() + settings.startup_timeout;
    let (mut client, mut startup) =
        match handshake::negotiate(tcp, settings.tls.as_ref(), deadline).await? {
            Hello::Cancel(mut client, key) => {
                shared.metrics.cancel_requests.inc();
                shared.cancels.cancel(&key, settings.connect_timeout).await;
                // As PostgreSQL does: close once the cancel is sent (libpq
                // 17 waits for this close to count the cancel as done).
                close(&mut client).await;
                return Ok(());
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
    let entered = tokio::time::timeout_at(
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
    let connected = connect::connect(routes(shared), &settings, &request, &startup).await;
    let mut connected = or_reply(&mut client, connected).await?;
    tracing::Span::current().record("node", connected.name.as_str());
    let authenticated = authenticate(shared, &request, &mut connected, &mut client).await;
    let authenticated = or_reply(&mut client, authenticated).await?;
    // Nothing logs in again for this session yet (sessions do not move):
    // hold no copy of how it logged in (a cleartext password, say).
    drop(authenticated.login);
    let (signals, _control) = control::spawn(control::Watch {
        topology: shared.topology.clone(),
        shutdown: shared.shutdown.clone(),
        node: connected.node,
        target: request.target,
        // The server's own word, now that it has spoken.
        placed_on_standby: authenticated.in_hot_standby,
        lag_budget: (listener.on_lag == OnLag::Disconnect && authenticated.in_hot_standby)
            .then_some(request.budget),
        lag_check: settings.monitor.interval,
    });
    let ctx = RelayContext {
        node: connected.node,
        target: request.target,
        status: authenticated.status,
        monitor: &shared.monitor,
        max_message_bytes: settings.max_message_bytes,
        metrics: &shared.metrics,
        signals: &signals,
        stats: &connected.stats,
        pause: &shared.pause,
        busy_gauge,
    };
    drop(starting);
    let end = relay_streams(client, &mut connected.backend, &ctx).await;
    if let RelayEnd::Ended(reason) = &end {
        if reason.abandons_node() {
            crate::net::discard_on_close(connected.backend.tcp());
        }
    }
    report(shared, end);
    Ok(())
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
    client: ClientStream,
    backend: &mut BackendStream,
    ctx: &RelayContext<'_>,
) -> RelayEnd {
    match client {
        ClientStream::Plain(mut tcp) => {
            let (mut cr, mut cw) = tcp.split();
            relay_to(&mut cr, &mut cw, backend, ctx).await
        }
        ClientStream::Tls(tls) => {
            let (mut cr, mut cw) = tokio::io::split(*tls);
            relay_to(&mut cr, &mut cw, backend, ctx).await
        }
    }
}

/// The backend half of [`relay_streams`].
async fn relay_to<CR, CW>(
    cr: &mut CR,
    cw: &mut CW,
    backend: &mut BackendStream,
    ctx: &RelayContext<'_>,
) -> RelayEnd
where
    CR: tokio::io::AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    match backend {
        BackendStream::Plain(tcp) => {
            let (mut br, mut bw) = tcp.split();
            relay::relay(cr, cw, &mut br, &mut bw, ctx).await
        }
        BackendStream::Tls(tls) => {
            let (mut br, mut bw) = tokio::io::split(&mut **tls);
            relay::relay(cr, cw, &mut br, &mut bw, ctx).await
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
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
}

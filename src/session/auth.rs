//! Stage 4 of a session: the authentication exchange, passed through.
//!
//! The backend authenticates the client itself (trust, password, md5,
//! SCRAM-SHA-256); the proxy relays each request and answer unchanged and
//! knows no password. It changes exactly two things:
//! - AuthenticationSASL loses its `-PLUS` mechanisms: the client's TLS
//!   session ends at the proxy, so channel binding cannot work end to end.
//! - BackendKeyData keeps the real pid but carries a proxy-issued secret,
//!   registered for CancelRequest routing.
//!
//! It also reads `in_hot_standby` so that a read-write session never starts
//! on a node that turned out to be a standby.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::error::AuthError;
use crate::cancel::{CancelRegistry, Registration};
use crate::credentials::Login;
use crate::protocol::frame::{read_message, HEADER_LEN};
use crate::protocol::messages::{self, tag, TxStatus};
use crate::protocol::startup::CancelKey;

/// Authentication messages are small; SCRAM's are the largest, well under this.
const AUTH_MESSAGE_LIMIT: usize = 64 * 1024;

/// What the session knows once the backend is ready for queries.
pub struct Authenticated {
    pub status: TxStatus,
    /// How the client logged in, as far as logging in again needs it.
    pub login: Login,
    /// Kept alive for the session: dropping it forgets the cancel key.
    pub cancel: Option<Registration>,
    /// The backend reported `in_hot_standby = on`.
    pub in_hot_standby: bool,
}

/// Context for [`authenticate`].
pub struct AuthContext<'a> {
    /// The node's name, for errors.
    pub node: &'a str,
    pub backend_address: &'a crate::address::BackendAddress,
    pub cancels: &'a std::sync::Arc<CancelRegistry>,
    /// The session must be on a primary: abort if the backend is a standby.
    pub needs_primary: bool,
    /// Bytes the backend already sent.
    pub received: BytesMut,
}

/// [`authenticate`], given up when the node stops being eligible (`lost`
/// resolves) or after `timeout`: a backend that hangs mid-authentication (its
/// postmaster stopped, say) must not hold the client forever.
pub async fn authenticate_bounded<C, B, L>(
    client: &mut C,
    backend: &mut B,
    ctx: AuthContext<'_>,
    timeout: std::time::Duration,
    lost: L,
) -> Result<Authenticated, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    L: std::future::Future<Output = crate::session::ending::EndReason>,
{
    let node = ctx.node.to_string();
    let abandoned = |detail: String| AuthError::Abandoned { node, detail };
    tokio::select! {
        r = crate::timers::timeout(timeout, authenticate(client, backend, ctx)) => {
            r.unwrap_or_else(|_| Err(abandoned(format!("authentication timed out after {timeout:?}"))))
        }
        // The client message adds "pgpivot:" itself.
        reason = lost => Err(abandoned(reason.detail())),
    }
}

/// Relays the exchange from the backend's first answer to the startup packet
/// up to its first ReadyForQuery.
pub async fn authenticate<C, B>(
    client: &mut C,
    backend: &mut B,
    ctx: AuthContext<'_>,
) -> Result<Authenticated, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut from_backend = ctx.received;
    let mut from_client = BytesMut::with_capacity(1024);
    let mut out = BytesMut::with_capacity(8 * 1024);
    let mut cancel = None;
    let mut state = AuthState::new(ctx.needs_primary);
    loop {
        let (t, body) = read_message(backend, &mut from_backend, AUTH_MESSAGE_LIMIT)
            .await
            .map_err(AuthError::from_backend)?
            .ok_or(AuthError::BackendClosed)?;
        match state.on_backend_message(t, &body, &mut out)? {
            AuthStep::Forwarded => {}
            AuthStep::AwaitClient => {
                flush(client, &mut out).await?;
                let (ct, cbody) = read_message(client, &mut from_client, AUTH_MESSAGE_LIMIT)
                    .await
                    .map_err(AuthError::from_client)?
                    .ok_or(AuthError::ClientClosed)?;
                state.login.saw_answer(&cbody);
                let mut answer = BytesMut::with_capacity(cbody.len() + HEADER_LEN);
                put_message(&mut answer, ct, &cbody);
                super::stream::send(backend, &answer)
                    .await
                    .map_err(|_| AuthError::BackendClosed)?;
            }
            AuthStep::BackendKey { pid, secret } => {
                let real = CancelKey {
                    pid,
                    secret: bytes::Bytes::copy_from_slice(secret),
                };
                let reg = ctx.cancels.register(ctx.backend_address, real);
                messages::put_backend_key(&mut out, pid, &reg.issued.secret);
                cancel = Some(reg);
            }
            AuthStep::Rejected => {
                flush(client, &mut out).await?;
                return Err(AuthError::Rejected);
            }
            AuthStep::NotPrimary => {
                return Err(AuthError::NotPrimary {
                    node: ctx.node.to_string(),
                });
            }
            AuthStep::Ready(status) => {
                flush(client, &mut out).await?;
                return Ok(Authenticated {
                    status,
                    login: state.login,
                    cancel,
                    in_hot_standby: state.in_hot_standby,
                });
            }
        }
    }
}

/// What [`authenticate`] does after one backend message, as decided by
/// [`AuthState::on_backend_message`].
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep<'a> {
    /// The message was appended to the client's output; read the next one.
    Forwarded,
    /// The message was appended; flush it and relay the client's answer.
    AwaitClient,
    /// BackendKeyData: nothing was appended; register the real key and
    /// forward the proxy-issued one.
    BackendKey { pid: i32, secret: &'a [u8] },
    /// An ErrorResponse was appended: flush it, the session fails.
    Rejected,
    /// ReadyForQuery from a standby on a session that needs a primary:
    /// nothing was appended, the session must not start here.
    NotPrimary,
    /// ReadyForQuery was appended: flush it, the session is authenticated.
    Ready(TxStatus),
}

/// The part of the authentication stage that reads backend messages: pure,
/// so it can be tested and fuzzed without sockets.
#[derive(Debug, Clone)]
pub struct AuthState {
    /// The session must be on a primary.
    pub needs_primary: bool,
    /// The backend reported `in_hot_standby = on` (last report wins).
    pub in_hot_standby: bool,
    /// How the client is logging in, for logging in again elsewhere.
    pub login: Login,
}

impl AuthState {
    pub fn new(needs_primary: bool) -> Self {
        AuthState {
            needs_primary,
            in_hot_standby: false,
            login: Login::default(),
        }
    }

    /// Handles one whole backend message (`t`, `body` without the header),
    /// appending what the client must see to `out`.
    pub fn on_backend_message<'a>(
        &mut self,
        t: u8,
        body: &'a [u8],
        out: &mut BytesMut,
    ) -> Result<AuthStep<'a>, AuthError> {
        match t {
            tag::AUTHENTICATION => {
                let code = messages::auth_code(body).ok_or_else(|| {
                    AuthError::BackendProtocol("short authentication message".into())
                })?;
                self.login.saw_request(code, &body[4..]);
                if code == 10 {
                    if !messages::sasl_without_channel_binding(body, out) {
                        return Err(AuthError::BackendProtocol("bad SASL mechanism list".into()));
                    }
                } else {
                    put_message(out, t, body);
                }
                Ok(if messages::auth_expects_reply(code) {
                    AuthStep::AwaitClient
                } else {
                    AuthStep::Forwarded
                })
            }
            tag::BACKEND_KEY_DATA => {
                let (pid, secret) = messages::backend_key(body)
                    .ok_or_else(|| AuthError::BackendProtocol("bad BackendKeyData".into()))?;
                Ok(AuthStep::BackendKey { pid, secret })
            }
            tag::PARAMETER_STATUS => {
                if let Some((b"in_hot_standby", value)) = messages::parameter_status(body) {
                    self.in_hot_standby = value == b"on";
                }
                put_message(out, t, body);
                Ok(AuthStep::Forwarded)
            }
            tag::ERROR_RESPONSE => {
                // Authentication failed (28P01 and friends) or the server
                // refused the session: the client sees exactly its error.
                put_message(out, t, body);
                Ok(AuthStep::Rejected)
            }
            tag::READY_FOR_QUERY => {
                if self.needs_primary && self.in_hot_standby {
                    // Do not forward: the session must not start here.
                    return Ok(AuthStep::NotPrimary);
                }
                let status = TxStatus::from_ready_for_query(body)
                    .ok_or_else(|| AuthError::BackendProtocol("bad ReadyForQuery".into()))?;
                put_message(out, t, body);
                Ok(AuthStep::Ready(status))
            }
            _ => {
                put_message(out, t, body);
                Ok(AuthStep::Forwarded)
            }
        }
    }
}

fn put_message(out: &mut BytesMut, t: u8, body: &[u8]) {
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&[t]);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

async fn flush<C: AsyncWrite + Unpin>(client: &mut C, out: &mut BytesMut) -> Result<(), AuthError> {
    client.write_all(out).await?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests;

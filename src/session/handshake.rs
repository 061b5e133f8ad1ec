//! Stage 1 of a session: encryption negotiation and the startup packet.
//!
//! Answers SSLRequest with `S` and a rustls handshake when TLS is configured
//! (`N` otherwise), GSSENCRequest with `N`, accepts direct TLS from
//! PostgreSQL 17 clients, and ends with either a StartupMessage on a
//! (possibly encrypted) stream, or a CancelRequest. Everything happens
//! before one deadline, so a silent client cannot hold a slot.

use std::future::Future;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::error::SessionError;
use super::stream::{send, ClientStream};
use crate::config::{TlsMode, TlsSettings};
use crate::protocol::startup::{self, CancelKey, StartupMessage, StartupPacket};

/// What the client asked for.
pub enum Hello {
    Startup(ClientStream, StartupMessage),
    /// A CancelRequest; the stream is kept so that it can be closed the way
    /// the server closes it (over TLS, with a close_notify).
    Cancel(ClientStream, CancelKey),
}

/// Runs encryption negotiation and reads the startup packet before
/// `deadline`. On failure the client has been told why (08P01) where the
/// protocol allows a reply.
pub async fn negotiate(
    tcp: TcpStream,
    tls: Option<&TlsSettings>,
    deadline: Instant,
) -> Result<Hello, SessionError> {
    let tls = tls.filter(|t| t.mode != TlsMode::Disable);
    let mut stream = ClientStream::Plain(tcp);
    if let (ClientStream::Plain(tcp), Some(tls)) = (&stream, tls) {
        let mut first = [0u8; 1];
        let peeked = match before(deadline, tcp.peek(&mut first)).await {
            Ok(peeked) => peeked?,
            Err(e) => return Err(fail(&mut stream, e).await),
        };
        if peeked == 1 && first[0] == startup::TLS_HANDSHAKE_BYTE {
            stream = upgrade(stream, tls, deadline).await?;
        }
    }
    loop {
        let packet = match before(deadline, startup::read_packet(&mut stream)).await {
            Ok(Ok(packet)) => packet,
            Ok(Err(e)) => return Err(fail(&mut stream, e.into()).await),
            Err(e) => return Err(fail(&mut stream, e).await),
        };
        match packet {
            StartupPacket::SslRequest => {
                let accept = tls.is_some() && !stream.is_tls();
                send(&mut stream, if accept { b"S" } else { b"N" }).await?;
                if let (true, Some(tls)) = (accept, tls) {
                    stream = upgrade(stream, tls, deadline).await?;
                }
            }
            StartupPacket::GssEncRequest => send(&mut stream, b"N").await?,
            StartupPacket::Cancel(key) => return Ok(Hello::Cancel(stream, key)),
            StartupPacket::Startup(msg) => return Ok(Hello::Startup(stream, msg)),
        }
    }
}

/// Runs `f` unless the startup deadline passes first.
async fn before<F: Future>(deadline: Instant, f: F) -> Result<F::Output, SessionError> {
    tokio::time::timeout_at(deadline.into(), f)
        .await
        .map_err(|_| SessionError::StartupTimeout)
}

async fn fail(stream: &mut ClientStream, e: SessionError) -> SessionError {
    super::refuse(stream, &e).await;
    e
}

/// Runs the TLS handshake on a plain stream. Bytes the client sent ahead of
/// the handshake are still in the socket (startup packets are read exactly),
/// so the TLS layer sees and rejects them.
async fn upgrade(
    stream: ClientStream,
    tls: &TlsSettings,
    deadline: Instant,
) -> Result<ClientStream, SessionError> {
    let ClientStream::Plain(tcp) = stream else {
        return Ok(stream);
    };
    let accept = TlsAcceptor::from(tls.server.clone()).accept(tcp);
    let tls_stream = before(deadline, accept).await?.map_err(SessionError::Tls)?;
    Ok(ClientStream::Tls(Box::new(tls_stream)))
}

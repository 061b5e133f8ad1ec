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

use super::error::HandshakeError;
use super::stream::{send, ClientStream, Transport};
use crate::config::{TlsMode, TlsSettings};
use crate::protocol::startup::{self, CancelKey, StartupMessage, StartupPacket};

/// What the client asked for.
pub enum Hello<S = TcpStream> {
    Startup(ClientStream<S>, StartupMessage),
    /// A CancelRequest; the stream is kept so that it can be closed the way
    /// the server closes it (over TLS, with a close_notify).
    Cancel(ClientStream<S>, CancelKey),
}

/// Runs encryption negotiation and reads the startup packet before
/// `deadline`. On failure the client has been told why (08P01) where the
/// protocol allows a reply.
pub async fn negotiate<S: Transport>(
    io: S,
    tls: Option<&TlsSettings>,
    deadline: Instant,
) -> Result<Hello<S>, HandshakeError> {
    let tls = tls.filter(|t| t.mode != TlsMode::Disable);
    let mut stream = ClientStream::Plain(io);
    if let (ClientStream::Plain(io), Some(tls)) = (&mut stream, tls) {
        let first = match before(deadline, io.peek_first()).await {
            Ok(first) => first?,
            Err(e) => return Err(fail(&mut stream, e).await),
        };
        if first == Some(startup::TLS_HANDSHAKE_BYTE) {
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
async fn before<F: Future>(deadline: Instant, f: F) -> Result<F::Output, HandshakeError> {
    crate::timers::timeout_at(deadline.into(), f)
        .await
        .map_err(|_| HandshakeError::Timeout)
}

async fn fail<S: Transport>(stream: &mut ClientStream<S>, e: HandshakeError) -> HandshakeError {
    super::refuse(stream, e.client_error()).await;
    e
}

/// Runs the TLS handshake on a plain stream. Bytes the client sent ahead of
/// the handshake are still in the socket (startup packets are read exactly),
/// so the TLS layer sees and rejects them.
async fn upgrade<S: Transport>(
    stream: ClientStream<S>,
    tls: &TlsSettings,
    deadline: Instant,
) -> Result<ClientStream<S>, HandshakeError> {
    let ClientStream::Plain(io) = stream else {
        return Ok(stream);
    };
    let accept = TlsAcceptor::from(tls.server.clone()).accept(io);
    let tls_stream = before(deadline, accept)
        .await?
        .map_err(HandshakeError::Tls)?;
    Ok(ClientStream::Tls(Box::new(tls_stream)))
}

#[cfg(test)]
mod tests;

//! The client's connection: plain, or TLS terminated at the proxy, over a
//! [`Transport`] (TCP in production, an in-memory pipe in tests).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::maybe_tls::MaybeTls;

pub use crate::maybe_tls::send;

/// What a client connection runs over.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The first byte the client sent, left unread (`None` at EOF): it tells
    /// direct TLS (`0x16`) from a startup packet. Peeking rather than
    /// reading keeps every byte in the socket for whoever reads next.
    fn peek_first(&mut self) -> impl std::future::Future<Output = io::Result<Option<u8>>> + Send;
}

impl Transport for TcpStream {
    async fn peek_first(&mut self) -> io::Result<Option<u8>> {
        let mut first = [0u8; 1];
        let n = self.peek(&mut first).await?;
        Ok((n == 1).then_some(first[0]))
    }
}

/// A client connection after encryption negotiation: plain, or TLS
/// terminated at the proxy.
pub type ClientStream<S = TcpStream> = MaybeTls<S, TlsStream<S>>;

//! The client's connection: plain, or TLS terminated at the proxy, over a
//! [`Transport`] (TCP in production, an in-memory pipe in tests).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Writes all of `bytes` and flushes. Every write the proxy makes goes
/// through here, because over TLS `write_all` alone is not enough:
/// tokio-rustls accepts plaintext into rustls and returns `Ok` as soon as the
/// socket would block, with the encrypted records still queued in rustls. A
/// relay that then waits for the other peer leaves the end of a response
/// unsent for as long as that peer is quiet (a stall a slow reader hits every
/// time). On plain TCP the flush costs nothing.
pub async fn send<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

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

/// A client connection after encryption negotiation.
pub enum ClientStream<S = TcpStream> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S> ClientStream<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

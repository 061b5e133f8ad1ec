//! Helpers for the in-memory stage tests: TLS configs that trust each other
//! and a pipe that can stand in for a client's TCP socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use super::stream::Transport;

/// A server config (with pgpivot's own settings) for a fresh self-signed
/// `localhost` certificate, and a client config that trusts it.
pub fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let server = crate::tls::server_config_from(vec![der.clone()], key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (server, Arc::new(client))
}

/// The proxy's end of an in-memory client connection: a duplex pipe that
/// can peek, as a TCP socket can (through its one-byte lookahead).
pub type Pipe = Lookahead<DuplexStream>;

/// A connected client end and proxy end, with `capacity` bytes of buffer.
pub fn pipe(capacity: usize) -> (DuplexStream, Pipe) {
    let (client, proxy) = tokio::io::duplex(capacity);
    (client, Lookahead::new(proxy))
}

impl Transport for Pipe {
    async fn peek_first(&mut self) -> io::Result<Option<u8>> {
        use crate::readable::WaitReadable;
        std::future::poll_fn(|cx| self.poll_readable(cx)).await?;
        Ok(self.ahead)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Lookahead<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A read half that can wait for readiness without a buffer, as a socket
/// can ([`WaitReadable`](crate::readable::WaitReadable)): it reads one byte
/// ahead and hands it to the next read. The relay tests wrap their pipes in
/// it so that sessions park between transactions, as they do on sockets.
pub struct Lookahead<R> {
    inner: R,
    ahead: Option<u8>,
}

impl<R> Lookahead<R> {
    pub fn new(inner: R) -> Self {
        Lookahead { inner, ahead: None }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Lookahead<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(byte) = this.ahead.take() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        buf.put_slice(&[byte]);
        // And whatever else is there, as a socket's read returns: the end
        // of the stream or an error shows on the next read.
        let _ = Pin::new(&mut this.inner).poll_read(cx, buf);
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin> crate::readable::WaitReadable for Lookahead<R> {
    fn waits(&self) -> bool {
        true
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ahead.is_none() {
            let mut one = [0u8; 1];
            let mut read = ReadBuf::new(&mut one);
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
            // Nothing read: the end of the stream, which the next read sees.
            if let [byte] = read.filled() {
                self.ahead = Some(*byte);
            }
        }
        Poll::Ready(Ok(()))
    }
}

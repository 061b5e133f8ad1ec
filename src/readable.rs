//! Waiting for bytes to arrive without a buffer to read them into.
//!
//! An idle session spends its life waiting for its client's next query and
//! its backend's next answer. Between transactions it *parks* (see
//! [`relay`](crate::session::relay)): it drops its relay run and waits here,
//! for either socket to become readable, holding nothing but the sockets.
//! (Within a run, a read with nothing pending goes to the stack first, see
//! [`ReadBuffer`](crate::session::relay::ReadBuffer), so it holds no buffer
//! either.)
//!
//! TCP and Unix sockets can wait this way. A TLS stream cannot (rustls may
//! hold decrypted bytes already, or need to read a record to learn there
//! are none), nor can tokio's in-memory pipe: a session over one does not
//! park.

use std::io;
use std::task::{Context, Poll};

#[cfg(test)]
use tokio::io::DuplexStream;
use tokio::net::{tcp, unix};

/// A read side that may be able to wait for readiness without a buffer.
pub trait WaitReadable {
    /// Whether [`poll_readable`](Self::poll_readable) waits until bytes
    /// (or the end of the stream, or an error) can be read.
    fn waits(&self) -> bool {
        false
    }

    /// Resolves once a read would not block. Only called when
    /// [`waits`](Self::waits) says so.
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl WaitReadable for tcp::ReadHalf<'_> {
    fn waits(&self) -> bool {
        true
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

impl WaitReadable for unix::ReadHalf<'_> {
    fn waits(&self) -> bool {
        true
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// The halves `tokio::io::split` makes of a TLS stream, as the session
/// splits it: no waiting.
impl<S> WaitReadable for tokio::io::ReadHalf<&mut tokio_rustls::server::TlsStream<S>> {}
impl<S> WaitReadable for tokio::io::ReadHalf<&mut tokio_rustls::client::TlsStream<S>> {}

/// The stage tests' streams: an owned TLS half, and tokio's in-memory pipe,
/// which cannot wait either (a zero-length read returns at once; the relay
/// tests wrap theirs in `session::test_support::Lookahead`, which can).
#[cfg(test)]
impl<S> WaitReadable for tokio::io::ReadHalf<tokio_rustls::server::TlsStream<S>> {}
#[cfg(test)]
impl WaitReadable for DuplexStream {}
#[cfg(test)]
impl WaitReadable for tokio::io::ReadHalf<DuplexStream> {}

/// Waits until `from` is readable, if it can wait without a buffer.
pub async fn readable<R: WaitReadable + ?Sized>(from: &mut R) -> io::Result<()> {
    if from.waits() {
        std::future::poll_fn(|cx| from.poll_readable(cx)).await
    } else {
        Ok(())
    }
}

//! One relay direction's read buffer (see [`ReadBuffer`]).

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// A direction's first read: enough for the common small query and its
/// answer, small enough to cost little (it doubles while reads fill it, so
/// a large result soon reads 64 KiB at a time).
const FIRST_CHUNK: usize = 1024;
/// The most a direction reads at a time, reached while reads keep filling
/// the buffer (bulk COPY, large results).
const READ_CHUNK: usize = 64 * 1024;

/// One direction's read buffer and how much it reads at a time.
///
/// It reads [`FIRST_CHUNK`] at first, doubles (up to [`READ_CHUNK`]) while
/// reads fill it, and goes back to the first size at idle points. Whenever
/// all of it was relayed the next read lands at the start of the allocation
/// again, so a session keeps resident only the pages its largest reads
/// touched rather than walking every page of the buffer in turn. With
/// nothing pending and no grown buffer, a read goes to the stack first, and
/// only the bytes that arrived are copied into a new allocation: waiting for
/// the next query or answer holds no buffer, on any stream.
pub struct ReadBuffer {
    pub(super) bytes: BytesMut,
    chunk: usize,
    /// The capacity of the whole allocation (the view's, when it starts at
    /// the beginning): a smaller view means consumed bytes lie before it.
    whole: usize,
    /// Free space before the last read, to see whether it filled the buffer.
    room: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer::new()
    }
}

impl ReadBuffer {
    pub fn new() -> ReadBuffer {
        // Allocated by the first read.
        ReadBuffer {
            bytes: BytesMut::new(),
            chunk: FIRST_CHUNK,
            whole: 0,
            room: 0,
        }
    }

    /// The bytes read and not yet relayed.
    pub fn pending(&self) -> &[u8] {
        &self.bytes
    }

    /// Drops the first `n` pending bytes (consumed by the proxy itself).
    pub fn consume(&mut self, n: usize) {
        self.bytes.advance(n);
    }

    /// Reads once more from `from` into the buffer; 0 at end of stream.
    /// With nothing pending and the first chunk size, the read waits
    /// holding no allocation (see `poll_first_read`).
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> io::Result<usize> {
        if self.bytes.is_empty() && self.chunk == FIRST_CHUNK {
            return poll_fn(|cx| self.poll_first_read(from, cx)).await;
        }
        let n = from.read_buf(self.prepare()).await?;
        self.read(n);
        Ok(n)
    }

    /// A read into a stack buffer of the first chunk's size, whose bytes
    /// are then copied into the allocation (made anew if it was given back).
    /// This one poll both waits and reads: no readiness poll first, no
    /// allocation held while pending, and cancel-safe (bytes read are in
    /// `self` before it returns).
    fn poll_first_read<R: AsyncRead + Unpin>(
        &mut self,
        from: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_CHUNK];
        let mut read = ReadBuf::uninit(&mut stack);
        match Pin::new(from).poll_read(cx, &mut read) {
            Poll::Pending => {
                self.release();
                return Poll::Pending;
            }
            Poll::Ready(result) => result?,
        }
        let got = read.filled();
        if !got.is_empty() {
            self.prepare().extend_from_slice(got);
            self.read(got.len());
        }
        Poll::Ready(Ok(got.len()))
    }

    /// Gives the allocation back (nothing is pending).
    fn release(&mut self) {
        if self.bytes.capacity() > 0 {
            self.bytes = BytesMut::new();
            self.whole = 0;
        }
    }

    /// Makes room for the next read.
    fn prepare(&mut self) -> &mut BytesMut {
        let buf = &mut self.bytes;
        if buf.is_empty() && buf.capacity() < self.whole {
            // All relayed, and the view starts after consumed bytes: move it
            // back to the start of the allocation (no copy, no allocation).
            let _ = buf.try_reclaim(self.whole);
        }
        if buf.capacity() - buf.len() < self.chunk / 4 {
            buf.reserve(self.chunk);
            // Reserving leaves the view at the start of its allocation.
            self.whole = buf.capacity();
        }
        self.room = buf.capacity() - buf.len();
        buf
    }

    /// After a read of `n` bytes: one that filled the buffer asks for more
    /// next time.
    fn read(&mut self, n: usize) {
        if n == self.room && self.chunk < READ_CHUNK {
            self.chunk *= 2;
        }
    }

    /// At an idle point: a grown buffer with nothing left in it is given
    /// back, so a session that once moved 100 MB reads 1 KiB at a time again.
    pub(super) fn idle(&mut self) {
        if self.chunk > FIRST_CHUNK && self.bytes.is_empty() {
            self.release();
            self.chunk = FIRST_CHUNK;
        }
    }
}

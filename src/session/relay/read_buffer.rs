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

/// First-chunk allocations this thread's buffers gave back, for its next
/// reads. Every transaction takes one per direction and gives it back when
/// the direction waits again; through malloc that round costs about 200
/// user-space instructions (callgrind), from this list a few. At most
/// [`SPARES`] are kept (16 KiB per worker thread), and no session holds
/// one while it waits.
mod spares {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::FIRST_CHUNK;

    /// The most allocations a thread keeps.
    pub const SPARES: usize = 16;

    thread_local! {
        static LIST: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer of [`FIRST_CHUNK`] bytes' capacity.
    pub fn take() -> BytesMut {
        LIST.try_with(|list| list.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| BytesMut::with_capacity(FIRST_CHUNK))
    }

    /// How many this thread keeps now.
    #[cfg(test)]
    pub fn len() -> usize {
        LIST.with(|list| list.borrow().len())
    }

    /// Keeps `buf` for a later [`take`] if it is an empty, unshared
    /// allocation of exactly [`FIRST_CHUNK`] bytes and there is room;
    /// frees it otherwise.
    pub fn give(mut buf: BytesMut) {
        if !buf.is_empty() || !buf.try_reclaim(FIRST_CHUNK) || buf.capacity() != FIRST_CHUNK {
            return;
        }
        let _ = LIST.try_with(|list| {
            let mut list = list.borrow_mut();
            if list.len() < SPARES {
                list.push(buf);
            }
        });
    }
}

/// One direction's read buffer and how much it reads at a time.
///
/// It reads `FIRST_CHUNK` at first, doubles (up to `READ_CHUNK`) while
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

/// A run's buffers end with it (at a park, or with the session): an empty
/// first chunk goes back to the thread's spares (`give` keeps no other).
impl Drop for ReadBuffer {
    fn drop(&mut self) {
        spares::give(std::mem::take(&mut self.bytes));
    }
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

    /// Gives the allocation back (nothing is pending): to this thread's
    /// spares if it is a first chunk, else to the allocator.
    fn release(&mut self) {
        if self.bytes.capacity() > 0 {
            spares::give(std::mem::take(&mut self.bytes));
            self.whole = 0;
        }
    }

    /// Makes room for the next read.
    fn prepare(&mut self) -> &mut BytesMut {
        if self.whole == 0 && self.chunk == FIRST_CHUNK {
            self.bytes = spares::take();
            self.whole = self.bytes.capacity();
        }
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

#[cfg(test)]
mod tests {
    use std::future::{poll_fn, Future};
    use std::task::Poll;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Polls one read of `buf` from `from` once: `None` if it is pending.
    async fn try_read(buf: &mut ReadBuffer, from: &mut tokio::io::DuplexStream) -> Option<usize> {
        let mut read = Box::pin(buf.read_from(from));
        match poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
            Poll::Ready(result) => Some(result.expect("an in-memory read")),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_first_chunk_goes_to_the_threads_spares_and_is_used_again() {
        let (mut peer, mut from) = tokio::io::duplex(4096);
        let mut buf = ReadBuffer::new();
        peer.write_all(b"select 1").await.unwrap();
        assert_eq!(try_read(&mut buf, &mut from).await, Some(8));
        let first = buf.pending().as_ptr();
        buf.consume(8);
        // Nothing more: the read waits, and gives the allocation back.
        assert_eq!(try_read(&mut buf, &mut from).await, None);
        assert_eq!(buf.bytes.capacity(), 0, "held while waiting");
        // Another buffer on this thread reads into the same allocation.
        let mut other = ReadBuffer::new();
        peer.write_all(b"select 2").await.unwrap();
        assert_eq!(try_read(&mut other, &mut from).await, Some(8));
        assert_eq!(other.pending().as_ptr(), first);
        assert_eq!(other.pending(), b"select 2");
    }

    #[test]
    fn only_empty_unshared_first_chunks_are_kept() {
        // Whether `give` kept it (and `take` hands it out empty again).
        let spare = |b: BytesMut| {
            let before = spares::len();
            spares::give(b);
            let kept = spares::len() == before + 1;
            let again = spares::take();
            assert!(again.is_empty() && again.capacity() == FIRST_CHUNK);
            kept
        };
        assert!(spare(BytesMut::with_capacity(FIRST_CHUNK)));
        assert!(
            !spare(BytesMut::with_capacity(2 * FIRST_CHUNK)),
            "a grown buffer"
        );
        let mut pending = BytesMut::with_capacity(FIRST_CHUNK);
        pending.extend_from_slice(b"x");
        assert!(!spare(pending), "bytes not yet relayed");
        let mut shared = BytesMut::with_capacity(FIRST_CHUNK);
        shared.extend_from_slice(b"abcd");
        let _other = shared.split();
        assert!(!spare(shared), "an allocation another buffer uses");
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_spares() {
        for _ in 0..3 * spares::SPARES {
            spares::give(BytesMut::with_capacity(FIRST_CHUNK));
        }
        assert_eq!(spares::len(), spares::SPARES);
        let _taken: Vec<BytesMut> = (0..spares::SPARES).map(|_| spares::take()).collect();
        assert_eq!(spares::len(), 0);
    }
}

//! Finding message boundaries in a relayed byte stream.
//!
//! After the startup phase every message is `type byte, Int32 length (which
//! counts itself but not the type byte), payload`. The relay reads whatever
//! the socket has, asks [`Framer::next`] what the buffered bytes are, and
//! writes out everything up to the last boundary it reached in one write.
//!
//! Messages the proxy does not need are passed through as byte counts, even
//! when only part of them has arrived: a 100 MB DataRow never sits whole in
//! memory. Messages the caller asks to inspect (a handful of small control
//! messages) are returned whole, as a borrowed slice: nothing is allocated per
//! message.

use thiserror::Error;

/// Type byte plus length word.
pub const HEADER_LEN: usize = 5;

/// Inspected messages larger than this are passed through unread. The
/// messages the proxy reads (ReadyForQuery, ParameterStatus, ErrorResponse)
/// are far smaller; the cap keeps a hostile peer from making us buffer a
/// gigabyte to "inspect" it.
pub const MAX_INSPECTED_LEN: usize = 64 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: u32 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {limit}")]
    TooLarge { tag: char, len: usize, limit: usize },
}

/// What the next bytes of the buffer are.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Pass `len` bytes through unread: all or part of one message. `starts`
    /// is the message's type byte when these bytes begin it.
    Pass { len: usize, starts: Option<u8> },
    /// A whole message the caller asked to inspect. `body` excludes the
    /// 5-byte header; the message occupies `HEADER_LEN + body.len()` bytes.
    Message { tag: u8, body: &'a [u8] },
    /// Nothing more can be decided until more bytes arrive.
    Incomplete,
}

impl Frame<'_> {
    /// How many buffer bytes this frame covers.
    pub fn len(&self) -> usize {
        match self {
            Frame::Pass { len, .. } => *len,
            Frame::Message { body, .. } => HEADER_LEN + body.len(),
            Frame::Incomplete => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Header framer for one direction of a session. Holds only how much of a
/// passed-through message is still to come.
#[derive(Debug)]
pub struct Framer {
    /// Bytes of the current passed-through message not yet seen.
    in_message: usize,
    /// Which type bytes to return whole: bit `tag % 64` of word `tag / 64`
    /// (32 bytes, not a 256-byte table: every session holds two framers).
    inspect: [u64; 4],
    /// Largest message accepted (the peer is cut off beyond it).
    max_len: usize,
    /// Inspected messages larger than this are passed through unread.
    inspect_limit: usize,
}

impl Framer {
    /// A framer that returns the message types in `inspect` whole and passes
    /// everything else through; messages over `max_len` bytes are an error.
    pub fn new(inspect: &[u8], max_len: usize) -> Self {
        let mut table = [0u64; 4];
        for &tag in inspect {
            table[tag as usize / 64] |= 1 << (tag % 64);
        }
        Framer {
            in_message: 0,
            inspect: table,
            max_len,
            inspect_limit: MAX_INSPECTED_LEN,
        }
    }

    fn inspects(&self, tag: u8) -> bool {
        self.inspect[tag as usize / 64] & (1 << (tag % 64)) != 0
    }

    /// Returns inspected messages whole up to `limit` bytes rather than
    /// [`MAX_INSPECTED_LEN`] (a client's Query, whose text the session's
    /// state tracker reads; bounded by the message size limit anyway).
    pub fn inspecting_up_to(mut self, limit: usize) -> Self {
        self.inspect_limit = limit;
        self
    }

    /// True between messages, where the proxy may inject a message of its own.
    pub fn at_boundary(&self) -> bool {
        self.in_message == 0
    }

    /// Classifies the bytes at the start of `buf`.
    pub fn next<'a>(&mut self, buf: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        if self.in_message > 0 {
            let n = self.in_message.min(buf.len());
            self.in_message -= n;
            return Ok(if n == 0 {
                Frame::Incomplete
            } else {
                Frame::Pass {
                    len: n,
                    starts: None,
                }
            });
        }
        let Some((tag, total)) = self.header(buf)? else {
            return Ok(Frame::Incomplete);
        };
        if self.inspects(tag) && total <= self.inspect_limit {
            return Ok(match buf.get(HEADER_LEN..total) {
                Some(body) => Frame::Message { tag, body },
                None => Frame::Incomplete,
            });
        }
        let n = total.min(buf.len());
        self.in_message = total - n;
        Ok(Frame::Pass {
            len: n,
            starts: Some(tag),
        })
    }

    /// Type byte and total size (header included) of the message at the
    /// start of `buf`, once its header has arrived.
    fn header(&self, buf: &[u8]) -> Result<Option<(u8, usize)>, FrameError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len < 4 {
            return Err(FrameError::BadLength {
                tag: tag as char,
                len,
            });
        }
        let total = len as usize + 1;
        if total > self.max_len {
            return Err(FrameError::TooLarge {
                tag: tag as char,
                len: total,
                limit: self.max_len,
            });
        }
        Ok(Some((tag, total)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(len: usize, starts: Option<u8>) -> Frame<'static> {
        Frame::Pass { len, starts }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn passes_uninspected_and_returns_inspected_whole() {
        let mut buf = msg(b'D', b"row");
        buf.extend(msg(b'Z', b"I"));
        let mut f = Framer::new(b"Z", 1 << 30);
        assert_eq!(f.next(&buf).unwrap(), pass(8, Some(b'D')));
        assert_eq!(
            f.next(&buf[8..]).unwrap(),
            Frame::Message {
                tag: b'Z',
                body: b"I"
            }
        );
        assert_eq!(f.next(&buf[14..]).unwrap(), Frame::Incomplete);
    }

    #[test]
    fn large_message_passes_in_pieces() {
        let buf = msg(b'D', &[7u8; 100]);
        let mut f = Framer::new(b"Z", 1 << 30);
        assert_eq!(f.next(&buf[..10]).unwrap(), pass(10, Some(b'D')));
        assert!(!f.at_boundary());
        assert_eq!(f.next(&buf[10..60]).unwrap(), pass(50, None));
        assert_eq!(f.next(&[]).unwrap(), Frame::Incomplete);
        assert_eq!(f.next(&buf[60..]).unwrap(), pass(45, None));
        assert!(f.at_boundary());
    }

    #[test]
    fn inspected_message_waits_for_its_end() {
        let buf = msg(b'Z', b"T");
        let mut f = Framer::new(b"Z", 1 << 30);
        assert_eq!(f.next(&buf[..5]).unwrap(), Frame::Incomplete);
        assert_eq!(f.next(&buf[..3]).unwrap(), Frame::Incomplete);
        assert!(matches!(f.next(&buf).unwrap(), Frame::Message { .. }));
    }

    #[test]
    fn bad_and_oversized_lengths_are_errors() {
        let mut f = Framer::new(b"", 1000);
        assert!(matches!(
            f.next(&[b'Q', 0, 0, 0, 3]),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            f.next(&[b'Q', 0x7f, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn oversized_inspected_message_is_passed_through() {
        let buf = msg(b'E', &vec![b'x'; MAX_INSPECTED_LEN + 10]);
        let mut f = Framer::new(b"E", 1 << 30);
        assert_eq!(f.next(&buf).unwrap(), pass(buf.len(), Some(b'E')));
    }
}

/// Reads one whole message of at most `limit` bytes (header included) into
/// `buf`, returning its type byte and body. Used in the startup and
/// authentication phases, where messages are few and small; `Ok(None)` means
/// the peer closed the connection cleanly between messages.
pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut bytes::BytesMut,
    limit: usize,
) -> Result<Option<(u8, bytes::BytesMut)>, ReadError> {
    let Some((tag, total)) = fill_message(stream, buf, limit).await? else {
        return Ok(None);
    };
    let mut message = buf.split_to(total);
    let _ = message.split_to(HEADER_LEN);
    Ok(Some((tag, message)))
}

/// Reads until `buf` starts with one whole message of at most `limit` bytes;
/// returns its type byte and total size, leaving it in the buffer.
pub async fn fill_message<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut bytes::BytesMut,
    limit: usize,
) -> Result<Option<(u8, usize)>, ReadError> {
    use tokio::io::AsyncReadExt;
    let framer = Framer::new(&[], limit);
    loop {
        if let Some((tag, total)) = framer.header(buf)? {
            if buf.len() >= total {
                return Ok(Some((tag, total)));
            }
            buf.reserve(total - buf.len());
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Truncated)
            };
        }
    }
}

#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

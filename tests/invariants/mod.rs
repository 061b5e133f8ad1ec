//! Invariants of the code that reads untrusted bytes, one function per fuzz
//! target. Each takes arbitrary bytes and panics if an invariant breaks.
//!
//! Shared by the cargo-fuzz targets in `fuzz/` (which include this file by
//! path) and the bounded property tests in `tests/protocol_properties.rs`, so
//! both check exactly the same things.
//!
//! Inputs that drive a reader start with a chunking prefix (see [`split`]):
//! the reader hands the stream out in those chunk sizes and sometimes returns
//! `Pending` first, as a socket would.

#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use pgpivot::config::{FileConfig, ListenerSettings, OnLag};
use pgpivot::protocol::frame::{
    read_message, Frame, FrameError, Framer, ReadError, HEADER_LEN, MAX_INSPECTED_LEN,
};
use pgpivot::protocol::messages::{self, Severity, TxStatus};
use pgpivot::protocol::startup::{
    self, StartupError, StartupPacket, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_LEN,
    SSL_REQUEST_CODE,
};
use pgpivot::routing::{LagBudget, Target};
use pgpivot::session::auth::{AuthState, AuthStep};
use pgpivot::session::error::{AdmitError, AuthError};
use pgpivot::session::params;
use pgpivot::session::state::{Tracker, MAX_STATE_BYTES};

// ---------------------------------------------------------------- harness

/// Splits an input into (chunk sizes, stream): the first byte says how many
/// of the following bytes are chunk sizes (0 to 15).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    let n = (n as usize % 16).min(rest.len());
    rest.split_at(n)
}

/// Chunk `i` of a chunk list: 1 to 128 bytes (the whole rest if the list is
/// empty); a set high bit means "return Pending once first".
fn chunk(sizes: &[u8], i: usize) -> (usize, bool) {
    match sizes {
        [] => (usize::MAX, false),
        _ => {
            let b = sizes[i % sizes.len()];
            ((b & 0x7f) as usize + 1, b & 0x80 != 0)
        }
    }
}

/// An in-memory socket that hands out `data` in the given chunk sizes.
pub struct Chunked<'a> {
    pub data: &'a [u8],
    pub pos: usize,
    sizes: &'a [u8],
    reads: usize,
    stalled: bool,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], sizes: &'a [u8]) -> Self {
        Chunked {
            data,
            pos: 0,
            sizes,
            reads: 0,
            stalled: false,
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (size, stall) = chunk(this.sizes, this.reads);
        if stall && !this.stalled {
            this.stalled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.stalled = false;
        this.reads += 1;
        let n = size.min(buf.remaining()).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future over in-memory readers to completion. Such a future can only
/// pend on a stalled read, which wakes at once: a future still pending after
/// `max_polls` polls is a hang.
pub fn block_on<F: Future>(f: F, max_polls: usize) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..max_polls {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future still pending after {max_polls} polls: a hang");
}

/// Enough polls for any read of `len` bytes: one per byte plus stalls.
fn polls(len: usize) -> usize {
    2 * len + 16
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// An uninteresting listener for the startup-parameter extraction.
fn listener() -> ListenerSettings {
    ListenerSettings {
        address: "127.0.0.1:6432".parse().unwrap(),
        target: Target::ReadWrite,
        budget: LagBudget::default(),
        ceiling: LagBudget {
            max_bytes: Some(1 << 20),
            max_lag: None,
        },
        max_connections: 10,
        on_lag: OnLag::Stay,
    }
}

// ---------------------------------------------------------------- startup

/// `read_packet` over a chunked stream, packet after packet, as the
/// handshake reads them: no panic, exact reads (never past the packet),
/// the 10,000-byte cap, the same answer as `parse_packet` on the body, and
/// every accepted packet re-encodes to exactly its bytes. StartupMessages
/// then go through the `pgpivot.*` parameter extraction, whose result must
/// still be a valid packet with none of our settings left.
pub fn startup(data: &[u8]) {
    let (sizes, stream) = split(data);
    let mut reader = Chunked::new(stream, sizes);
    loop {
        let start = reader.pos;
        let result = block_on(startup::read_packet(&mut reader), polls(stream.len()));
        let consumed = &stream[start..reader.pos];
        let declared = consumed.get(..4).map(be_u32);
        match result {
            Ok(packet) => {
                assert_eq!(declared, Some(consumed.len() as u32), "exact read");
                assert!((8..=MAX_STARTUP_LEN).contains(&consumed.len()));
                let again = startup::parse_packet(Bytes::copy_from_slice(&consumed[4..]));
                assert_eq!(again.as_ref().ok(), Some(&packet));
                check_packet(&packet, consumed);
            }
            Err(StartupError::Closed) => {
                assert_eq!(reader.pos, stream.len(), "closed before the end");
                assert!(declared.is_none_or(|len| len as usize > consumed.len()));
                return;
            }
            Err(StartupError::BadLength(len)) => {
                assert_eq!(consumed.len(), 4, "read past a bad length word");
                assert_eq!(Some(len), declared);
                assert!(!(8..=MAX_STARTUP_LEN as u32).contains(&len));
                return;
            }
            Err(StartupError::Io(e)) => panic!("an in-memory stream does not fail: {e}"),
            Err(e) => {
                assert_eq!(declared, Some(consumed.len() as u32), "exact read");
                let again = startup::parse_packet(Bytes::copy_from_slice(&consumed[4..]));
                assert_eq!(again.err().map(|a| a.to_string()), Some(e.to_string()));
                return;
            }
        }
    }
}

fn check_packet(packet: &StartupPacket, raw: &[u8]) {
    let code = be_u32(&raw[4..]);
    match packet {
        StartupPacket::SslRequest => assert_eq!((raw.len(), code), (8, SSL_REQUEST_CODE)),
        StartupPacket::GssEncRequest => assert_eq!((raw.len(), code), (8, GSSENC_REQUEST_CODE)),
        StartupPacket::Cancel(key) => {
            assert_eq!(code, CANCEL_REQUEST_CODE);
            assert!((4..=256).contains(&key.secret.len()));
            assert_eq!(&key.encode_request()[..], raw);
        }
        StartupPacket::Startup(msg) => {
            assert_eq!(msg.version >> 16, 3);
            assert_eq!(&msg.encode()[..], raw, "forwarded as sent");
            for (k, v) in msg.params() {
                assert!(!k.is_empty() && !k.contains(&0) && !v.contains(&0));
            }
            let mut forwarded = msg.clone();
            match params::extract(&mut forwarded, &listener()) {
                Ok(_) => {
                    let encoded = forwarded.encode();
                    assert!(encoded.len() <= raw.len(), "extraction only removes");
                    let parsed = startup::parse_packet(Bytes::copy_from_slice(&encoded[4..]));
                    assert_eq!(parsed.ok(), Some(StartupPacket::Startup(forwarded.clone())));
                    for (k, _) in forwarded.params() {
                        let k = std::str::from_utf8(k).unwrap_or_default();
                        assert!(!k.starts_with("pgpivot."), "{k} forwarded");
                    }
                }
                Err(e @ AdmitError::BadParameter { .. }) => {
                    let _ = e.to_string();
                }
                Err(e) => panic!("unexpected error from params::extract: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------- framer

/// What a framer run saw, in a form that does not depend on chunking.
#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    /// A passed-through message: its type byte and how many of its bytes
    /// (header included) went by.
    Pass { tag: u8, bytes: usize },
    /// An inspected message, whole.
    Message { tag: u8, body: &'a [u8] },
}

#[derive(Debug, PartialEq, Eq)]
struct Run<'a> {
    events: Vec<Event<'a>>,
    /// How the run ended: `Ok(unconsumed tail length)` or the error.
    end: Result<usize, FrameError>,
    at_boundary: bool,
}

/// Framer settings from the first three input bytes: which of a few tags
/// are inspected, and the message size limit.
fn framer_settings(data: &[u8]) -> Option<(Vec<u8>, usize, &[u8])> {
    let (&[mask, l1, l2], rest) = data.split_first_chunk::<3>()?;
    let tags = *b"ZSEKRDQC";
    let inspect = (0..8).filter(|i| mask & (1 << i) != 0).map(|i| tags[i]);
    let max_len = if l1 & 0x80 != 0 {
        usize::MAX
    } else {
        u16::from_be_bytes([l1, l2]) as usize
    };
    Some((inspect.collect(), max_len, rest))
}

/// The framer: arbitrary bytes cut into arbitrary chunks give the same
/// frames (tags, inspected bodies, boundaries, error) as one independent
/// reference parse of the whole input, and as the framer on the whole input;
/// nothing past the size limit is accepted.
pub fn framer(data: &[u8]) {
    let Some((inspect, max_len, rest)) = framer_settings(data) else {
        return;
    };
    let (sizes, stream) = split(rest);
    let reference = reference_parse(stream, &inspect, max_len);
    let whole = framer_run(stream, &[], &inspect, max_len);
    assert_eq!(whole, reference, "framer on the whole input");
    let chunked = framer_run(stream, sizes, &inspect, max_len);
    assert_eq!(chunked, reference, "framer on chunks {sizes:?}");
}

/// An independent parse of a whole input.
fn reference_parse<'a>(stream: &'a [u8], inspect: &[u8], max_len: usize) -> Run<'a> {
    let mut events = Vec::new();
    let mut pos = 0;
    let end = loop {
        let Some(header) = stream.get(pos..pos + HEADER_LEN) else {
            break Ok(stream.len() - pos);
        };
        let (tag, len) = (header[0], be_u32(&header[1..]));
        if len < 4 {
            break Err(FrameError::BadLength {
                tag: tag as char,
                len,
            });
        }
        let total = len as usize + 1;
        if total > max_len {
            break Err(FrameError::TooLarge {
                tag: tag as char,
                len: total,
                limit: max_len,
            });
        }
        if inspect.contains(&tag) && total <= MAX_INSPECTED_LEN {
            match stream.get(pos + HEADER_LEN..pos + total) {
                Some(body) => events.push(Event::Message { tag, body }),
                None => break Ok(stream.len() - pos),
            }
        } else {
            let bytes = total.min(stream.len() - pos);
            events.push(Event::Pass { tag, bytes });
            if bytes < total {
                return Run {
                    events,
                    end: Ok(0),
                    at_boundary: false,
                };
            }
        }
        pos += total;
    };
    Run {
        events,
        end,
        at_boundary: true,
    }
}

/// Feeds `stream` to a framer chunk by chunk, as the relay does: append what
/// the socket gave, take frames until `Incomplete`, drop what was taken.
fn framer_run<'a>(stream: &'a [u8], sizes: &[u8], inspect: &[u8], max_len: usize) -> Run<'a> {
    let mut framer = Framer::new(inspect, max_len);
    let mut events: Vec<Event<'a>> = Vec::new();
    // The buffer is a window stream[start..fed] of the input, so that
    // inspected bodies can be compared as slices of the input.
    let (mut start, mut fed, mut i) = (0, 0, 0);
    loop {
        let buf = &stream[start..fed];
        let mut pos = 0;
        loop {
            let frame = match framer.next(&buf[pos..]) {
                Ok(Frame::Incomplete) => break,
                Ok(frame) => frame,
                Err(e) => {
                    return Run {
                        events,
                        end: Err(e),
                        at_boundary: framer.at_boundary(),
                    }
                }
            };
            assert!(!frame.is_empty() && frame.len() <= buf.len() - pos);
            match frame {
                Frame::Pass {
                    len,
                    starts: Some(tag),
                } => {
                    let total = be_u32(&buf[pos + 1..pos + HEADER_LEN]) as usize + 1;
                    assert!(!inspect.contains(&tag) || total > MAX_INSPECTED_LEN);
                    events.push(Event::Pass { tag, bytes: len });
                }
                Frame::Pass { len, starts: None } => match events.last_mut() {
                    Some(Event::Pass { bytes, .. }) => *bytes += len,
                    other => panic!("continuation after {other:?}"),
                },
                Frame::Message { tag, body } => {
                    assert!(inspect.contains(&tag));
                    let at = start + pos + HEADER_LEN;
                    assert_eq!(body, &stream[at..at + body.len()]);
                    events.push(Event::Message {
                        tag,
                        body: &stream[at..at + body.len()],
                    });
                }
                Frame::Incomplete => unreachable!(),
            }
            pos += frame.len();
        }
        start += pos;
        if fed == stream.len() {
            break;
        }
        let (size, _) = chunk(sizes, i);
        i += 1;
        fed += size.min(stream.len() - fed);
    }
    let at_boundary = framer.at_boundary();
    Run {
        events,
        end: Ok(stream.len() - start),
        at_boundary,
    }
}

// ---------------------------------------------------------------- auth

/// The authentication stage fed arbitrary backend bytes: `read_message`
/// over a chunked stream and [`AuthState::on_backend_message`] on each
/// message, until the stage would stop. No panic, only the stage's own
/// errors, and the client gets well-formed messages: each one unchanged,
/// except SASL without `-PLUS` and BackendKeyData with the real pid.
pub fn auth(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (sizes, stream) = split(rest);
    let mut reader = Chunked::new(stream, sizes);
    let mut buf = BytesMut::new();
    let mut state = AuthState::new(flags & 1 != 0);
    let mut out = BytesMut::new();
    const LIMIT: usize = 64 * 1024;
    loop {
        let read = block_on(
            read_message(&mut reader, &mut buf, LIMIT),
            polls(stream.len()),
        );
        let (t, body) = match read {
            Ok(Some(m)) => m,
            Ok(None) => {
                assert!(buf.is_empty() && reader.pos == stream.len());
                return;
            }
            Err(ReadError::Truncated) => {
                assert_eq!(reader.pos, stream.len());
                return;
            }
            Err(ReadError::Frame(e)) => {
                let _ = e.to_string();
                return;
            }
            Err(ReadError::Io(e)) => panic!("an in-memory stream does not fail: {e}"),
        };
        assert!(body.len() + HEADER_LEN <= LIMIT);
        let before = out.len();
        let was_standby = state.in_hot_standby;
        let step = match state.on_backend_message(t, &body, &mut out) {
            Ok(step) => step,
            Err(e @ AuthError::BackendProtocol(_)) => {
                let _ = e.to_string();
                return;
            }
            Err(e) => panic!("unexpected auth error {e}"),
        };
        let added = &out[before..];
        match step {
            AuthStep::Forwarded | AuthStep::AwaitClient => {
                assert_eq!(
                    messages::auth_expects_reply(messages::auth_code(&body).unwrap_or(0))
                        && t == b'R',
                    step == AuthStep::AwaitClient
                );
                if t == b'R' && messages::auth_code(&body) == Some(10) {
                    check_sasl_rewrite(&body, added);
                } else {
                    assert_eq!(added, &whole_message(t, &body)[..], "forwarded unchanged");
                }
            }
            AuthStep::BackendKey { pid, secret } => {
                assert_eq!(t, b'K');
                assert!(added.is_empty());
                // The registry issues a secret of the same length.
                messages::put_backend_key(&mut out, pid, secret);
                assert_eq!(&out[before..], &whole_message(t, &body)[..]);
            }
            AuthStep::Rejected => {
                assert_eq!(t, b'E');
                assert_eq!(added, &whole_message(t, &body)[..]);
                return;
            }
            AuthStep::NotPrimary => {
                assert!(t == b'Z' && state.needs_primary && was_standby && added.is_empty());
                return;
            }
            AuthStep::Ready(status) => {
                assert_eq!(TxStatus::from_ready_for_query(&body), Some(status));
                assert_eq!(added, &whole_message(t, &body)[..]);
                return;
            }
        }
        if t == b'S' {
            if let Some((b"in_hot_standby", value)) = messages::parameter_status(&body) {
                assert_eq!(state.in_hot_standby, value == b"on");
            }
        } else {
            assert_eq!(state.in_hot_standby, was_standby);
        }
    }
}

fn whole_message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// `out` is one AuthenticationSASL message listing the input's mechanisms
/// without the `-PLUS` ones, in order.
fn check_sasl_rewrite(body: &[u8], out: &[u8]) {
    assert_eq!(out[0], b'R');
    assert_eq!(be_u32(&out[1..]) as usize, out.len() - 1);
    assert_eq!(be_u32(&out[5..]), 10);
    let list = &out[9..];
    assert_eq!(list.last(), Some(&0), "terminated list");
    let kept: Vec<&[u8]> = list[..list.len() - 1]
        .split_inclusive(|&b| b == 0)
        .map(|m| &m[..m.len() - 1])
        .collect();
    let offered: Vec<String> = body[4..]
        .split_inclusive(|&b| b == 0)
        .take_while(|m| m.len() > 1 && m.ends_with(&[0]))
        .map(|m| String::from_utf8_lossy(&m[..m.len() - 1]).into_owned())
        .filter(|m| !m.ends_with("-PLUS"))
        .collect();
    let kept: Vec<String> = kept
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert_eq!(kept, offered);
}

// ---------------------------------------------------------------- messages

/// The readers of message bodies agree with independent reference parses
/// on arbitrary bodies, never panic, and the messages the proxy writes are
/// well formed.
pub fn messages(body: &[u8]) {
    assert_eq!(messages::sqlstate(body), reference_sqlstate(body));
    if let Some((name, value)) = messages::parameter_status(body) {
        assert!(!name.contains(&0) && !value.contains(&0));
        let prefix = [name, &[0], value, &[0]].concat();
        assert!(body.starts_with(&prefix));
    } else {
        assert!(body.iter().filter(|&&b| b == 0).count() < 2);
    }
    assert_eq!(
        messages::auth_code(body),
        body.get(..4).map(be_u32),
        "auth code"
    );
    let key = messages::backend_key(body);
    assert_eq!(key.is_some(), (8..=260).contains(&body.len()));
    if let Some((pid, secret)) = key {
        assert_eq!(pid as u32, be_u32(body));
        let mut out = BytesMut::new();
        messages::put_backend_key(&mut out, pid, secret);
        assert_eq!(&out[..], &whole_message(b'K', body)[..]);
    }
    let status = TxStatus::from_ready_for_query(body);
    assert_eq!(status.is_some(), matches!(body, b"I" | b"T" | b"E"));

    let mut out = BytesMut::new();
    if messages::sasl_without_channel_binding(body, &mut out) {
        assert_eq!(messages::auth_code(body), Some(10));
        check_sasl_rewrite(body, &out);
    }

    // The proxy's own ErrorResponse, with a code and text taken from the
    // input (texts from errors never hold NUL; codes are our constants).
    let (code, text) = body.split_at(body.len().min(5));
    let code: String = String::from_utf8_lossy(code).replace('\0', "");
    let text = String::from_utf8_lossy(text).replace('\0', "");
    let severity = if text.len().is_multiple_of(2) {
        Severity::Error
    } else {
        Severity::Fatal
    };
    let e = messages::error_bytes(severity, &code, &text);
    assert_eq!(e[0], b'E');
    assert_eq!(be_u32(&e[1..]) as usize, e.len() - 1);
    let fields = &e[HEADER_LEN..];
    assert_eq!(fields.last(), Some(&0));
    assert!(
        fields[..fields.len() - 1]
            .split_inclusive(|&b| b == 0)
            .all(|f| f.len() >= 2 && f.ends_with(&[0])),
        "well-formed fields"
    );
    assert_eq!(messages::sqlstate(fields), Some(code.as_bytes()));
    assert!(e.len() < 4 * 1000 + 128, "message text is capped");

    tracked_messages(body);
}

/// A client Parse decodes only when whole, and re-encodes to the same bytes;
/// the session-state tracker takes any text as Query, Parse and the
/// server's answers without a panic, and keeps within its bound.
fn tracked_messages(body: &[u8]) {
    if let Some(parse) = messages::parse(body) {
        let types: Vec<u32> = parse.types().collect();
        let mut out = BytesMut::new();
        messages::put_parse(&mut out, parse.name, parse.query, &types);
        let len = HEADER_LEN + parse.name.len() + parse.query.len() + 4 + 4 * types.len();
        assert_eq!(
            &out[HEADER_LEN..],
            &body[..len - HEADER_LEN],
            "Parse round trip"
        );
    }
    // Texts as sent, not UTF-8 ones too (the tracker takes those as
    // unread), and then the same bytes made UTF-8.
    let mut tracker = Tracker::default();
    for (i, sql) in body.split(|&b| b == b'\n').enumerate() {
        match i % 2 {
            0 => tracker.client_query(sql),
            _ => tracker.client_parse("", sql, &[]),
        }
        tracker.server_ready(TxStatus::Idle);
    }
    let text = String::from_utf8_lossy(body);
    for (i, sql) in text.split('\n').enumerate() {
        match i % 4 {
            0 => tracker.client_query(sql.as_bytes()),
            1 => tracker.client_parse(if i % 8 == 1 { "" } else { "s1" }, sql.as_bytes(), &[23]),
            2 => tracker.client_sync(),
            _ => tracker.client_close_statement(sql),
        }
        for tag in ["SET", "COMMIT", "ROLLBACK", "BEGIN", sql] {
            tracker.server_command_complete(tag);
        }
        if i % 3 == 0 {
            tracker.server_error();
        }
        tracker.server_ready(if i % 2 == 0 {
            TxStatus::Idle
        } else {
            TxStatus::InTransaction
        });
        let _ = tracker.replay();
        assert!(
            tracker.state_bytes() <= MAX_STATE_BYTES + body.len() || tracker.pinned().is_some(),
            "tracked state over the bound without a pin"
        );
    }
}

/// Fields are `type byte, text, NUL`, the list ends with a NUL.
fn reference_sqlstate(body: &[u8]) -> Option<&[u8]> {
    for field in body.split_inclusive(|&b| b == 0) {
        if field == [0] || !field.ends_with(&[0]) {
            return None;
        }
        if field[0] == b'C' {
            return Some(&field[1..field.len() - 1]);
        }
    }
    None
}

// ---------------------------------------------------------------- config

/// Arbitrary TOML text → `FileConfig` → `validate()`: never a panic, every
/// failure an `Err`; an accepted config prints (`--check-config`) as TOML
/// that parses again. TLS file paths are pointed into a directory that does
/// not exist: the loader must not read arbitrary files (`/dev/zero`) here.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut file = match FileConfig::from_toml(text) {
        Ok(file) => file,
        Err(e) => {
            assert!(!e.key.is_empty());
            let _ = e.to_string();
            return;
        }
    };
    // Files named in the config are read at validation; point them where
    // nothing exists, so an input naming /dev/zero cannot read forever.
    let nowhere = |p: &std::path::Path| std::path::Path::new("/nonexistent-pgpivot-fuzz").join(p);
    if let Some(tls) = file.tls.as_mut() {
        tls.cert = nowhere(&tls.cert);
        tls.key = nowhere(&tls.key);
    }
    if let Some(root) = file.backend_tls.sslrootcert.as_mut() {
        *root = nowhere(root);
    }
    for node in &mut file.nodes {
        if let Some(root) = node.sslrootcert.as_mut() {
            *root = nowhere(root);
        }
    }
    match file.validate() {
        Ok(settings) => {
            assert!(!settings.listeners.is_empty() && !settings.nodes.is_empty());
            assert!(settings.tls.is_none(), "read a TLS file that cannot exist");
        }
        Err(e) => {
            assert!(!e.key.is_empty());
            let _ = e.to_string();
        }
    }
    let shown = file.to_toml_masked();
    if !shown.starts_with("# cannot print") {
        if let Err(e) = FileConfig::from_toml(&shown) {
            panic!("printed config does not parse again: {e}\n{shown}");
        }
    }
}

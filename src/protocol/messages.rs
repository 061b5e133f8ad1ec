//! The messages the proxy reads or writes itself.
//!
//! Reading works on borrowed message bodies handed out by the
//! [`Framer`](super::frame::Framer), without allocating. Writing uses pgwire's
//! message types, so the proxy's own messages are encoded exactly as a server
//! would encode them.

use bytes::{BufMut, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{Authentication, BackendKeyData, SecretKey};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};

/// Backend message types the proxy reads.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const NOTICE_RESPONSE: u8 = b'N';
    // Frontend message types the proxy reads.
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const PARSE: u8 = b'P';
    pub const CLOSE: u8 = b'C';
    pub const FLUSH: u8 = b'H';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
}

/// Transaction status from ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// Not in a transaction block: a point where a session may be ended or
    /// moved cleanly.
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    /// Decodes a ReadyForQuery body.
    pub fn from_ready_for_query(body: &[u8]) -> Option<TxStatus> {
        match body {
            b"I" => Some(TxStatus::Idle),
            b"T" => Some(TxStatus::InTransaction),
            b"E" => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

/// Severity of a message the proxy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Longest message text the proxy puts in its own errors (they may quote
/// client input, such as a bad parameter value).
const MAX_MESSAGE_CHARS: usize = 1000;

/// The NUL-terminated UTF-8 string at the start of `body` (a Query's text,
/// a statement name, a CommandComplete tag).
pub fn c_str(body: &[u8]) -> Option<&str> {
    std::str::from_utf8(c_bytes(body)?).ok()
}

/// The bytes before the first NUL of `body`, not checked to be UTF-8: for
/// statement texts, which the tracker checks only when it has not seen the
/// same text lately (they are read on every message of every session).
pub fn c_bytes(body: &[u8]) -> Option<&[u8]> {
    let end = memchr::memchr(0, body)?;
    Some(&body[..end])
}

/// A client Parse message, borrowed from its body.
#[derive(Debug)]
pub struct ParseMessage<'a> {
    pub name: &'a str,
    /// The statement text, not checked to be UTF-8 (see [`c_bytes`]).
    pub query: &'a [u8],
    types: &'a [u8],
}

impl ParseMessage<'_> {
    /// The parameter type OIDs (0: unspecified).
    pub fn types(&self) -> impl Iterator<Item = u32> + '_ {
        self.types
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// Decodes a Parse body: name, query, Int16 count, count × Int32 OIDs.
pub fn parse(body: &[u8]) -> Option<ParseMessage<'_>> {
    let name = c_str(body)?;
    let rest = &body[name.len() + 1..];
    let query = c_bytes(rest)?;
    let rest = &rest[query.len() + 1..];
    let count = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let types = rest.get(2..2 + 4 * count)?;
    Some(ParseMessage { name, query, types })
}

/// Appends a Parse message (the move stage re-creates prepared statements).
pub fn put_parse(buf: &mut BytesMut, name: &str, query: &[u8], types: &[u32]) {
    let len = 4 + name.len() + 1 + query.len() + 1 + 2 + 4 * types.len();
    buf.put_u8(b'P');
    buf.put_u32(len as u32);
    buf.put_slice(name.as_bytes());
    buf.put_u8(0);
    buf.put_slice(query);
    buf.put_u8(0);
    buf.put_u16(types.len() as u16);
    types.iter().for_each(|&t| buf.put_u32(t));
}

/// Appends a simple Query message.
pub fn put_query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(b'Q');
    buf.put_u32((4 + sql.len() + 1) as u32);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
}

/// Appends a Sync message.
pub fn put_sync(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'S', 0, 0, 0, 4]);
}

/// Appends a ReadyForQuery with `status`.
pub fn put_ready(buf: &mut BytesMut, status: TxStatus) {
    let code = match status {
        TxStatus::Idle => b'I',
        TxStatus::InTransaction => b'T',
        TxStatus::Failed => b'E',
    };
    buf.extend_from_slice(&[b'Z', 0, 0, 0, 5, code]);
}

/// Appends an ErrorResponse the proxy itself sends.
pub fn put_error(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let message: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
    let mut info = ErrorInfo::new(severity.as_str().into(), code.into(), message);
    info.severity_nonlocalized = Some(severity.as_str().into());
    ErrorResponse::from(info)
        .encode(buf)
        .expect("an error response within pgwire's size limits");
}

/// An ErrorResponse as bytes, for the common "say why, then close" case.
pub fn error_bytes(severity: Severity, code: &str, message: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(64 + message.len());
    put_error(&mut buf, severity, code, message);
    buf
}

/// The SQLSTATE (`C` field) of an ErrorResponse or NoticeResponse body.
pub fn sqlstate(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == b'C' {
            return Some(&tail[..end]);
        }
        rest = &tail[end + 1..];
    }
    None
}

/// Name and value of a ParameterStatus body.
pub fn parameter_status(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = body.iter().position(|&b| b == 0)?;
    let (name, rest) = (&body[..nul], &body[nul + 1..]);
    let end = rest.iter().position(|&b| b == 0)?;
    Some((name, &rest[..end]))
}

/// The request code of an Authentication message body.
pub fn auth_code(body: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(body.get(..4)?.try_into().ok()?))
}

/// Authentication codes after which the client answers with a message.
pub fn auth_expects_reply(code: u32) -> bool {
    // 3 cleartext, 5 md5, 7 GSS, 8 GSS continue, 9 SSPI, 10 SASL, 11 SASL continue
    matches!(code, 3 | 5 | 7..=11)
}

/// Re-encodes an AuthenticationSASL message without the `-PLUS`
/// (channel-binding) mechanisms: a client's TLS session ends at the proxy, so
/// it cannot bind to the backend's. False (nothing written) for a body that
/// is not a well-formed AuthenticationSASL.
pub fn sasl_without_channel_binding(body: &[u8], out: &mut BytesMut) -> bool {
    // pgwire decodes other codes too, and panics on a body too short for
    // them (the code word, an MD5 salt): only hand it SASL.
    if auth_code(body) != Some(10) {
        return false;
    }
    let mut message = BytesMut::with_capacity(body.len() + 5);
    message.put_u8(tag::AUTHENTICATION);
    message.put_u32(body.len() as u32 + 4);
    message.put_slice(body);
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    let Ok(Some(Authentication::SASL(mechanisms))) = Authentication::decode(&mut message, &ctx)
    else {
        return false;
    };
    let kept = mechanisms
        .into_iter()
        .filter(|m| !m.ends_with("-PLUS"))
        .collect();
    Authentication::SASL(kept).encode(out).is_ok()
}

/// A BackendKeyData body: the backend's pid and secret key.
pub fn backend_key(body: &[u8]) -> Option<(i32, &[u8])> {
    let pid = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let secret = &body[4..];
    (4..=256).contains(&secret.len()).then_some((pid, secret))
}

/// Appends a BackendKeyData with the real pid and the proxy's secret.
pub fn put_backend_key(buf: &mut BytesMut, pid: i32, secret: &[u8]) {
    let key = if secret.len() == 4 {
        SecretKey::I32(i32::from_be_bytes(secret.try_into().expect("4 bytes")))
    } else {
        SecretKey::Bytes(bytes::Bytes::copy_from_slice(secret))
    };
    BackendKeyData::new(pid, key)
        .encode(buf)
        .expect("a valid key length");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_carries_sqlstate() {
        let buf = error_bytes(Severity::Fatal, "57P03", "no primary");
        assert_eq!(buf[0], b'E');
        assert_eq!(sqlstate(&buf[5..]), Some(&b"57P03"[..]));
    }

    #[test]
    fn strips_channel_binding_mechanisms() {
        let mut body = 10u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let mut out = BytesMut::new();
        assert!(sasl_without_channel_binding(&body, &mut out));
        assert_eq!(&out[9..], b"SCRAM-SHA-256\0\0");
    }

    #[test]
    fn sasl_rewrite_refuses_other_and_short_bodies() {
        // Found by fuzzing: these reached a panic inside pgwire's decoder.
        let mut out = BytesMut::new();
        for body in [&b""[..], &[0, 0], &[0, 0, 0, 5, 1], &[0, 0, 0, 12]] {
            assert!(!sasl_without_channel_binding(body, &mut out), "{body:?}");
        }
        assert!(out.is_empty());
    }

    #[test]
    fn reads_nul_terminated_strings_and_parse_bodies() {
        assert_eq!(c_bytes(b"\0rest"), Some(&b""[..]));
        assert_eq!(c_bytes(b"select 1\0\0\0"), Some(&b"select 1"[..]));
        assert_eq!(c_bytes(b"no end"), None);
        assert_eq!(c_bytes(b""), None);
        // Not UTF-8: bytes as sent, but no string.
        assert_eq!(c_bytes(b"\xff\0"), Some(&b"\xff"[..]));
        assert_eq!(c_str(b"\xff\0"), None);
        let mut buf = BytesMut::new();
        put_parse(&mut buf, "s1", b"select $1", &[23]);
        let parse = super::parse(&buf[5..]).expect("a Parse");
        assert_eq!((parse.name, parse.query), ("s1", &b"select $1"[..]));
        assert_eq!(parse.types().collect::<Vec<_>>(), [23]);
        assert!(super::parse(&buf[5..buf.len() - 1]).is_none(), "cut short");
    }

    #[test]
    fn reads_parameter_status_and_backend_key() {
        assert_eq!(
            parameter_status(b"in_hot_standby\0off\0"),
            Some((&b"in_hot_standby"[..], &b"off"[..]))
        );
        assert_eq!(
            backend_key(&[0, 0, 1, 0, 9, 9, 9, 9]),
            Some((256, &[9u8, 9, 9, 9][..]))
        );
        let mut buf = BytesMut::new();
        put_backend_key(&mut buf, 256, &[1, 2, 3, 4]);
        assert_eq!(&buf[..], &[b'K', 0, 0, 0, 12, 0, 0, 1, 0, 1, 2, 3, 4]);
    }
}

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
    // Frontend message types the proxy reads.
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
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

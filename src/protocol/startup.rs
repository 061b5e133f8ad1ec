//! Startup-phase packets: the untyped `Int32 length, Int32 code, body`
//! packets a client sends before its session starts.
//!
//! Packets are read with exact reads, never past their end. That matters for
//! TLS: after the proxy answers `S` to an SSLRequest, any byte the client sent
//! early is still in the socket and goes to the TLS handshake, which rejects
//! it, instead of sitting in a proxy buffer to be mistaken for encrypted data
//! (CVE-2021-23214, "buffer stuffing").

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// PostgreSQL's own cap on a startup packet.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Length word plus code.
const MIN_STARTUP_LEN: usize = 8;

pub const SSL_REQUEST_CODE: u32 = 80877103;
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
pub const CANCEL_REQUEST_CODE: u32 = 80877102;
/// Protocol 3.0; minor versions above 0 (3.2 from PostgreSQL 18) are
/// forwarded for the backend to negotiate.
pub const PROTOCOL_MAJOR_3: u32 = 3;

/// The first byte of a TLS ClientHello: PostgreSQL 17 clients may open with
/// TLS directly (`sslnegotiation=direct`) instead of an SSLRequest.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

#[derive(Debug, Error)]
pub enum StartupError {
    #[error("client closed the connection during startup")]
    Closed,
    #[error("i/o error during startup: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid startup packet length {0}")]
    BadLength(u32),
    #[error("unsupported startup code {0} (protocol {maj}.{min})", maj = .0 >> 16, min = .0 & 0xffff)]
    UnsupportedCode(u32),
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
}

/// A startup-phase packet.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// The key a CancelRequest carries: a backend process id and a secret of 4
/// bytes (protocol 3.0) or up to 256 (3.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: Bytes,
}

impl CancelKey {
    /// The CancelRequest packet for this key.
    pub fn encode_request(&self) -> BytesMut {
        let mut buf = BytesMut::with_capacity(12 + self.secret.len());
        buf.put_u32(12 + self.secret.len() as u32);
        buf.put_u32(CANCEL_REQUEST_CODE);
        buf.put_i32(self.pid);
        buf.put_slice(&self.secret);
        buf
    }
}

/// A StartupMessage: the protocol version and the parameters in the order the
/// client sent them, as raw bytes, so what is forwarded is what was sent.
///
/// The parameters are kept as they arrived, `name\0value\0` pairs in one
/// allocation (checked when parsed): a session holds its startup packet
/// for its whole life (a move logs in again with it), and a list of pairs
/// would cost an allocation per pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: u32,
    /// `name\0value\0` pairs, without the list's final terminator.
    pairs: Box<[u8]>,
}

impl StartupMessage {
    /// A message of protocol `version` with no parameters yet.
    pub fn new(version: u32) -> StartupMessage {
        StartupMessage {
            version,
            pairs: Box::default(),
        }
    }

    /// The parameters, names and values as raw bytes, in the client's order.
    pub fn params(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut fields = self.pairs.split(|&b| b == 0);
        // `pairs` ends with a NUL, so `split` yields one empty piece last.
        std::iter::from_fn(move || Some((fields.next()?, fields.next()?)))
    }

    /// The value of parameter `name`, if present and valid UTF-8.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params()
            .find(|(k, _)| *k == name.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Replaces (or with `None` removes) parameter `name`, keeping the
    /// others' order; a new one goes last.
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        let name = name.as_bytes();
        let mut pairs = Vec::with_capacity(self.pairs.len() + name.len() + 2);
        let mut put = |k: &[u8], v: &[u8]| {
            pairs.extend_from_slice(k);
            pairs.push(0);
            pairs.extend_from_slice(v);
            pairs.push(0);
        };
        // Only the first of a repeated name is replaced or removed.
        let mut found = false;
        for (k, v) in self.params() {
            if k == name && !found {
                found = true;
                if let Some(value) = value {
                    put(k, value.as_bytes());
                }
            } else {
                put(k, v);
            }
        }
        if let (false, Some(value)) = (found, value) {
            put(name, value.as_bytes());
        }
        self.pairs = pairs.into_boxed_slice();
    }

    /// The packet to send to the backend.
    pub fn encode(&self) -> BytesMut {
        let len = 9 + self.pairs.len();
        let mut buf = BytesMut::with_capacity(len);
        buf.put_u32(len as u32);
        buf.put_u32(self.version);
        buf.put_slice(&self.pairs);
        buf.put_u8(0);
        buf
    }
}

/// Reads one startup-phase packet. The caller bounds the wait with a timeout.
pub async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<StartupPacket, StartupError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(closed_or_io)?;
    let len = u32::from_be_bytes(len);
    if !(MIN_STARTUP_LEN..=MAX_STARTUP_LEN).contains(&(len as usize)) {
        return Err(StartupError::BadLength(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await.map_err(closed_or_io)?;
    parse_packet(Bytes::from(body))
}

fn closed_or_io(e: std::io::Error) -> StartupError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StartupError::Closed
    } else {
        StartupError::Io(e)
    }
}

/// Parses a packet body (everything after the length word).
pub fn parse_packet(body: Bytes) -> Result<StartupPacket, StartupError> {
    let Some(code) = body.get(..4) else {
        return Err(StartupError::Malformed("no startup code"));
    };
    let code = u32::from_be_bytes([code[0], code[1], code[2], code[3]]);
    let rest = body.slice(4..);
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            Err(StartupError::Malformed("encryption request with a body"))
        }
        CANCEL_REQUEST_CODE => parse_cancel(rest).map(StartupPacket::Cancel),
        c if c >> 16 == PROTOCOL_MAJOR_3 => Ok(StartupPacket::Startup(StartupMessage {
            version: c,
            pairs: check_params(&rest)?.into(),
        })),
        c => Err(StartupError::UnsupportedCode(c)),
    }
}

fn parse_cancel(rest: Bytes) -> Result<CancelKey, StartupError> {
    // pid (4) and a secret of 4..=256 bytes
    if !(8..=260).contains(&rest.len()) {
        return Err(StartupError::Malformed("cancel request of the wrong size"));
    }
    Ok(CancelKey {
        pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
        secret: rest.slice(4..),
    })
}

/// Checks `name\0value\0 ... \0` and returns the pairs without the final
/// terminator.
fn check_params(rest: &[u8]) -> Result<&[u8], StartupError> {
    let mut at = 0;
    loop {
        let name = cstring_len(&rest[at..])?;
        if name == 0 {
            break;
        }
        at += name + 1;
        at += cstring_len(&rest[at..])? + 1;
    }
    if at + 1 != rest.len() {
        return Err(StartupError::Malformed("bytes after the parameter list"));
    }
    Ok(&rest[..at])
}

/// The length of the NUL-terminated string `buf` starts with.
fn cstring_len(buf: &[u8]) -> Result<usize, StartupError> {
    buf.iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed("unterminated parameter"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    async fn read(bytes: Vec<u8>) -> Result<StartupPacket, StartupError> {
        read_packet(&mut bytes.as_slice()).await
    }

    #[tokio::test]
    async fn startup_round_trips_parameters_in_order() {
        let raw = packet(196608, b"user\0bob\0database\0db\0options\0-c x=1\0\0");
        let StartupPacket::Startup(msg) = read(raw.clone()).await.unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(msg.param("user"), Some("bob"));
        assert_eq!(msg.param("options"), Some("-c x=1"));
        assert_eq!(&msg.encode()[..], &raw[..]);
    }

    #[test]
    fn set_param_replaces_in_place_removes_and_appends() {
        let mut msg = StartupMessage::new(196608);
        msg.set_param("user", Some("bob"));
        msg.set_param("database", Some("db"));
        msg.set_param("options", Some("-c x=1"));
        msg.set_param("user", Some("alice"));
        let names: Vec<&[u8]> = msg.params().map(|(k, _)| k).collect();
        assert_eq!(names, [&b"user"[..], b"database", b"options"]);
        assert_eq!(msg.param("user"), Some("alice"));
        msg.set_param("database", None);
        msg.set_param("missing", None);
        assert_eq!(msg.param("database"), None);
        msg.set_param("application_name", Some(""));
        assert_eq!(
            &msg.encode()[8..],
            b"user\0alice\0options\0-c x=1\0application_name\0\0\0"
        );
        let again = parse_packet(msg.encode().freeze().slice(4..)).unwrap();
        assert_eq!(again, StartupPacket::Startup(msg));
    }

    #[tokio::test]
    async fn recognises_encryption_and_cancel_requests() {
        assert_eq!(
            read(packet(SSL_REQUEST_CODE, b"")).await.unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            read(packet(GSSENC_REQUEST_CODE, b"")).await.unwrap(),
            StartupPacket::GssEncRequest
        );
        let cancel = read(packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4]))
            .await
            .unwrap();
        let key = CancelKey {
            pid: 7,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        };
        assert_eq!(cancel, StartupPacket::Cancel(key.clone()));
        assert_eq!(
            &key.encode_request()[..],
            &packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4])[..]
        );
    }

    #[tokio::test]
    async fn rejects_bad_packets() {
        let huge = 2_000_000_000u32.to_be_bytes().to_vec();
        assert!(matches!(read(huge).await, Err(StartupError::BadLength(_))));
        assert!(matches!(
            read(vec![0, 0, 0, 4]).await,
            Err(StartupError::BadLength(4))
        ));
        assert!(matches!(
            read(packet(1234, b"")).await,
            Err(StartupError::UnsupportedCode(1234))
        ));
        assert!(matches!(
            read(packet(196608, b"user\0bob")).await,
            Err(StartupError::Malformed(_))
        ));
        let mut truncated = packet(196608, b"user\0bob\0\0");
        truncated.truncate(10);
        assert!(matches!(read(truncated).await, Err(StartupError::Closed)));
    }
}

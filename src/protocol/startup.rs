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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: u32,
    pub params: Vec<(Bytes, Bytes)>,
}

impl StartupMessage {
    /// The value of parameter `name`, if present and valid UTF-8.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.as_ref() == name.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Replaces (or with `None` removes) parameter `name`.
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        let pos = self
            .params
            .iter()
            .position(|(k, _)| k.as_ref() == name.as_bytes());
        match (pos, value) {
            (Some(i), Some(v)) => self.params[i].1 = Bytes::copy_from_slice(v.as_bytes()),
            (Some(i), None) => {
                self.params.remove(i);
            }
            (None, Some(v)) => self.params.push((
                Bytes::copy_from_slice(name.as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )),
            (None, None) => {}
        }
    }

    /// The packet to send to the backend.
    pub fn encode(&self) -> BytesMut {
        let body: usize = self.params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut buf = BytesMut::with_capacity(9 + body);
        buf.put_u32((9 + body) as u32);
        buf.put_u32(self.version);
        for (k, v) in &self.params {
            buf.put_slice(k);
            buf.put_u8(0);
            buf.put_slice(v);
            buf.put_u8(0);
        }
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
            params: parse_params(rest)?,
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

/// `name\0value\0 ... \0`
fn parse_params(mut rest: Bytes) -> Result<Vec<(Bytes, Bytes)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstring(&mut rest)?;
        if name.is_empty() {
            break;
        }
        let value = take_cstring(&mut rest)?;
        params.push((name, value));
    }
    if !rest.is_empty() {
        return Err(StartupError::Malformed("bytes after the parameter list"));
    }
    Ok(params)
}

fn take_cstring(buf: &mut Bytes) -> Result<Bytes, StartupError> {
    let nul = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed("unterminated parameter"))?;
    let s = buf.split_to(nul);
    let _ = buf.split_to(1);
    Ok(s)
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

//! The handshake in memory: SSLRequest and direct TLS over a pipe, the
//! answers to GSSENC and cancel requests, buffer stuffing, and the startup
//! deadline under virtual time.

use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::TlsConnector;

use super::{negotiate, Hello};
use crate::config::{TlsMode, TlsSettings};
use crate::session::error::HandshakeError;
use crate::session::test_support::{pipe, tls_configs, Pipe};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

fn startup(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0");
    body.extend_from_slice(user.as_bytes());
    body.extend_from_slice(b"\0\0");
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

fn settings(mode: TlsMode) -> (TlsSettings, std::sync::Arc<rustls::ClientConfig>) {
    let (server, client) = tls_configs();
    (TlsSettings { mode, server }, client)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Runs `negotiate` on the proxy's end while `client` drives the other.
/// Whatever the client returns (its stream, say) lives until the handshake
/// is over: a TLS 1.3 server still writes session tickets after the client
/// has sent its startup packet.
async fn handshake<C, T>(
    tls: Option<&TlsSettings>,
    deadline: Instant,
    client: C,
) -> Result<Hello<Pipe>, HandshakeError>
where
    C: AsyncFnOnce(DuplexStream) -> T,
{
    let (client_end, proxy_end) = pipe(64 * 1024);
    let (hello, _kept) = tokio::join!(negotiate(proxy_end, tls, deadline), client(client_end));
    hello
}

fn user_of(hello: Result<Hello<Pipe>, HandshakeError>) -> (bool, String) {
    match hello {
        Ok(Hello::Startup(stream, msg)) => (stream.is_tls(), msg.param("user").unwrap().into()),
        Ok(Hello::Cancel(..)) => panic!("a startup, not a cancel"),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn an_ssl_request_is_answered_s_and_the_startup_comes_over_tls() {
    let (tls, client_config) = settings(TlsMode::Prefer);
    let hello = handshake(Some(&tls), soon(), async move |mut c| {
        c.write_all(&SSL_REQUEST).await.unwrap();
        let mut answer = [0u8; 1];
        c.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(client_config)
            .connect(name, c)
            .await
            .unwrap();
        tls.write_all(&startup("alice")).await.unwrap();
        tls.flush().await.unwrap();
        tls
    })
    .await;
    assert_eq!(user_of(hello), (true, "alice".into()));
}

#[tokio::test]
async fn direct_tls_is_accepted() {
    let (tls, client_config) = settings(TlsMode::Prefer);
    let hello = handshake(Some(&tls), soon(), async move |c| {
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(client_config)
            .connect(name, c)
            .await
            .unwrap();
        tls.write_all(&startup("bob")).await.unwrap();
        tls.flush().await.unwrap();
        tls
    })
    .await;
    assert_eq!(user_of(hello), (true, "bob".into()));
}

#[tokio::test]
async fn without_tls_ssl_and_gssenc_requests_get_n() {
    let hello = handshake(None, soon(), async |mut c| {
        for request in [SSL_REQUEST, GSSENC_REQUEST] {
            c.write_all(&request).await.unwrap();
            let mut answer = [0u8; 1];
            c.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"N");
        }
        c.write_all(&startup("carol")).await.unwrap();
    })
    .await;
    assert_eq!(user_of(hello), (false, "carol".into()));
}

#[tokio::test]
async fn bytes_sent_ahead_of_the_tls_handshake_fail_it() {
    // CVE-2021-23214: a startup packet stuffed behind the SSLRequest must not
    // be taken as if it had come over TLS.
    let (tls, _) = settings(TlsMode::Prefer);
    let hello = handshake(Some(&tls), soon(), async |mut c| {
        let mut stuffed = SSL_REQUEST.to_vec();
        stuffed.extend_from_slice(&startup("mallory"));
        c.write_all(&stuffed).await.unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert_eq!(rest.first(), Some(&b'S'));
    })
    .await;
    assert!(
        matches!(hello, Err(HandshakeError::Tls(_))),
        "{:?}",
        hello.err()
    );
}

#[tokio::test]
async fn a_cancel_request_is_recognised() {
    let hello = handshake(None, soon(), async |mut c| {
        let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        cancel.extend_from_slice(&42i32.to_be_bytes());
        cancel.extend_from_slice(&7u32.to_be_bytes());
        c.write_all(&cancel).await.unwrap();
    })
    .await;
    match hello {
        Ok(Hello::Cancel(_, key)) => assert_eq!(key.pid, 42),
        _ => panic!("a cancel request"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_gets_08p01_at_the_startup_deadline() {
    let (tls, _) = settings(TlsMode::Prefer);
    let deadline = Instant::now() + Duration::from_secs(3);
    let started = tokio::time::Instant::now();
    let hello = handshake(Some(&tls), deadline, async |mut c| {
        c.write_all(&[0, 0]).await.unwrap(); // half a length word, then nothing
        let mut told = Vec::new();
        c.read_to_end(&mut told).await.unwrap();
        assert_eq!(told.first(), Some(&b'E'), "an ErrorResponse");
        assert!(String::from_utf8_lossy(&told).contains("08P01"));
    })
    .await;
    assert!(matches!(hello, Err(HandshakeError::Timeout)));
    // Virtual time: the deadline, not a real wait, ended it.
    assert!(started.elapsed() >= Duration::from_secs(2));
}

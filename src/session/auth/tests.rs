//! The pass-through authentication in memory, against a scripted backend:
//! what the proxy changes (SASL `-PLUS` mechanisms, the cancel secret) and
//! what makes it refuse a backend (`in_hot_standby` for a read-write
//! session).

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{authenticate, AuthContext, AuthState, AuthStep, Authenticated};
use crate::cancel::CancelRegistry;
use crate::protocol::messages::TxStatus;
use crate::session::error::AuthError;

fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn parameter(name: &str, value: &str) -> Vec<u8> {
    message(b'S', format!("{name}\0{value}\0").as_bytes())
}

const READY_IDLE: &[u8] = b"Z\0\0\0\x05I";

/// Reads one message from `r`: its tag and body.
async fn read_one(r: &mut DuplexStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await.unwrap();
    let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize - 4;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.unwrap();
    (header[0], body)
}

/// Runs the stage with a backend that first sent `first` (what connect
/// read), then whatever `backend` writes; `client` plays the client.
async fn run<B, C>(
    needs_primary: bool,
    first: Vec<u8>,
    backend: B,
    client: C,
) -> Result<Authenticated, AuthError>
where
    B: AsyncFnOnce(DuplexStream),
    C: AsyncFnOnce(DuplexStream),
{
    let cancels = Arc::new(CancelRegistry::default());
    let (client_end, mut proxy_client) = tokio::io::duplex(64 * 1024);
    let (backend_end, mut proxy_backend) = tokio::io::duplex(64 * 1024);
    let address = crate::address::BackendAddress::Tcp("127.0.0.1:5432".into());
    let ctx = AuthContext {
        node: "pg1",
        backend_address: &address,
        cancels: &cancels,
        needs_primary,
        received: BytesMut::from(&first[..]),
    };
    let stage = async {
        let result = authenticate(&mut proxy_client, &mut proxy_backend, ctx).await;
        drop(proxy_client); // the client sees EOF after whatever it was sent
        result
    };
    let (result, (), ()) = tokio::join!(stage, backend(backend_end), client(client_end));
    result
}

#[tokio::test]
async fn sasl_plus_mechanisms_are_not_offered_and_answers_pass_unchanged() {
    let mut sasl = 10u32.to_be_bytes().to_vec();
    sasl.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    let first = message(b'R', &sasl);
    let answer = message(b'p', b"SCRAM-SHA-256\0\0\0\0\x04n,,x");
    let sent = answer.clone();
    let result = run(
        true,
        first,
        async move |mut b| {
            let (t, body) = read_one(&mut b).await;
            assert_eq!(
                message(t, &body),
                sent,
                "the client's answer, byte for byte"
            );
            b.write_all(&message(b'R', &0u32.to_be_bytes()))
                .await
                .unwrap();
            b.write_all(READY_IDLE).await.unwrap();
        },
        async move |mut c| {
            let (t, body) = read_one(&mut c).await;
            assert_eq!(t, b'R');
            assert_eq!(&body[4..], b"SCRAM-SHA-256\0\0", "no -PLUS mechanism");
            c.write_all(&answer).await.unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.unwrap();
            assert!(rest.ends_with(READY_IDLE));
        },
    )
    .await;
    assert!(result.is_ok(), "{:?}", result.err());
}

#[tokio::test]
async fn backend_key_data_keeps_the_pid_and_carries_the_proxys_secret() {
    let mut key = 4242i32.to_be_bytes().to_vec();
    key.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    let mut first = message(b'R', &0u32.to_be_bytes());
    first.extend(message(b'K', &key));
    first.extend_from_slice(READY_IDLE);
    let result = run(
        false,
        first,
        async |_| {},
        async |mut c| {
            let _ok = read_one(&mut c).await;
            let (t, body) = read_one(&mut c).await;
            assert_eq!(t, b'K');
            assert_eq!(&body[..4], &4242i32.to_be_bytes(), "the real pid");
            assert_eq!(body.len(), 8, "a secret of the backend's length");
        },
    )
    .await
    .unwrap();
    let issued = &result.cancel.as_ref().unwrap().issued;
    assert_eq!(issued.pid, 4242);
    assert_ne!(
        &issued.secret[..],
        &0x0102_0304u32.to_be_bytes(),
        "not the real secret"
    );
}

#[tokio::test]
async fn a_read_write_session_never_starts_on_a_hot_standby() {
    let mut first = message(b'R', &0u32.to_be_bytes());
    first.extend(parameter("in_hot_standby", "on"));
    first.extend_from_slice(READY_IDLE);
    let result = run(
        true,
        first,
        async |_| {},
        async |mut c| {
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            assert!(
                !got.contains(&b'Z'),
                "no ReadyForQuery reached the client: {got:?}"
            );
        },
    )
    .await;
    assert!(matches!(result, Err(AuthError::NotPrimary { ref node }) if node == "pg1"));
}

#[tokio::test]
async fn the_servers_refusal_reaches_the_client_as_it_was_sent() {
    let refusal = message(b'E', b"SFATAL\0C28P01\0Mpassword authentication failed\0\0");
    let expected = refusal.clone();
    let result = run(
        false,
        refusal,
        async |_| {},
        async move |mut c| {
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expected);
        },
    )
    .await;
    assert!(matches!(result, Err(AuthError::Rejected)));
}

// The pure part, message by message.
fn step<'a>(state: &mut AuthState, t: u8, body: &'a [u8], out: &mut BytesMut) -> AuthStep<'a> {
    state.on_backend_message(t, body, out).unwrap()
}

#[test]
fn backend_messages_decide_the_next_step() {
    let mut state = AuthState::new(true);
    let mut out = BytesMut::new();
    let mut sasl = 10u32.to_be_bytes().to_vec();
    sasl.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    assert_eq!(
        step(&mut state, b'R', &sasl, &mut out),
        AuthStep::AwaitClient
    );
    assert_eq!(&out[9..], b"SCRAM-SHA-256\0\0");
    out.clear();
    assert_eq!(
        step(&mut state, b'R', &[0; 4], &mut out),
        AuthStep::Forwarded
    );
    assert_eq!(
        step(&mut state, b'K', &[0, 0, 0, 9, 1, 2, 3, 4], &mut out),
        AuthStep::BackendKey {
            pid: 9,
            secret: &[1, 2, 3, 4]
        }
    );
    step(&mut state, b'S', b"in_hot_standby\0on\0", &mut out);
    assert!(state.in_hot_standby);
    out.clear();
    assert_eq!(step(&mut state, b'Z', b"I", &mut out), AuthStep::NotPrimary);
    assert!(out.is_empty(), "a standby's ReadyForQuery is not forwarded");
    state.needs_primary = false;
    assert_eq!(
        step(&mut state, b'Z', b"I", &mut out),
        AuthStep::Ready(TxStatus::Idle)
    );
    assert!(matches!(
        state.on_backend_message(b'R', &[0, 0], &mut out),
        Err(AuthError::BackendProtocol(_))
    ));
}

static LOCAL: std::sync::LazyLock<crate::address::BackendAddress> =
    std::sync::LazyLock::new(|| crate::address::BackendAddress::Tcp("127.0.0.1:5432".into()));

/// A context for a backend that sent nothing yet.
fn silent_ctx(cancels: &Arc<CancelRegistry>) -> AuthContext<'_> {
    AuthContext {
        node: "pg1",
        backend_address: &LOCAL,
        cancels,
        needs_primary: true,
        received: BytesMut::from(&message(b'R', &3u32.to_be_bytes())[..]),
    }
}

#[tokio::test(start_paused = true)]
async fn a_backend_silent_mid_authentication_is_given_up_at_the_timeout() {
    let cancels = Arc::new(CancelRegistry::default());
    let (mut client, mut proxy_client) = tokio::io::duplex(4096);
    let (_backend, mut proxy_backend) = tokio::io::duplex(4096);
    let started = tokio::time::Instant::now();
    let stage = super::authenticate_bounded(
        &mut proxy_client,
        &mut proxy_backend,
        silent_ctx(&cancels),
        std::time::Duration::from_secs(60),
        std::future::pending(),
    );
    let answer = async {
        // The client answers the password request; the backend never replies.
        let _request = read_one(&mut client).await;
        client.write_all(&message(b'p', b"secret\0")).await.unwrap();
        client
    };
    let (result, _client) = tokio::join!(stage, answer);
    assert!(
        matches!(&result, Err(AuthError::Abandoned { detail, .. }) if detail.contains("timed out")),
        "{:?}",
        result.err()
    );
    assert_eq!(
        started.elapsed(),
        std::time::Duration::from_secs(60),
        "virtual time"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_lost_mid_authentication_ends_it_with_the_reason() {
    let cancels = Arc::new(CancelRegistry::default());
    let (_client, mut proxy_client) = tokio::io::duplex(4096);
    let (_backend, mut proxy_backend) = tokio::io::duplex(4096);
    let lost = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        crate::session::ending::EndReason::NodeLost { node: "pg1".into() }
    };
    let result = super::authenticate_bounded(
        &mut proxy_client,
        &mut proxy_backend,
        silent_ctx(&cancels),
        std::time::Duration::from_secs(60),
        lost,
    )
    .await;
    let err = result.err().expect("abandoned");
    assert!(matches!(err, AuthError::Abandoned { .. }), "{err}");
    let shown = crate::session::error::SessionError::from(err)
        .client_error()
        .unwrap();
    assert_eq!(shown.code, "57P03");
    assert_eq!(
        shown.message.matches("pgpivot").count(),
        1,
        "{}",
        shown.message
    );
}

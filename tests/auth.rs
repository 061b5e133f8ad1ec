//! Authentication passes through pgpivot: every method the server uses
//! (SCRAM-SHA-256, md5, cleartext password) works, failures are the
//! server's own, and TLS is terminated at the proxy (psql is the TLS
//! client). Real cluster, real clients.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use pgpivot::config::TlsMode;
use pgpivot::localcluster::{APP_USER, CLEARTEXT_USER, MD5_USER, PASSWORD, SUPERUSER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::tls::tls_proxy;
use common::*;

/// How long a raw client waits for one message.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Authentication request codes (the Int32 after an `R` message's length).
const AUTH_OK: u32 = 0;
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL: u32 = 10;

/// A frontend speaking the protocol by hand, for what tokio-postgres does
/// not show: which authentication request arrives, and BackendKeyData.
struct RawSession {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl RawSession {
    /// Connects to `addr` and sends a protocol 3.0 startup packet for `user`.
    async fn start(addr: SocketAddr, user: &str) -> RawSession {
        let packet = startup_packet(user);
        let mut tcp = TcpStream::connect(addr).await.expect("connect to pgpivot");
        tcp.write_all(&packet)
            .await
            .expect("send the startup packet");
        RawSession {
            tcp,
            buf: Vec::new(),
        }
    }

    /// Sends one typed message.
    async fn send(&mut self, tag: u8, body: &[u8]) {
        let mut message = vec![tag];
        message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        message.extend_from_slice(body);
        self.tcp.write_all(&message).await.expect("send a message");
    }

    /// Receives one message (type byte, body); `None` if the peer closed.
    async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let read = async {
            loop {
                if self.buf.len() >= 5 {
                    let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                    if self.buf.len() > len {
                        let message: Vec<u8> = self.buf.drain(..=len).collect();
                        return Some((message[0], message[5..].to_vec()));
                    }
                }
                let mut chunk = [0u8; 8192];
                match self.tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(RECV_TIMEOUT, read)
            .await
            .expect("a message (or a close) within the timeout")
    }

    /// Receives messages up to ReadyForQuery, returning them all; panics on
    /// an ErrorResponse or a close.
    async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut seen = Vec::new();
        loop {
            let (tag, body) = self.recv().await.expect("ReadyForQuery before a close");
            assert_ne!(tag, b'E', "error: {}", String::from_utf8_lossy(&body));
            seen.push((tag, body));
            if tag == b'Z' {
                return seen;
            }
        }
    }
}

/// The code of an Authentication message body.
fn auth_code(body: &[u8]) -> u32 {
    u32::from_be_bytes(body[..4].try_into().unwrap())
}

/// The first authentication request pgpivot relays for `user`.
async fn first_auth_request(addr: SocketAddr, user: &str) -> (u32, Vec<u8>) {
    let mut session = RawSession::start(addr, user).await;
    let (tag, body) = session
        .recv()
        .await
        .expect("an answer to the startup packet");
    assert_eq!(
        tag,
        b'R',
        "an Authentication request: {}",
        String::from_utf8_lossy(&body)
    );
    (auth_code(&body), body)
}

/// The SASL mechanisms listed in an AuthenticationSASL body.
fn sasl_mechanisms(body: &[u8]) -> Vec<String> {
    body[4..]
        .split(|&b| b == 0)
        .take_while(|m| !m.is_empty())
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

/// `select current_user` through a fresh tokio-postgres client.
async fn current_user(conn: &str) -> Result<String, tokio_postgres::Error> {
    let client = connect_with(conn).await?;
    Ok(client
        .query_one("select current_user::text", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_login_works_and_offers_no_channel_binding() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let (code, body) = first_auth_request(addr, APP_USER).await;
    assert_eq!(code, AUTH_SASL, "pg_hba uses scram-sha-256 for {APP_USER}");
    let mechanisms = sasl_mechanisms(&body);
    assert!(
        mechanisms.contains(&"SCRAM-SHA-256".to_string()),
        "{mechanisms:?}"
    );
    assert!(
        !mechanisms.iter().any(|m| m.ends_with("-PLUS")),
        "{mechanisms:?}"
    );
    let user = current_user(&conn_str(addr, APP_USER, "")).await.unwrap();
    assert_eq!(user, APP_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_login_works() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let (code, body) = first_auth_request(addr, MD5_USER).await;
    assert_eq!(code, AUTH_MD5, "pg_hba uses md5 for {MD5_USER}");
    assert_eq!(body.len(), 8, "an md5 request carries a 4-byte salt");
    let user = current_user(&conn_str(addr, MD5_USER, "")).await.unwrap();
    assert_eq!(user, MD5_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_password_login_works() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let (code, _) = first_auth_request(addr, CLEARTEXT_USER).await;
    assert_eq!(
        code, AUTH_CLEARTEXT,
        "pg_hba uses password for {CLEARTEXT_USER}"
    );
    let user = current_user(&conn_str(addr, CLEARTEXT_USER, ""))
        .await
        .unwrap();
    assert_eq!(user, CLEARTEXT_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gets_the_servers_28p01_for_every_method() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    for user in [APP_USER, MD5_USER, CLEARTEXT_USER] {
        let conn = format!(
            "host={} port={} user={user} password=wrong dbname=postgres",
            addr.ip(),
            addr.port()
        );
        let err = connect_with(&conn)
            .await
            .expect_err("a wrong password is refused");
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{user}: no server error: {err:?}"));
        assert_eq!(db.code().code(), "28P01", "{user}: {err}");
        // The server's own message, not one made up by the proxy.
        let expected = format!("password authentication failed for user \"{user}\"");
        assert_eq!(db.message(), expected, "{user}");
    }
    // The proxy keeps serving, old sessions and new ones.
    assert_eq!(
        before
            .query_one("select 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    let user = current_user(&conn_str(addr, APP_USER, "")).await.unwrap();
    assert_eq!(user, APP_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_carries_the_real_pid() {
    let proxy = proxy().await;
    // Cleartext is the one method a raw client can answer without crypto.
    let mut session = RawSession::start(proxy.addresses[0], CLEARTEXT_USER).await;
    let (tag, body) = session.recv().await.expect("an authentication request");
    assert_eq!((tag, auth_code(&body)), (b'R', AUTH_CLEARTEXT));
    session.send(b'p', format!("{PASSWORD}\0").as_bytes()).await;
    let login = session.until_ready().await;
    assert!(
        login
            .iter()
            .any(|(t, b)| *t == b'R' && auth_code(b) == AUTH_OK),
        "AuthenticationOk"
    );
    let keys: Vec<&Vec<u8>> = login
        .iter()
        .filter(|(t, _)| *t == b'K')
        .map(|(_, b)| b)
        .collect();
    assert_eq!(keys.len(), 1, "exactly one BackendKeyData");
    assert_eq!(keys[0].len(), 8, "pid and a 4-byte secret (protocol 3.0)");
    let key_pid = i32::from_be_bytes(keys[0][..4].try_into().unwrap());

    session.send(b'Q', b"select pg_backend_pid()::text\0").await;
    let answer = session.until_ready().await;
    let row = answer
        .iter()
        .find(|(t, _)| *t == b'D')
        .map(|(_, b)| b)
        .expect("a DataRow");
    // DataRow: Int16 column count, then Int32 length and bytes per column.
    assert_eq!(&row[..2], &[0, 1]);
    let len = i32::from_be_bytes(row[2..6].try_into().unwrap()) as usize;
    let backend_pid: i32 = std::str::from_utf8(&row[6..6 + len])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(key_pid, backend_pid);
}

/// Runs `psql -XAt -c <command>` through `addr` as `user`, with `extra`
/// libpq options (sslmode, channel_binding).
async fn psql(addr: SocketAddr, user: &str, extra: &str, command: &str) -> Output {
    let conn = conn_str(addr, user, extra);
    run_tool(
        shared_cluster(),
        "psql",
        &["-XAt", "-d", &conn, "-c", command],
    )
    .await
}

/// Asserts psql succeeded and returns its trimmed stdout.
fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts psql failed and that its stderr mentions `needle`.
fn assert_psql_failed(out: &Output, needle: &str) {
    assert!(
        !out.status.success(),
        "psql should have failed: {}",
        text(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "expected {needle:?}: {}",
        text(out)
    );
}

/// Whether psql's `\conninfo` output reports a TLS connection.
fn reports_tls(conninfo: &str) -> bool {
    conninfo.contains("SSL connection (protocol: TLS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_over_tls_works_with_password_and_scram() {
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let addr = proxy.addresses[0];
    let out = psql(addr, SUPERUSER, "sslmode=require", "select 1").await;
    assert_eq!(stdout_of(&out), "1");
    let out = psql(addr, SUPERUSER, "sslmode=require", "\\conninfo").await;
    assert!(reports_tls(&stdout_of(&out)), "{}", text(&out));
    // SCRAM over TLS: libpq would use SCRAM-SHA-256-PLUS if it were offered
    // (channel_binding=prefer is its default); it must not be.
    let out = psql(addr, APP_USER, "sslmode=require", "select current_user").await;
    assert_eq!(stdout_of(&out), APP_USER);
    for user in [MD5_USER, CLEARTEXT_USER] {
        let out = psql(addr, user, "sslmode=require", "select current_user").await;
        assert_eq!(stdout_of(&out), user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_requiring_channel_binding_is_refused_by_its_own_libpq() {
    // TLS ends at the proxy, so channel binding cannot be offered: a client
    // that insists must fail, not be silently downgraded.
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let out = psql(
        proxy.addresses[0],
        APP_USER,
        "sslmode=require channel_binding=require",
        "select 1",
    )
    .await;
    assert_psql_failed(&out, "channel binding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mode_require_refuses_plaintext_with_28000() {
    let (proxy, _files) = tls_proxy(TlsMode::Require, |_| {}).await;
    let addr = proxy.addresses[0];
    let err = connect_with(&conn_str(addr, SUPERUSER, "sslmode=disable"))
        .await
        .expect_err("a plaintext client is refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
    let out = psql(addr, SUPERUSER, "sslmode=disable", "select 1").await;
    assert_psql_failed(&out, "requires TLS");
    // TLS clients still get in.
    let out = psql(addr, APP_USER, "sslmode=require", "select current_user").await;
    assert_eq!(stdout_of(&out), APP_USER);
    let out = psql(addr, SUPERUSER, "sslmode=prefer", "\\conninfo").await;
    assert!(reports_tls(&stdout_of(&out)), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mode_prefer_also_accepts_plaintext() {
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let addr = proxy.addresses[0];
    let out = psql(addr, SUPERUSER, "sslmode=disable", "\\conninfo").await;
    let conninfo = stdout_of(&out);
    assert!(conninfo.contains("You are connected"), "{conninfo}");
    assert!(!reports_tls(&conninfo), "{conninfo}");
    let user = current_user(&conn_str(addr, APP_USER, "sslmode=disable"))
        .await
        .unwrap();
    assert_eq!(user, APP_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_an_ssl_request_is_declined() {
    // No [tls]: SSLRequest gets 'N'; libpq's prefer falls back, require fails.
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let out = psql(addr, SUPERUSER, "sslmode=prefer", "\\conninfo").await;
    let conninfo = stdout_of(&out);
    assert!(conninfo.contains("You are connected"), "{conninfo}");
    assert!(!reports_tls(&conninfo), "{conninfo}");
    let out = psql(addr, SUPERUSER, "sslmode=require", "select 1").await;
    assert_psql_failed(&out, "server does not support SSL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mode_disable_declines_ssl_requests() {
    let (proxy, _files) = tls_proxy(TlsMode::Disable, |_| {}).await;
    let addr = proxy.addresses[0];
    let out = psql(addr, SUPERUSER, "sslmode=require", "select 1").await;
    assert_psql_failed(&out, "server does not support SSL");
    let out = psql(addr, SUPERUSER, "sslmode=disable", "select 1").await;
    assert_eq!(stdout_of(&out), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_gets_08p01_when_tls_is_configured() {
    // Same startup deadline as without TLS: the wait for the client's first
    // byte (to spot a direct TLS handshake) is part of it.
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |c| c.limits.startup_timeout_ms = 500).await;
    let started = Instant::now();
    let mut silent = RawSession {
        tcp: TcpStream::connect(proxy.addresses[0]).await.unwrap(),
        buf: Vec::new(),
    };
    let reply = silent.recv().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed too early: {waited:?}"
    );
    let (tag, body) = reply.expect("an ErrorResponse before the close, not a bare close");
    assert_eq!(tag, b'E');
    let fields: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    assert!(
        fields.contains(&&b"C08P01"[..]),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(silent.recv().await.is_none(), "closed after the error");
}

//! TLS between clients and pgpivot, with real clients and large, uneven,
//! slowly read responses: no response may stall, pgpivot's TLS records are
//! no larger than PostgreSQL's, and every TLS connection pgpivot closes ends
//! with a close_notify (libpq 17+ encrypted cancels depend on it).

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use pgpivot::config::TlsMode;
use pgpivot::localcluster::{CLEARTEXT_USER, PASSWORD, SUPERUSER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::tls::*;
use common::*;

/// TLS 1.3 adds 17 bytes to a record (content type and tag), TLS 1.2 with
/// AES-GCM 24; the protocol allows at most 256.
const MAX_EXPANSION: usize = 256;

/// A COPY TO STDOUT of about `mb` megabytes with rows of uneven length.
fn copy_out(mb: usize) -> String {
    let rows = mb * 1024 * 1024 / 1100;
    format!(
        "copy (select g, repeat(md5(g::text), 1 + mod(g * 7, 61)) \
         from generate_series(1, {rows}) g) to stdout"
    )
}

/// Runs `psql -XAt -c command` through `addr` as the superuser and pipes its
/// output into `consumer` (a shell command); returns the consumer's output.
async fn psql_into(
    addr: std::net::SocketAddr,
    extra: &str,
    command: &str,
    consumer: &str,
) -> String {
    let psql = shared_cluster().bindir().join("psql");
    let conn = conn_str(addr, SUPERUSER, extra);
    let script = format!(
        "set -o pipefail; '{}' -XAt -d \"$CONN\" -c \"$SQL\" | {consumer}",
        psql.display()
    );
    let child = tokio::process::Command::new("bash")
        .args(["-c", &script])
        .env("CONN", conn)
        .env("SQL", command)
        .env("PGPASSWORD", PASSWORD)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .expect("psql finishes: no stall")
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Counts and hashes stdin, optionally sleeping between reads.
fn digest(pause_s: f64) -> String {
    format!(
        "python3 -c 'import sys, time, hashlib\nh, n = hashlib.sha256(), 0\n\
         while b := sys.stdin.buffer.read(16384):\n    h.update(b); n += len(b); time.sleep({pause_s})\n\
         print(n, h.hexdigest())'"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_records_are_no_larger_than_postgresqls() {
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let tap = RecordTap::start(proxy.addresses[0]).await;
    let out = psql_into(tap.address, "sslmode=require", &copy_out(8), &digest(0.0)).await;
    assert!(out.starts_with(char::is_numeric), "{out}");
    let stats = tap.stats();
    assert!(
        stats.records > 200,
        "the response came in records: {stats:?}"
    );
    assert!(
        stats.max_len <= pgpivot::tls::MAX_RECORD_PLAINTEXT + MAX_EXPANSION,
        "no record carries more than 8 KiB of plaintext: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tls_reader_gets_every_byte_of_a_large_copy() {
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let addr = proxy.addresses[0];
    let query = copy_out(40);
    let plain = psql_into(addr, "sslmode=disable", &query, &digest(0.0)).await;
    for round in 0..3 {
        let slow = psql_into(addr, "sslmode=require", &query, &digest(0.0003)).await;
        assert_eq!(
            slow, plain,
            "round {round}: the same bytes over TLS, read slowly"
        );
    }
    let fast = psql_into(addr, "sslmode=require", &query, &digest(0.0)).await;
    assert_eq!(fast, plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_copy_in_over_tls_arrives_whole() {
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let rows: u64 = 100 * 1024 * 1024 / 1000;
    let generate = format!(
        "python3 -c 'import sys\nw = sys.stdout.buffer.write\n\
         for i in range(1, {rows} + 1): w(b\"%d\\t%s\\n\" % (i, b\"y\" * (1 + i * 37 % 1990)))'"
    );
    let psql = shared_cluster().bindir().join("psql");
    let conn = conn_str(proxy.addresses[0], SUPERUSER, "sslmode=require");
    let script = format!(
        "set -o pipefail; {generate} | '{}' -XAt -d \"$CONN\" \
         -c 'create temp table sink (id int, v text)' -c 'copy sink from stdin' \
         -c 'select count(*), sum(id), sum(length(v)) from sink'",
        psql.display()
    );
    let child = tokio::process::Command::new("bash")
        .args(["-c", &script])
        .env("CONN", conn)
        .env("PGPASSWORD", PASSWORD)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .expect("COPY IN finishes: no stall")
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let lengths: u64 = (1..=rows).map(|i| 1 + i * 37 % 1990).sum();
    let expected = format!("{rows}|{}|{lengths}", rows * (rows + 1) / 2);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == expected),
        "{expected}: {}",
        text(&out)
    );
}

/// Runs a psycopg scenario through a TLS proxy; `None` without psycopg.
async fn psycopg(mode: &str, n: &str) -> Option<String> {
    psycopg_with(mode, n, "sslmode=require").await
}

async fn psycopg_with(mode: &str, n: &str, extra: &str) -> Option<String> {
    psycopg_python()?;
    let (proxy, _files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let conn = conn_str(proxy.addresses[0], SUPERUSER, extra);
    let out = run_python("psycopg_tls.py", &[mode, &conn, n]).await;
    assert!(out.status.success(), "{}", text(&out));
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_wide_rows_pipelines_and_copy_over_tls_never_stall() {
    if let Some(out) = psycopg("wide", "12").await {
        assert!(out.contains("12 passed, 0 failed"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_slow_and_fast_readers_get_the_same_bytes_over_tls() {
    if let Some(out) = psycopg("slow", "24").await {
        assert!(out.contains("3 passed, 0 failed"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_copy_in_of_100_mb_over_tls() {
    if let Some(out) = psycopg("copyin", "100").await {
        assert!(out.contains("1 passed, 0 failed"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_17_encrypted_cancels_succeed() {
    // PQcancelConn sends the CancelRequest inside TLS and counts the cancel
    // as failed unless the connection ends with a close_notify.
    if let Some(out) = psycopg("cancel", "3").await {
        assert!(out.contains("3 passed, 0 failed"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_17_direct_tls_is_accepted() {
    // sslnegotiation=direct: TLS from the first byte, ALPN "postgresql".
    let extra = "sslmode=require sslnegotiation=direct";
    if let Some(out) = psycopg_with("wide", "2", extra).await {
        assert!(out.contains("2 passed, 0 failed"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_inside_tls_is_closed_with_close_notify() {
    let (proxy, files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let mut tls = tls_connect(proxy.addresses[0], &files).await;
    let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    cancel.extend_from_slice(&1234u32.to_be_bytes());
    cancel.extend_from_slice(&5678u32.to_be_bytes());
    tls.write_all(&cancel).await.unwrap();
    tls.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), read_to_clean_close(&mut tls))
        .await
        .expect("pgpivot closes the cancel connection");
    assert_eq!(got.expect("a clean TLS close (close_notify)"), b"");
}

/// The bytes of one message `t` with `body`.
fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A TLS session logged in as the cleartext-password role, read up to its
/// first ReadyForQuery.
async fn logged_in(
    addr: std::net::SocketAddr,
    files: &TlsFiles,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = tls_connect(addr, files).await;
    tls.write_all(&startup_packet(CLEARTEXT_USER))
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let mut password = PASSWORD.as_bytes().to_vec();
    password.push(0);
    let mut answered = false;
    loop {
        let mut header = [0u8; 5];
        tls.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize - 4;
        let mut body = vec![0u8; len];
        tls.read_exact(&mut body).await.unwrap();
        match header[0] {
            b'R' if body[..4] == 3u32.to_be_bytes() && !answered => {
                tls.write_all(&message(b'p', &password)).await.unwrap();
                tls.flush().await.unwrap();
                answered = true;
            }
            b'E' => panic!("login failed: {}", String::from_utf8_lossy(&body)),
            b'Z' => return tls,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tls_connection_pgpivot_closes_ends_with_close_notify() {
    let (proxy, files) = tls_proxy(TlsMode::Prefer, |_| {}).await;
    let addr = proxy.addresses[0];
    let clean_close = async |tls: &mut tokio_rustls::client::TlsStream<_>, what: &str| {
        let got = tokio::time::timeout(Duration::from_secs(10), read_to_clean_close(tls))
            .await
            .unwrap_or_else(|_| panic!("{what}: pgpivot closes"));
        got.unwrap_or_else(|e| panic!("{what}: a clean TLS close, not {e}"))
    };

    // A refused startup: 22023 for a bad pgpivot setting, then the close.
    let mut tls = tls_connect(addr, &files).await;
    let mut startup = startup_packet(SUPERUSER);
    let at = startup.len() - 1;
    startup.splice(
        at..at,
        *b"options\0-c pgpivot.target_session_attrs=nonsense\0",
    );
    let len = startup.len() as u32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    tls.write_all(&startup).await.unwrap();
    tls.flush().await.unwrap();
    let got = clean_close(&mut tls, "refused startup").await;
    assert!(String::from_utf8_lossy(&got).contains("22023"), "{got:?}");

    // The client says goodbye: pgpivot closes cleanly too.
    let mut tls = logged_in(addr, &files).await;
    tls.write_all(b"X\0\0\0\x04").await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(clean_close(&mut tls, "after Terminate").await, b"");

    // An idle session ended at shutdown: 57P01, then the close.
    let mut tls = logged_in(addr, &files).await;
    let shutting_down = tokio::spawn(proxy.shutdown(Duration::from_secs(10)));
    let got = clean_close(&mut tls, "at shutdown").await;
    assert!(String::from_utf8_lossy(&got).contains("57P01"), "{got:?}");
    shutting_down.await.unwrap();
}

//! Hostile and broken clients: whatever a client sends, pgpivot answers
//! with a protocol error where the protocol allows one, closes that
//! connection, and keeps serving everyone else. Real cluster, raw sockets.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpivot::config::FileConfig;
use pgpivot::localcluster::SUPERUSER;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

/// How long a bad client waits for pgpivot's answer and close.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLSTATE protocol_violation, pgpivot's answer to a broken startup.
const PROTOCOL_VIOLATION: &str = "08P01";

/// Opens a raw TCP connection to `addr` and sends `bytes` on it.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect to pgpivot");
    tcp.write_all(bytes).await.expect("send raw bytes");
    tcp
}

/// Reads everything pgpivot sends until it closes the connection (a reset
/// counts as a close). Panics if the connection is still open after
/// [`REPLY_TIMEOUT`].
async fn read_until_closed(tcp: &mut TcpStream) -> Vec<u8> {
    let mut reply = Vec::new();
    let read_all = async {
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, read_all)
        .await
        .expect("pgpivot closes the connection within the timeout");
    reply
}

/// Parses `reply` as exactly one ErrorResponse (`'E'`, Int32 length, then
/// (code byte, cstring) fields up to a 0) and returns its fields by code.
fn parse_error_response(reply: &[u8]) -> HashMap<u8, String> {
    assert!(reply.len() >= 5, "no ErrorResponse, got {reply:?}");
    assert_eq!(reply[0], b'E', "not an ErrorResponse: {reply:?}");
    let len = u32::from_be_bytes([reply[1], reply[2], reply[3], reply[4]]) as usize;
    assert_eq!(
        reply.len(),
        1 + len,
        "one ErrorResponse and nothing else: {reply:?}"
    );
    let mut fields = HashMap::new();
    let mut rest = &reply[5..];
    loop {
        let (&code, tail) = rest.split_first().expect("field list ends with a 0");
        if code == 0 {
            assert!(tail.is_empty(), "bytes after the field list: {reply:?}");
            return fields;
        }
        let nul = tail
            .iter()
            .position(|&b| b == 0)
            .expect("a NUL-terminated field");
        fields.insert(code, String::from_utf8_lossy(&tail[..nul]).into_owned());
        rest = &tail[nul + 1..];
    }
}

/// Sends `bytes` on a fresh connection, then checks that pgpivot answers
/// with one ErrorResponse carrying `sqlstate` and closes the connection.
async fn expect_error_and_close(addr: SocketAddr, bytes: &[u8], sqlstate: &str) {
    let mut tcp = send_raw(addr, bytes).await;
    let reply = read_until_closed(&mut tcp).await;
    let fields = parse_error_response(&reply);
    assert_eq!(
        fields.get(&b'C').map(String::as_str),
        Some(sqlstate),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&b'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    assert!(
        fields.contains_key(&b'M'),
        "an error has a message: {fields:?}"
    );
}

/// Checks that the proxy at `addr` still works: the session opened before
/// the bad input answers a query, and a new client can connect and query.
async fn assert_still_serving(addr: SocketAddr, before: &tokio_postgres::Client) {
    let one: i32 = before
        .query_one("select 1", &[])
        .await
        .expect("a session opened before the bad client still works")
        .get(0);
    assert_eq!(one, 1);
    let fresh = connect(addr).await;
    let two: i32 = fresh
        .query_one("select 2", &[])
        .await
        .expect("a new client works after the bad client")
        .get(0);
    assert_eq!(two, 2);
}

/// A proxy in front of the shared cluster with a tweaked config.
async fn proxy_with(tweak: impl FnOnce(&mut FileConfig)) -> pgpivot::proxy::Proxy {
    let mut config = config_for(shared_cluster());
    tweak(&mut config);
    start_proxy(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_gb_startup_length_gets_08p01_and_a_close() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    expect_error_and_close(
        addr,
        &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
        PROTOCOL_VIOLATION,
    )
    .await;
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_length_below_8_gets_08p01() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    expect_error_and_close(addr, &[0, 0, 0, 4], PROTOCOL_VIOLATION).await;
    expect_error_and_close(addr, &[0, 0, 0, 7, 0, 3, 0], PROTOCOL_VIOLATION).await;
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_startup_packet_is_closed_without_harm() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    // Announces 100 bytes, sends 20, then ends its side.
    let mut packet = 100u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&196_608u32.to_be_bytes());
    packet.extend_from_slice(b"user\0postgre");
    assert_eq!(packet.len(), 20);
    let mut tcp = send_raw(addr, &packet).await;
    tcp.shutdown().await.unwrap();
    let reply = read_until_closed(&mut tcp).await;
    // No reply is needed (the client has gone), but if one is sent it must
    // be a protocol violation.
    if !reply.is_empty() {
        let fields = parse_error_response(&reply);
        assert_eq!(
            fields.get(&b'C').map(String::as_str),
            Some(PROTOCOL_VIOLATION)
        );
    }
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_half_packet_times_out_with_08p01() {
    let proxy = proxy_with(|c| c.limits.startup_timeout_ms = 500).await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    // Announces 100 bytes, sends 20, then waits with its side open.
    let mut packet = 100u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&[0u8; 16]);
    let started = Instant::now();
    expect_error_and_close(addr, &packet, PROTOCOL_VIOLATION).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_garbage_gets_08p01() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    // "GET " read as a length is over 10000.
    expect_error_and_close(addr, b"GET / HTTP/1.1\r\n\r\n", PROTOCOL_VIOLATION).await;
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_startup_code_gets_08p01() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    let mut packet = 8u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&12_345_678u32.to_be_bytes());
    expect_error_and_close(addr, &packet, PROTOCOL_VIOLATION).await;
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_startup_message_gets_08p01() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    // Protocol 3.0, but the parameter list is not NUL-terminated.
    let mut packet = 17u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&196_608u32.to_be_bytes());
    packet.extend_from_slice(b"user\0bob\0");
    expect_error_and_close(addr, &packet, PROTOCOL_VIOLATION).await;
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_gets_08p01_after_the_startup_timeout() {
    let proxy = proxy_with(|c| c.limits.startup_timeout_ms = 500).await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    let started = Instant::now();
    expect_error_and_close(addr, &[], PROTOCOL_VIOLATION).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed too late: {waited:?}"
    );
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_after_startup_gets_08p01() {
    let proxy = proxy_with(|c| c.limits.max_message_bytes = 1_000_000).await;
    let addr = proxy.addresses[0];
    let before = connect(addr).await;
    // Just under the limit passes.
    let client = connect(addr).await;
    let fits = "x".repeat(900_000);
    let len: i32 = client
        .query_one("select length($1::text)", &[&fits])
        .await
        .expect("a message under the limit is relayed")
        .get(0);
    assert_eq!(len, 900_000);
    // Over it, the session ends with a protocol violation.
    let big = "x".repeat(2_000_000);
    let err = client
        .query_one("select length($1::text)", &[&big])
        .await
        .expect_err("a 2 MB message is over the 1 MB limit");
    match sqlstate(&err) {
        Some(code) => assert_eq!(code, PROTOCOL_VIOLATION, "{err}"),
        None => assert!(
            err.is_closed(),
            "neither 08P01 nor a closed connection: {err:?}"
        ),
    }
    assert!(client.is_closed() || client.query_one("select 1", &[]).await.is_err());
    assert_still_serving(addr, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_garbage_clients_do_not_disturb_a_busy_session() {
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let normal = connect(addr).await;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut queries = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let n: i32 = normal
                    .query_one("select $1::int4 + 1", &[&(queries as i32)])
                    .await
                    .expect("the normal client sees no error")
                    .get(0);
                assert_eq!(n, queries as i32 + 1);
                queries += 1;
            }
            queries
        }
    });
    let garbage = (0..50).map(|i| async move {
        let bytes = format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n");
        expect_error_and_close(addr, bytes.as_bytes(), PROTOCOL_VIOLATION).await;
    });
    futures_util::future::join_all(garbage).await;
    stop.store(true, Ordering::Relaxed);
    let queries = worker
        .await
        .expect("the normal client's loop did not panic");
    assert!(queries > 0, "the normal client ran no query");
}

/// Connects as the superuser and returns the SQLSTATE of the refusal, or
/// the client on success.
async fn try_connect(addr: SocketAddr) -> Result<tokio_postgres::Client, String> {
    connect_with(&conn_str(addr, SUPERUSER, ""))
        .await
        .map_err(|e| sqlstate(&e).unwrap_or_else(|| format!("no SQLSTATE: {e}")))
}

/// Polls until a new client gets in through `addr` (a slot was freed).
async fn connect_within(addr: SocketAddr, timeout: Duration) -> tokio_postgres::Client {
    let deadline = Instant::now() + timeout;
    loop {
        match try_connect(addr).await {
            Ok(client) => return client,
            Err(code) if code == "53300" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(code) => panic!("no free slot within {timeout:?}: last refusal {code}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_third_client_over_a_limit_of_2_gets_53300() {
    let proxy = proxy_with(|c| c.limits.max_client_connections = 2).await;
    let addr = proxy.addresses[0];
    let a = connect(addr).await;
    let b = connect(addr).await;
    let refused = try_connect(addr)
        .await
        .expect_err("a third client is refused");
    assert_eq!(refused, "53300");
    // Once one leaves, its slot (and only that one) is free again; the
    // refused client did not keep one.
    assert_eq!(
        a.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    drop(a);
    let c = connect_within(addr, Duration::from_secs(5)).await;
    assert_eq!(
        c.query_one("select 3", &[]).await.unwrap().get::<_, i32>(0),
        3
    );
    // The freed slot is taken again: the limit still holds.
    assert_eq!(try_connect(addr).await.err().as_deref(), Some("53300"));
    assert_eq!(
        b.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_counts_all_listeners_together() {
    // `limits.max_client_connections` is documented as the cap "over all
    // listeners"; config_for starts two listeners.
    let proxy = proxy_with(|c| c.limits.max_client_connections = 2).await;
    let (rw, ro) = (proxy.addresses[0], proxy.addresses[1]);
    let _a = connect(rw).await;
    let _b = connect(ro).await;
    assert_eq!(try_connect(rw).await.err().as_deref(), Some("53300"));
    assert_eq!(try_connect(ro).await.err().as_deref(), Some("53300"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_raw_startup_still_gets_an_authentication_request() {
    // Guards the helpers above: the same raw path with a correct packet is
    // answered by the server (an Authentication request), not by an error.
    let proxy = proxy().await;
    let mut tcp = send_raw(proxy.addresses[0], &startup_packet(SUPERUSER)).await;
    let mut header = [0u8; 5];
    tokio::time::timeout(REPLY_TIMEOUT, tcp.read_exact(&mut header))
        .await
        .expect("an answer within the timeout")
        .expect("an answer");
    assert_eq!(header[0], b'R', "an Authentication request: {header:?}");
}

//! Test harness: one real cluster per test binary, and a pgpivot in front of
//! it per test (started in-process on 127.0.0.1:0).
#![allow(dead_code)]

pub mod admin;
pub mod tls;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgpivot::config::{FileConfig, ListenerConfig};
use pgpivot::localcluster::{ClusterOptions, LocalCluster, PASSWORD, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::routing::Target;

/// The cluster shared by every test of this binary (the reaper stops it when
/// the binary exits, however it exits).
pub fn shared_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| new_cluster(2))
}

/// A private cluster, for tests that break it.
pub fn new_cluster(standbys: usize) -> LocalCluster {
    new_cluster_with(standbys, Vec::new())
}

/// A private cluster with extra `postgresql.conf` lines on every node.
pub fn new_cluster_with(standbys: usize, extra_conf: Vec<String>) -> LocalCluster {
    init_tracing();
    LocalCluster::start(ClusterOptions {
        standbys,
        extra_conf,
        tls: None,
    })
    .expect("a local PostgreSQL cluster (are the server binaries installed?)")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgpivot=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn listener(target: Target) -> ListenerConfig {
    ListenerConfig::new("127.0.0.1:0", target)
}

/// A config for a proxy in front of `cluster`: a read-write listener and a
/// prefer-standby one, fast monitor timings.
pub fn config_for(cluster: &LocalCluster) -> FileConfig {
    let listeners = vec![listener(Target::ReadWrite), listener(Target::PreferStandby)];
    let mut file = pgpivot::demo::file_config(cluster, listeners);
    file.monitor.interval_ms = 100;
    file.monitor.timeout_ms = 1000;
    file.failover.hold_timeout_ms = 15_000;
    file
}

/// Starts pgpivot with `config` and waits until it knows the primary.
pub async fn start_proxy(config: FileConfig) -> Proxy {
    let settings = config.validate().expect("valid test config");
    let proxy = Proxy::start(settings).await.expect("proxy starts");
    assert!(
        proxy.wait_for_primary(Duration::from_secs(20)).await,
        "pgpivot found no primary"
    );
    let all_polled = eventually(Duration::from_secs(20), || async {
        let t = proxy.shared.topology.load();
        t.nodes
            .iter()
            .all(|n| n.status != pgpivot::topology::Status::Down)
    })
    .await;
    assert!(all_polled, "not every node answered its first poll");
    proxy
}

/// A proxy in front of the shared cluster.
pub async fn proxy() -> Proxy {
    start_proxy(config_for(shared_cluster())).await
}

pub fn conn_str(addr: SocketAddr, user: &str, extra: &str) -> String {
    format!(
        "host={} port={} user={user} password={PASSWORD} dbname=postgres {extra}",
        addr.ip(),
        addr.port()
    )
}

/// A tokio-postgres client through `addr` as the superuser.
pub async fn connect(addr: SocketAddr) -> tokio_postgres::Client {
    connect_with(&conn_str(addr, SUPERUSER, ""))
        .await
        .expect("connect through pgpivot")
}

pub async fn connect_with(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A client whose connection task's outcome can be awaited: an error the
/// server (or pgpivot) sends while the client is idle ends that task.
pub async fn connect_watched(
    conn: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .expect("connect through pgpivot");
    (client, tokio::spawn(connection))
}

/// The message of a server error, or the error's text.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// The SQLSTATE of an error, if the server (or pgpivot) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Runs a client binary (psql, pgbench) from the cluster's bindir.
pub async fn run_tool(cluster: &LocalCluster, tool: &str, args: &[&str]) -> Output {
    let path = cluster.bindir().join(tool);
    let out = tokio::process::Command::new(path)
        .args(args)
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "20")
        .output()
        .await
        .expect("run client tool");
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `select pg_sleep(30)` on `client` and, once its backend on the
/// server at `node_conn` runs it, cancels it with the key the client was
/// given. Returns the query's outcome and how long it took.
pub async fn cancel_a_sleep(
    client: &tokio_postgres::Client,
    node_conn: &str,
) -> (Result<(), tokio_postgres::Error>, Duration) {
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let started = Instant::now();
    let sleeping = client.batch_execute("select pg_sleep(30)");
    let cancel = async {
        wait_running(node_conn, pid).await;
        let token = client.cancel_token();
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    };
    let (slept, ()) = tokio::join!(sleeping, cancel);
    (slept, started.elapsed())
}

/// Waits until backend `pid` on the server at `node_conn` runs a query, so a
/// cancel sent next cannot arrive before it.
pub async fn wait_running(node_conn: &str, pid: i32) {
    let observer = connect_with(node_conn).await.expect("connect to the node");
    let running = eventually(Duration::from_secs(10), || async {
        let row = observer
            .query_opt(
                "select 1 from pg_stat_activity where pid = $1 and state = 'active'",
                &[&pid],
            )
            .await;
        matches!(row, Ok(Some(_)))
    })
    .await;
    assert!(running, "backend {pid} never started its query");
}

/// A startup packet (protocol 3.0) for `user` on database postgres, for
/// tests that speak the protocol by hand.
pub fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

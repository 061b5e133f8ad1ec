//! Unix-socket backends: a proxy on the database host reaching its nodes
//! over their local sockets, in both of libpq's forms (the socket file, and
//! its directory with `port`). Sessions log in with a real SCRAM exchange
//! over the socket (`pg_hba.conf` has `local all all scram-sha-256`).

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use futures_util::{SinkExt, TryStreamExt};
use pgpivot::address::socket_path;
use pgpivot::config::FileConfig;
use pgpivot::localcluster::{LocalCluster, StopMode, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::topology::Status;

use common::*;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `config_for(cluster)` with every node on its socket: node 0 as the socket
/// file, the others as the directory plus `port`.
fn unix_config(cluster: &LocalCluster) -> FileConfig {
    let mut file = config_for(cluster);
    let dir = cluster.socket_dir();
    for (i, node) in file.nodes.iter_mut().enumerate() {
        let port = cluster.node(i).port;
        if i == 0 {
            node.address = socket_path(&dir, port).display().to_string();
        } else {
            node.address = dir.display().to_string();
            node.port = Some(port.into());
        }
    }
    file
}

/// Where a session through `proxy` landed: `(port, server address)`; the
/// address is `None` over a Unix socket.
async fn landing(client: &tokio_postgres::Client) -> (i32, Option<String>) {
    let row = client
        .query_one(
            "select current_setting('port')::int, inet_server_addr()::text",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn wait_primary(proxy: &Proxy, id: usize) {
    let ok = eventually(Duration::from_secs(15), || async {
        proxy.shared.topology.load().primary == Some(id)
    })
    .await;
    assert!(ok, "node {id} never became primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_relay_a_large_result_and_a_copy_in_over_the_socket() {
    let cluster = shared_cluster();
    let proxy = start_proxy(unix_config(cluster)).await;
    // The monitor reached every node over its socket.
    let topology = proxy.shared.topology.load();
    assert_eq!(topology.primary, Some(0));
    assert!(topology.nodes[1..].iter().all(|n| n.is_standby()));
    let shown = topology.nodes[0].address.to_string();
    assert!(shown.ends_with(&format!(".s.PGSQL.{}", cluster.node(0).port)));

    let client = connect(proxy.addresses[0]).await;
    let (port, addr) = landing(&client).await;
    assert_eq!((port, addr), (cluster.node(0).port as i32, None));

    // ≥ 8 MB of result rows.
    let rows = client
        .query(
            "select i, repeat('x', 1000) from generate_series(1, 10000) i",
            &[],
        )
        .await
        .unwrap();
    let bytes: usize = rows.iter().map(|r| r.get::<_, &str>(1).len()).sum();
    assert_eq!(rows.len(), 10_000);
    assert!(bytes >= 8_000_000, "{bytes}");

    client
        .batch_execute("drop table if exists unix_copy; create table unix_copy (id int, t text)")
        .await
        .unwrap();
    let sink = client.copy_in("copy unix_copy from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut sent = 0;
    for chunk in 0..100 {
        let data: String = (0..1000)
            .map(|i| format!("{}\t{}\n", chunk * 1000 + i, "y".repeat(100)))
            .collect();
        sent += data.len();
        sink.send(bytes::Bytes::from(data)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100_000);
    assert!(sent > 10_000_000);
    let count: i64 = client
        .query_one("select count(*) from unix_copy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 100_000);
    let out = client.copy_out("copy unix_copy to stdout").await.unwrap();
    let back: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    assert_eq!(back.iter().map(|c| c.len()).sum::<usize>(), sent);

    // A read session lands on a standby given as directory + port.
    let conn = conn_str(
        proxy.addresses[1],
        SUPERUSER,
        "options='-c pgpivot.target_session_attrs=standby'",
    );
    let reader = connect_with(&conn).await.unwrap();
    let (port, addr) = landing(&reader).await;
    assert!(addr.is_none());
    assert!(cluster.nodes()[1..].iter().any(|n| n.port as i32 == port));

    // /status shows the socket.
    let report = pgpivot::admin::status::report(&proxy.shared);
    assert!(
        report.nodes.iter().all(|n| n.address.starts_with('/')),
        "{:?}",
        report.nodes.iter().map(|n| &n.address).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_reaches_a_node_on_a_socket() {
    let cluster = shared_cluster();
    let proxy = start_proxy(unix_config(cluster)).await;
    let client = connect(proxy.addresses[0]).await;
    let (slept, took) = cancel_a_sleep(&client, &cluster.node(0).conn_string()).await;
    let err = slept.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(took < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_between_socket_nodes_is_followed() {
    let cluster = new_cluster(1);
    let proxy = start_proxy(unix_config(&cluster)).await;
    let rw = proxy.addresses[0];
    let before = connect(rw).await;
    assert_eq!(landing(&before).await.0, cluster.node(0).port as i32);
    // An idle session, moved to the new primary (a re-login over the socket).
    let idle = connect(rw).await;
    idle.batch_execute("set application_name = 'kept'")
        .await
        .unwrap();
    // Both sessions have their credential (the auth query ran on the
    // primary over its socket), so both can move.
    let ready = eventually(Duration::from_secs(10), || async {
        proxy.shared.metrics.moves.with_credential.get() >= 2
    })
    .await;
    assert!(ready, "the auth query over the socket found no credential");

    blocking(|| cluster.stop_node(0, StopMode::Immediate)).unwrap();
    let noticed = eventually(Duration::from_secs(10), || async {
        proxy.shared.topology.load().nodes[0].status == Status::Down
    })
    .await;
    assert!(noticed, "the crash was not noticed");
    blocking(|| cluster.promote(1)).unwrap();
    wait_primary(&proxy, 1).await;

    let after = connect(rw).await;
    let (port, addr) = landing(&after).await;
    assert_eq!((port, addr), (cluster.node(1).port as i32, None));
    after
        .batch_execute("create table after_unix_failover (x int)")
        .await
        .unwrap();

    // The idle session was moved, with its settings, by a re-login over
    // the new primary's socket.
    let row = idle.query_one("show application_name", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "kept");
    assert_eq!(landing(&idle).await.0, cluster.node(1).port as i32);
    assert!(proxy.shared.metrics.moves.moved.total() >= 1);
}

/// Runs `pgpivot --check-config` on `toml`: (exit code, stderr).
async fn check_config(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgpivot.toml");
    std::fs::write(&path, toml).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpivot"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn config_errors_on_socket_nodes_name_their_key() {
    let (code, err) = check_config(
        "[[nodes]]\nname = 'pg1'\naddress = '/var/run/postgresql'\nsslmode = 'require'\n",
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("nodes[0].sslmode"), "{err}");
    assert!(err.contains("TLS"), "{err}");

    let (code, err) = check_config(
        "[[nodes]]\nname = 'pg1'\naddress = '127.0.0.1:5432'\n\
         [[nodes]]\nname = 'pg2'\naddress = '/var/run/postgresql'\nport = 99999\n",
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("nodes[1].port"), "{err}");

    let (code, out) =
        check_config("[[nodes]]\nname = 'pg1'\naddress = '/var/run/postgresql'\nport = 5433\n")
            .await;
    assert_eq!(code, Some(0), "{out}");
}

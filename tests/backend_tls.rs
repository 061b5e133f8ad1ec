//! TLS from pgpivot to the nodes: a cluster serving TLS with a certificate
//! signed by a CA this test makes (for 127.0.0.1 only), libpq's `sslmode`
//! meanings for sessions and the monitor, and clear failures, with the
//! reason in `/status`, when a node's certificate or TLS support does not
//! meet its mode.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use pgpivot::admin::status::{report, NodeReport};
use pgpivot::backend_tls::SslMode;
use pgpivot::config::FileConfig;
use pgpivot::localcluster::{ClusterOptions, LocalCluster, ServerCert, SUPERUSER};
use pgpivot::proxy::Proxy;

use common::*;

/// The test's CA and a server certificate it signed, valid for 127.0.0.1
/// only (so `localhost` is the wrong name for `verify-full`).
struct Pki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    server: ServerCert,
    /// A CA that signed nothing here.
    other_ca_file: PathBuf,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = make_ca("pgpivot test CA");
        let (other, _) = make_ca("another CA");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let ca_file = dir.path().join("ca.crt");
        let other_ca_file = dir.path().join("other-ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&other_ca_file, other.pem()).unwrap();
        Pki {
            _dir: dir,
            ca_file,
            other_ca_file,
            server: ServerCert {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
        }
    })
}

fn make_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

/// The cluster of this binary: a primary and a standby with `ssl = on`.
fn tls_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        init_tracing();
        LocalCluster::start(ClusterOptions {
            standbys: 1,
            tls: Some(pki().server.clone()),
            ..ClusterOptions::default()
        })
        .expect("a local PostgreSQL cluster serving TLS")
    })
}

/// A config for `cluster` with `[backend_tls]` set to `mode` and `root`.
fn config(cluster: &LocalCluster, mode: SslMode, root: Option<&PathBuf>) -> FileConfig {
    let mut file = config_for(cluster);
    file.backend_tls.sslmode = mode;
    file.backend_tls.sslrootcert = root.cloned();
    file
}

/// Whether the session behind `client` reached its server over TLS.
async fn session_uses_tls(client: &tokio_postgres::Client) -> bool {
    let row = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

/// How many of the monitor's connections to node `i` use TLS, and how many
/// there are.
async fn monitor_connections(cluster: &LocalCluster, i: usize) -> (i64, i64) {
    let direct = connect_with(&cluster.node(i).conn_string()).await.unwrap();
    let row = direct
        .query_one(
            "select count(*) filter (where s.ssl), count(*) from pg_stat_activity a \
             join pg_stat_ssl s using (pid) where a.application_name = 'pgpivot-monitor'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_sessions_and_monitor_run_over_tls() {
    let cluster = tls_cluster();
    let proxy = start_proxy(config(cluster, SslMode::VerifyFull, Some(&pki().ca_file))).await;
    for addr in &proxy.addresses {
        let client = connect(*addr).await;
        assert!(session_uses_tls(&client).await, "session via {addr}");
        // A large exchange both ways over the backend TLS.
        let row = client
            .query_one(
                "select length(string_agg(md5(g::text), '')), sum(length(repeat('x', g)))::int8 \
                 from generate_series(1, 20000) g",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 640_000);
        let big = "é".repeat(3_000_000);
        let echoed: String = client
            .query_one("select $1::text", &[&big])
            .await
            .unwrap()
            .get(0);
        assert!(echoed == big, "6 MB parameter echoed whole");
    }
    for i in 0..cluster.nodes().len() {
        let (tls, all) = monitor_connections(cluster, i).await;
        assert!(
            all >= 1 && tls == all,
            "node {i}: {tls} of {all} monitor connections use TLS"
        );
    }
    let status = report(&proxy.shared);
    assert!(status
        .nodes
        .iter()
        .all(|n| n.sslmode == "verify-full" && n.last_error.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_is_the_default_and_a_node_may_disable_it() {
    let cluster = tls_cluster();
    let mut file = config_for(cluster);
    file.nodes[1].sslmode = Some(SslMode::Disable);
    let proxy = start_proxy(file).await;
    let primary = connect(proxy.addresses[0]).await;
    assert!(
        session_uses_tls(&primary).await,
        "prefer uses TLS when offered"
    );
    let conn = conn_str(
        proxy.addresses[1],
        SUPERUSER,
        "options='-c pgpivot.target_session_attrs=standby'",
    );
    let standby = connect_with(&conn).await.unwrap();
    assert!(!session_uses_tls(&standby).await, "sslmode=disable on pg2");
    let status = report(&proxy.shared);
    let modes: Vec<&str> = status.nodes.iter().map(|n| n.sslmode.as_str()).collect();
    assert_eq!(modes, ["prefer", "disable"]);
}

/// Starts a proxy that may never find a primary, and waits until node 0 is
/// reported down with a reason.
async fn down_with_reason(file: FileConfig) -> (Proxy, NodeReport) {
    let proxy = Proxy::start(file.validate().unwrap()).await.unwrap();
    let mut last = None;
    let reported = eventually(Duration::from_secs(20), || {
        let status = report(&proxy.shared);
        let node = status.nodes.into_iter().next().unwrap();
        let done = !node.up && node.last_error.is_some();
        last = Some(node);
        async move { done }
    })
    .await;
    let node = last.unwrap();
    assert!(reported, "node 0 was never down with a reason: {node:?}");
    (proxy, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_name() {
    let cluster = tls_cluster();
    let mut file = config(cluster, SslMode::VerifyFull, Some(&pki().ca_file));
    let port = cluster.node(0).address().port();
    // The certificate names 127.0.0.1; the node is configured as localhost.
    file.nodes.truncate(1);
    file.nodes[0].address = format!("localhost:{port}");
    file.failover.hold_timeout_ms = 500;
    let (proxy, node) = down_with_reason(file.clone()).await;
    let reason = node.last_error.unwrap();
    assert!(
        reason.contains("certificate not valid for name \"localhost\""),
        "{reason}"
    );
    let err = connect_with(&conn_str(proxy.addresses[0], SUPERUSER, ""))
        .await
        .expect_err("no write target");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    proxy.shutdown(Duration::from_secs(5)).await;

    // verify-ca checks the chain only: the same node is fine.
    file.nodes[0].sslmode = Some(SslMode::VerifyCa);
    let proxy = start_proxy(file.clone()).await;
    assert!(session_uses_tls(&connect(proxy.addresses[0]).await).await);
    proxy.shutdown(Duration::from_secs(5)).await;

    // A CA that did not sign the certificate fails verify-ca too.
    file.nodes[0].sslrootcert = Some(pki().other_ca_file.clone());
    let (proxy, node) = down_with_reason(file).await;
    let reason = node.last_error.unwrap();
    assert!(reason.contains("certificate"), "{reason}");
    proxy.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_a_server_without_tls() {
    let plain = new_cluster(0);
    let mut file = config(&plain, SslMode::Require, None);
    file.failover.hold_timeout_ms = 500;
    let (proxy, node) = down_with_reason(file).await;
    let reason = node.last_error.unwrap();
    assert!(reason.contains("TLS"), "{reason}");
    let err = connect_with(&conn_str(proxy.addresses[0], SUPERUSER, ""))
        .await
        .expect_err("no node meets sslmode=require");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    proxy.shutdown(Duration::from_secs(5)).await;

    // prefer falls back to plaintext on the same server.
    let proxy = start_proxy(config(&plain, SslMode::Prefer, None)).await;
    assert!(!session_uses_tls(&connect(proxy.addresses[0]).await).await);
}

#[test]
fn verify_modes_need_a_ca_file() {
    let cluster_free = {
        let mut file = FileConfig::default();
        file.nodes
            .push(pgpivot::config::NodeConfig::new("pg1", "127.0.0.1:5432"));
        file.monitor.user = "pgpivot".into();
        file
    };
    let mut file = cluster_free.clone();
    file.backend_tls.sslmode = SslMode::VerifyFull;
    let err = file.validate().expect_err("verify-full without a CA");
    assert!(err.to_string().contains("backend_tls.sslrootcert"), "{err}");
    let mut file = cluster_free;
    file.nodes[0].sslmode = Some(SslMode::VerifyCa);
    file.nodes[0].sslrootcert = Some("/nonexistent/ca.crt".into());
    let err = file.validate().expect_err("a CA file that is not there");
    assert!(err.to_string().contains("nodes[0].sslrootcert"), "{err}");
}

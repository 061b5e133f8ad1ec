//! Reloads (SIGHUP, `POST /reload`): nodes added and removed, invalid
//! configs, concurrent reloads, TLS certificates and listener targets,
//! against a real cluster.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use pgpivot::admin::client::call;
use pgpivot::proxy::Proxy;
use pgpivot::topology::Status;

use common::admin::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_standby_and_an_invalid_reload_changes_nothing() {
    let mut cluster = new_cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &cluster, "");
    let proxy = start_from_file(&path).await;

    // An invalid file is rejected and routing stays as it was.
    std::fs::write(
        &path,
        "[[nodes]]\nname = \"pg1\"\naddress = \"127.0.0.1:1\"\nbogus = 1\n",
    )
    .unwrap();
    let generation = proxy.shared.topology.load().generation;
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bogus"), "{body}");
    assert_eq!(proxy.shared.topology.load().generation, generation);
    assert_eq!(proxy.shared.topology.load().nodes.len(), 3);

    let added = tokio::task::block_in_place(|| cluster.add_standby(0)).unwrap();
    write_config(dir.path(), &cluster, "");
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("pg4"), "{body}");
    let ok = eventually(Duration::from_secs(10), || async {
        proxy
            .shared
            .topology
            .load()
            .nodes
            .get(added)
            .is_some_and(|n| n.status == Status::Standby)
    })
    .await;
    assert!(ok, "the new standby was not picked up");
    // Sessions start landing on it (least sessions first: it has none).
    let mut clients = Vec::new();
    let mut on_new = 0;
    for _ in 0..9 {
        let c = connect(proxy.addresses[1]).await;
        let port: i32 = c
            .query_one("select inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        on_new += usize::from(port == cluster.node(added).port as i32);
        clients.push(c);
    }
    assert!(
        on_new >= 2,
        "only {on_new} of 9 sessions on the new standby"
    );
}

/// The names of the nodes the proxy routes among (removed ones left out),
/// sorted, duplicates kept.
fn live_nodes(proxy: &Proxy) -> Vec<String> {
    let mut names: Vec<String> = proxy
        .shared
        .topology
        .load()
        .nodes
        .iter()
        .filter(|n| n.status != Status::Removed)
        .map(|n| n.name.clone())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_end_with_exactly_the_configured_nodes() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), cluster, "");
    let proxy = start_from_file(&path).await;
    let base: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    // Each round adds some unreachable nodes and removes others; every
    // reload of a round reads the same file, half of them as SIGHUP would
    // (the library call), half through the admin endpoint.
    let rounds: [&[&str]; 4] = [&["x1"], &["x1", "x2"], &["x2"], &[]];
    for extras in rounds {
        let nodes: String = extras
            .iter()
            .map(|n| format!("[[nodes]]\nname = \"{n}\"\naddress = \"127.0.0.1:1\"\n"))
            .collect();
        write_config(dir.path(), cluster, &nodes);
        let mut reloads = tokio::task::JoinSet::new();
        for i in 0..16 {
            let shared = proxy.shared.clone();
            let admin = admin(&proxy);
            reloads.spawn(async move {
                if i % 2 == 0 {
                    shared
                        .reloads
                        .reload()
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    match call(&admin, "POST", "/reload", None).await.unwrap() {
                        (200, _) => Ok(()),
                        (status, body) => Err(format!("HTTP {status}: {body}")),
                    }
                }
            });
        }
        while let Some(result) = reloads.join_next().await {
            result.unwrap().expect("a reload failed while others ran");
        }
        let mut expected: Vec<String> = base.clone();
        expected.extend(extras.iter().map(|n| n.to_string()));
        expected.sort();
        // A reload answers once its node list is published.
        assert_eq!(
            live_nodes(&proxy),
            expected,
            "after reloading with {extras:?}"
        );
    }
}

/// Writes a self-signed certificate for `name` and its key to `cert`/`key`.
fn write_certificate(name: &str, cert: &std::path::Path, key: &std::path::Path) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    std::fs::write(cert, certified.cert.pem()).unwrap();
    std::fs::write(key, certified.key_pair.serialize_pem()).unwrap();
}

/// The DNS names in the certificate a TLS client is shown at `addr`, read
/// with `openssl s_client -starttls postgres` (a real PostgreSQL SSLRequest).
async fn served_certificate(addr: std::net::SocketAddr) -> String {
    let script = format!(
        "openssl s_client -connect {addr} -starttls postgres </dev/null 2>/dev/null | openssl x509 -noout -text"
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_tls_certificate() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    write_certificate("first.example", &cert, &key);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let path = write_config(dir.path(), cluster, &tls);
    let proxy = start_from_file(&path).await;
    let shown = served_certificate(proxy.addresses[0]).await;
    assert!(shown.contains("first.example"), "{shown}");
    write_certificate("second.example", &cert, &key);
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 200, "{body}");
    let shown = served_certificate(proxy.addresses[0]).await;
    assert!(shown.contains("second.example"), "{shown}");
}

/// A listener's target changed by a reload applies to its next session (the
/// accept loop keeps one copy of its settings per config snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_listener_target_applies_to_the_next_session() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), cluster, "");
    let proxy = start_from_file(&path).await;
    let in_recovery = |proxy: &Proxy| {
        let addr = proxy.addresses[1];
        async move {
            let c = connect(addr).await;
            let row = c.query_one("select pg_is_in_recovery()", &[]).await;
            row.unwrap().get::<_, bool>(0)
        }
    };
    assert!(in_recovery(&proxy).await, "target standby");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("target = \"standby\"", "target = \"read-write\"");
    std::fs::write(&path, text).unwrap();
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !in_recovery(&proxy).await,
        "target read-write after the reload"
    );
}

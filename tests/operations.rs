//! Operating pgpivot: pause/resume, graceful shutdown, signals, listener
//! errors and the runtime flavors, against a real cluster. The admin
//! endpoint's own tests are in `admin.rs`, reloads in `reload.rs`.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgpivot::admin::client::call;
use pgpivot::localcluster::{StopMode, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::topology::Status;

use common::admin::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_promote_resume_gives_sessions_started_after_the_pause_no_errors() {
    let cluster = new_cluster(1);
    let proxy = start_proxy(with_admin(config_for(&cluster), None)).await;
    let rw = proxy.addresses[0];
    connect(rw)
        .await
        .batch_execute("create table switch (id bigint primary key)")
        .await
        .unwrap();

    // A client running one transaction per connection, in a loop. pgpivot
    // relays sessions, it does not pool them: a session authenticated on the
    // old primary before the pause cannot move to the new one, so an error
    // there is possible (the server's own 57P01 when it stops). Every session
    // that *starts* after the pause began must see no error at all.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let worker = tokio::spawn({
        let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
        async move {
            let mut id = 0i64;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let started = Instant::now();
                let result = async {
                    let c = connect_with(&conn_str(rw, SUPERUSER, "")).await?;
                    c.execute("insert into switch values ($1)", &[&id]).await
                }
                .await;
                match result {
                    Ok(_) => {
                        acked.lock().unwrap().insert(id);
                    }
                    Err(e) => errors.lock().unwrap().push((started, format!("{e:?}"))),
                }
            }
        }
    });
    // Generous: each insert is a new SCRAM login, slow on a loaded machine.
    assert!(
        eventually(Duration::from_secs(30), || async {
            acked.lock().unwrap().len() >= 20
        })
        .await,
        "the writer never got going: {:?}",
        errors.lock().unwrap()
    );

    let (status, body) = post(&proxy, "/pause?scope=writes&timeout_ms=10000").await;
    // The pause is in force once /pause has answered; a session that
    // started while the request was on its way counts as open before it.
    let paused = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"parked\":true"), "{body}");
    tokio::task::block_in_place(|| {
        cluster.stop_node(0, StopMode::Fast)?;
        cluster.promote(1)
    })
    .unwrap();
    let (status, body) = post(&proxy, "/resume").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"primary\":\"pg2\""), "{body}");

    let resumed_at = acked.lock().unwrap().len();
    assert!(
        eventually(Duration::from_secs(10), || async {
            acked.lock().unwrap().len() >= resumed_at + 20
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    let errors = errors.lock().unwrap().clone();
    let after_pause: Vec<_> = errors.iter().filter(|(at, _)| *at >= paused).collect();
    assert!(
        after_pause.is_empty(),
        "sessions started after the pause saw errors: {after_pause:?}"
    );
    assert!(
        errors.len() <= 1,
        "more than the one session open at the pause failed: {errors:?}"
    );
    let direct = connect_with(&cluster.node(1).conn_string()).await.unwrap();
    let stored: BTreeSet<i64> = direct
        .query("select id from switch", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<_> = acked.lock().unwrap().difference(&stored).copied().collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing on the new primary: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_lets_an_open_transaction_finish() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    // The binary needs fixed ports: pick free ones.
    let (rw, admin_port) = (
        pgpivot::localcluster::free_port(),
        pgpivot::localcluster::free_port(),
    );
    let mut text = format!("[[listeners]]\naddress = \"127.0.0.1:{rw}\"\n");
    for n in cluster.nodes() {
        text.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\naddress = \"{}\"\n",
            n.name,
            n.address()
        ));
    }
    text.push_str(&format!(
        "[monitor]\nuser = \"postgres\"\npassword = \"postgres\"\n[admin]\naddress = \"127.0.0.1:{admin_port}\"\n[log]\nformat = \"json\"\n"
    ));
    let path = dir.path().join("pgpivot.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpivot"))
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Drain the logs (tracing writes to stdout) while the test runs.
    let mut stdout = child.stdout.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text).await;
        text
    });
    let admin_address = format!("127.0.0.1:{admin_port}");
    let ready = eventually(Duration::from_secs(20), || async {
        matches!(
            call(&admin_address, "GET", "/ready", None).await,
            Ok((200, _))
        )
    })
    .await;
    assert!(ready, "pgpivot did not become ready");

    let addr: std::net::SocketAddr = format!("127.0.0.1:{rw}").parse().unwrap();
    let (client, connection) = connect_watched(&conn_str(addr, SUPERUSER, "")).await;
    client
        .batch_execute("create temp table t (x int); begin; insert into t values (1)")
        .await
        .unwrap();
    let pid = child.id().unwrap().to_string();
    // SIGHUP re-reads the file: a node added to it shows up in /status.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n[[nodes]]\nname = \"extra\"\naddress = \"127.0.0.1:1\"\n");
    std::fs::write(&path, text).unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let reloaded = eventually(Duration::from_secs(10), || async {
        let status = call(&admin_address, "GET", "/status", None).await;
        matches!(status, Ok((200, body)) if body.contains("\"extra\""))
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload the configuration");
    // `pgpivot status` prints the same topology as a table.
    let table = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpivot"))
        .args(["status", "--admin", &admin_address])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("primary pg1"), "{table}");
    assert!(table.contains("paused no"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("extra") && l.contains("down")),
        "{table}"
    );
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // The listening socket closes at once: new clients are refused, not
    // left waiting while the open session finishes.
    let refused = eventually(Duration::from_secs(2), || async {
        matches!(
            tokio::net::TcpStream::connect(addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await;
    assert!(
        refused,
        "the listener still accepts connections after SIGTERM"
    );
    // The transaction is allowed to finish...
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(300) {
        client
            .simple_query("select 1")
            .await
            .expect("the open transaction keeps working");
    }
    client
        .batch_execute("insert into t values (2); commit")
        .await
        .unwrap();
    // ...then the session is ended at its idle point with 57P01.
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .unwrap()
        .unwrap();
    let err = ended.expect_err("the session must be ended");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // `log.format = "json"`: one JSON object per line, the session's span
    // carried along, and no query text at info level.
    let logs = logs.await.unwrap();
    assert!(!logs.is_empty());
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(
        logs.contains("\"name\":\"session\""),
        "no session span in the logs:\n{logs}"
    );
    assert!(!logs.contains("insert into t"), "query text in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_sessions_waiting_for_a_node_or_at_a_pause_at_once() {
    let cluster = shared_cluster();
    let mut config = config_for(cluster);
    // Without the primary in the config, read-write sessions wait for one.
    config.nodes.remove(0);
    config.failover.hold_timeout_ms = 60_000;
    let proxy = Proxy::start(config.validate().unwrap()).await.unwrap();
    let standbys = eventually(Duration::from_secs(20), || async {
        let t = proxy.shared.topology.load();
        t.nodes.iter().all(|n| n.status == Status::Standby)
    })
    .await;
    assert!(standbys, "the standbys were not polled");
    let (rw, ro) = (proxy.addresses[0], proxy.addresses[1]);
    let metrics = proxy.shared.metrics.clone();
    let held = tokio::spawn(async move { connect_with(&conn_str(rw, SUPERUSER, "")).await });
    let waiting = eventually(Duration::from_secs(10), || async {
        metrics.sessions_waiting.get() == 1
    })
    .await;
    assert!(
        waiting,
        "the read-write session is not waiting for a primary"
    );
    // A read session would go to a standby, but a pause holds it.
    proxy.shared.pause.set(pgpivot::pause::PauseScope::All);
    let paused = tokio::spawn(async move { connect_with(&conn_str(ro, SUPERUSER, "")).await });
    let both = eventually(Duration::from_secs(10), || async {
        metrics.sessions_active.get() == 2
    })
    .await;
    assert!(both, "the read session did not arrive");

    let started = Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(60)));
    for (what, session) in [("waiting for a primary", held), ("paused", paused)] {
        let outcome = tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .unwrap_or_else(|_| panic!("the session {what} was not ended by the shutdown"))
            .unwrap();
        let err = outcome
            .err()
            .unwrap_or_else(|| panic!("the session {what} connected"));
        assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{what}: {err:?}");
    }
    let left = tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown waited for the held sessions")
        .unwrap();
    assert_eq!(left, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The message field of the first ErrorResponse in `bytes` (a stream of
/// backend messages).
fn first_error_message(mut bytes: &[u8]) -> Option<String> {
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        let (message, rest) = bytes.split_at((1 + len).min(bytes.len()));
        if message[0] == b'E' {
            let mut fields = &message[5..];
            while let Some((&code, tail)) = fields.split_first() {
                let end = tail.iter().position(|&b| b == 0)?;
                if code == b'M' {
                    return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
                }
                fields = &tail[end + 1..];
            }
        }
        bytes = rest;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_losing_its_primary_during_authentication_is_told_once_by_pgpivot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), cluster, "");
    let proxy = start_from_file(&path).await;
    // A client that starts SCRAM and then stays silent.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addresses[0])
        .await
        .unwrap();
    tcp.write_all(&startup_packet(SUPERUSER)).await.unwrap();
    let mut first = [0u8; 1];
    tcp.read_exact(&mut first).await.unwrap();
    assert_eq!(first[0], b'R', "an authentication request");
    // Removing the primary from the config ends that session.
    let primary = &cluster.nodes()[0];
    let block = format!(
        "[[nodes]]\nname = \"{}\"\naddress = \"{}\"\n",
        primary.name,
        primary.address()
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&block));
    std::fs::write(&path, text.replace(&block, "")).unwrap();
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 200, "{body}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
        .await
        .expect("the session was not ended")
        .unwrap();
    let mut stream = first.to_vec();
    stream.extend_from_slice(&rest);
    let message = first_error_message(&stream).expect("an ErrorResponse");
    assert!(message.starts_with("pgpivot: "), "{message}");
    assert_eq!(message.matches("pgpivot").count(), 1, "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_address_in_use_is_reported_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgpivot.toml");
    let text = format!(
        "[[listeners]]\naddress = \"{address}\"\n[[nodes]]\nname = \"pg1\"\naddress = \"127.0.0.1:1\"\n[monitor]\nuser = \"postgres\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpivot"))
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("pgpivot did not exit")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("pgpivot: cannot listen on {address}: ")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The OS error (EADDRINUSE), said once.
    assert_eq!(stderr.matches("already in use").count(), 1, "{stderr}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_listening_socket_at_once() {
    let proxy = proxy().await;
    let rw = proxy.addresses[0];
    // A session in a transaction keeps the shutdown waiting.
    let client = connect(rw).await;
    client.batch_execute("begin").await.unwrap();
    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(30)));
    let started = Instant::now();
    let refused = eventually(Duration::from_secs(2), || async {
        matches!(
            tokio::net::TcpStream::connect(rw).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await;
    assert!(refused, "the listener still accepts connections");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!shutdown.is_finished(), "the session was not waited for");
    client
        .simple_query("select 1")
        .await
        .expect("the open transaction keeps working");
    client.batch_execute("commit").await.unwrap();
    let left = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(left, 0);
}

/// Both `[runtime]` flavors, in-process against the real cluster: sessions
/// spread over the worker threads (`per-core`), a large result relayed
/// whole, a pause that holds a query until the resume, and a graceful
/// shutdown that waits for an open transaction and ends the idle sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_runtime_flavor_relays_pauses_and_shuts_down() {
    use pgpivot::config::{RuntimeConfig, RuntimeFlavor};
    for flavor in [RuntimeFlavor::PerCore, RuntimeFlavor::MultiThread] {
        let mut config = with_admin(config_for(shared_cluster()), None);
        config.runtime = RuntimeConfig { flavor, workers: 2 };
        let proxy = start_proxy(config).await;
        runtime_flavor_round(proxy, flavor).await;
    }
}

async fn runtime_flavor_round(proxy: Proxy, flavor: pgpivot::config::RuntimeFlavor) {
    let rw = proxy.addresses[0];
    let mut watched = Vec::new();
    for _ in 0..4 {
        watched.push(connect_watched(&conn_str(rw, SUPERUSER, "")).await);
    }
    let expected = match flavor {
        pgpivot::config::RuntimeFlavor::PerCore => vec![2, 2],
        pgpivot::config::RuntimeFlavor::MultiThread => Vec::new(),
    };
    assert_eq!(proxy.sessions_per_worker(), expected, "{flavor:?}");

    // 8 MiB in one DataRow, on every session at once.
    let big = 8 << 20;
    let sql = format!("select length(repeat('x', {big})), repeat('x', {big})");
    let answers = watched.iter().map(|(c, _)| c.query_one(sql.as_str(), &[]));
    for row in futures_util::future::join_all(answers).await {
        let row = row.unwrap();
        let (n, text): (i32, String) = (row.get(0), row.get(1));
        assert_eq!((n as usize, text.len()), (big, big), "{flavor:?}");
    }

    let (status, body) = post(&proxy, "/pause?scope=all&timeout_ms=10000").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"parked\":true"), "{flavor:?}: {body}");
    {
        let mut held = std::pin::pin!(watched[0].0.simple_query("select 1"));
        // Bounded look: the query must still be held by the pause.
        let early = tokio::time::timeout(Duration::from_millis(200), &mut held).await;
        assert!(early.is_err(), "{flavor:?}: a query went through a pause");
        let (status, body) = post(&proxy, "/resume").await;
        assert_eq!(status, 200, "{body}");
        tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("the held query ran after the resume")
            .unwrap();
    }

    // One session in a transaction keeps the shutdown waiting; the idle
    // ones are ended at once with 57P01.
    let (open, _) = watched.pop().unwrap();
    open.batch_execute("begin").await.unwrap();
    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(30)));
    for (client, connection) in watched {
        let ended = tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("an idle session was ended by the shutdown")
            .unwrap();
        let err = ended.expect_err("ended with an error");
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("57P01"),
            "{flavor:?}: {err:?}"
        );
        drop(client);
    }
    let refused = eventually(Duration::from_secs(2), || async {
        tokio::net::TcpStream::connect(rw).await.is_err()
    })
    .await;
    assert!(
        refused,
        "{flavor:?}: the listener still accepts connections"
    );
    assert!(
        !shutdown.is_finished(),
        "{flavor:?}: the transaction was not waited for"
    );
    open.simple_query("select 1").await.unwrap();
    open.batch_execute("commit").await.unwrap();
    let left = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the shutdown ended once the transaction did")
        .unwrap();
    assert_eq!(left, 0, "{flavor:?}");
}

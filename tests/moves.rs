//! Sessions survive the cutover: at a crash failover, a planned switchover
//! or a lost standby, open sessions move to an eligible node with their
//! settings, prepared statements and LISTENs, and work in flight gets the
//! error a retry loop expects. Each test breaks its own cluster; the
//! clients are tokio-postgres, psql and pgbench.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpivot::config::{AdminConfig, TlsConfig, TlsMode};
use pgpivot::localcluster::{LocalCluster, StopMode, MD5_USER, PASSWORD, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::routing::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{AsyncMessage, Client, Notification};

use common::*;

/// Everything pgpivot logs in this binary, at debug level: the changed
/// password test checks that no secret is in it. Installed by every test
/// before anything else logs (the harness's own subscriber then stays out).
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Captured;

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pgpivot=debug")
        .with_writer(|| Captured)
        .with_ansi(false)
        .try_init();
}

/// The SCRAM ClientKey of `password` under `verifier`
/// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`), computed
/// as a client does: HMAC(PBKDF2(password, salt, iterations), "Client Key").
fn client_key(password: &str, verifier: &str) -> [u8; 32] {
    use base64::Engine;
    use pgpivot::credentials::scram::hmac_sha256;
    let rest = verifier
        .strip_prefix("SCRAM-SHA-256$")
        .expect("a SCRAM verifier");
    let (iterations_salt, _) = rest.split_once('$').unwrap();
    let (iterations, salt) = iterations_salt.split_once(':').unwrap();
    let salt = base64::engine::general_purpose::STANDARD
        .decode(salt)
        .unwrap();
    let mut u = hmac_sha256(
        password.as_bytes(),
        &[salt.as_slice(), &[0, 0, 0, 1]].concat(),
    );
    let mut salted = u;
    for _ in 1..iterations.parse::<u32>().unwrap() {
        u = hmac_sha256(password.as_bytes(), &u);
        salted.iter_mut().zip(u).for_each(|(s, b)| *s ^= b);
    }
    let key = hmac_sha256(&salted, b"Client Key");
    // Checked against the verifier: StoredKey = H(ClientKey).
    let stored = rest.split_once('$').unwrap().1.split_once(':').unwrap().0;
    let stored = base64::engine::general_purpose::STANDARD
        .decode(stored)
        .unwrap();
    assert_eq!(
        pgpivot::credentials::scram::sha256(&key).as_slice(),
        stored,
        "the ClientKey"
    );
    key
}

/// Runs blocking cluster operations from async tests.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn wait_primary(proxy: &Proxy, id: usize) {
    let ok = eventually(Duration::from_secs(30), || async {
        proxy.shared.topology.load().primary == Some(id)
    })
    .await;
    assert!(ok, "node {id} never became the primary");
}

/// A tokio-postgres session whose notifications are collected.
struct Watched {
    client: Client,
    notes: tokio::sync::mpsc::UnboundedReceiver<Notification>,
    ended: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

async fn open(conn: &str) -> Watched {
    let (client, mut connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .expect("connect through pgpivot");
    let (tx, notes) = tokio::sync::mpsc::unbounded_channel();
    let ended = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message? {
                let _ = tx.send(n);
            }
        }
        Ok(())
    });
    Watched {
        client,
        notes,
        ended,
    }
}

/// A session's settings as the server reports them, and the server's port.
async fn settings_of(
    client: &Client,
) -> Result<(String, String, String, i32), tokio_postgres::Error> {
    let row = client
        .query_one(
            "select current_setting('search_path'), current_setting('application_name'),
                    current_setting('TimeZone'), inet_server_port()",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

fn expected_settings(i: usize) -> (String, String, String) {
    (
        format!("app{i}, public"),
        format!("mover {i}"),
        "Asia/Tokyo".to_string(),
    )
}

/// Gives session `i` state to carry: settings, a prepared statement, a
/// LISTEN. Returns the prepared statement.
async fn give_state(client: &Client, i: usize) -> tokio_postgres::Statement {
    give_settings(client, i).await;
    client
        .batch_execute(&format!("LISTEN chan{i}"))
        .await
        .unwrap();
    client.prepare("select $1::int + 1").await.unwrap()
}

/// The settings and prepared statement of [`give_state`], for a standby
/// (where LISTEN is refused).
async fn give_settings(client: &Client, i: usize) -> tokio_postgres::Statement {
    client
        .batch_execute(&format!(
            "SET search_path TO app{i}, public; SET application_name = 'mover {i}';
             SET TimeZone = 'Asia/Tokyo'"
        ))
        .await
        .unwrap();
    client.prepare("select $1::int + 1").await.unwrap()
}

/// Checks that session `i` is on `port` with its state and its LISTEN.
async fn check_moved(
    w: &mut Watched,
    i: usize,
    stmt: &tokio_postgres::Statement,
    port: u16,
    notifier: &Client,
) {
    let (path, app, tz, on) = settings_of(&w.client)
        .await
        .unwrap_or_else(|e| panic!("session {i} after the move: {e:?}"));
    assert_eq!((path, app, tz), expected_settings(i), "session {i}");
    assert_eq!(on, port as i32, "session {i} is not on the new node");
    let row = w.client.query_one(stmt, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    notifier
        .batch_execute(&format!("NOTIFY chan{i}, 'after the move'"))
        .await
        .unwrap();
    let note = tokio::time::timeout(Duration::from_secs(10), w.notes.recv())
        .await
        .unwrap_or_else(|_| panic!("session {i} got no notification"))
        .unwrap();
    assert_eq!(
        (note.channel(), note.payload()),
        (format!("chan{i}").as_str(), "after the move")
    );
}

/// A psql session fed through a pipe, so that it stays open across the
/// failover.
struct Psql {
    child: tokio::process::Child,
}

impl Psql {
    fn start(cluster: &LocalCluster, addr: std::net::SocketAddr) -> Psql {
        let child = tokio::process::Command::new(cluster.bindir().join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(conn_str(addr, SUPERUSER, ""))
            .env("PGPASSWORD", PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("psql");
        Psql { child }
    }

    async fn send(&mut self, sql: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(sql.as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Reads stdout until it holds `lines` lines.
    async fn read_lines(&mut self, lines: usize) -> Vec<String> {
        let stdout = self.child.stdout.as_mut().unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = 0;
        while seen < lines {
            let mut chunk = [0u8; 64 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, stdout.read(&mut chunk))
                .await
                .expect("psql answered in time")
                .unwrap();
            assert!(n > 0, "psql ended: {}", String::from_utf8_lossy(&out));
            seen += chunk[..n].iter().filter(|&&b| b == b'\n').count();
            out.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_move_through_a_crash_with_their_state() {
    capture_logs();
    let cluster = new_cluster(1);
    // TLS offered: psql (sslmode=prefer) takes it, tokio-postgres (NoTls)
    // stays plaintext.
    let tls = common::tls::TlsFiles::self_signed();
    let mut config = config_for(&cluster);
    config.tls = Some(TlsConfig {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        mode: TlsMode::Prefer,
    });
    let proxy = start_proxy(config).await;
    let rw = proxy.addresses[0];
    let new_port = cluster.node(1).address().port();
    cluster
        .psql(
            0,
            "create table kept (id int); create role mover login password 'postgres'",
        )
        .unwrap();

    // 20 sessions with state, as the superuser (SCRAM) and an md5 role.
    let mut movers = Vec::new();
    for i in 0..20 {
        let user = if i % 5 == 4 { MD5_USER } else { SUPERUSER };
        let w = open(&conn_str(rw, user, "")).await;
        let stmt = give_state(&w.client, i).await;
        movers.push((w, stmt));
    }
    // One idle in a transaction block, one with a temporary table, one whose
    // password changes before the crash, one psql.
    let in_block = open(&conn_str(rw, SUPERUSER, "")).await;
    in_block
        .client
        .batch_execute("BEGIN; INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    let pinned = open(&conn_str(rw, SUPERUSER, "")).await;
    pinned
        .client
        .batch_execute("create temp table scratch (x int)")
        .await
        .unwrap();
    let refused = open(&conn_str(rw, "mover", "")).await;
    refused.client.batch_execute("select 1").await.unwrap();
    let mut psql = Psql::start(&cluster, rw);
    psql.send("SET search_path TO from_psql; SELECT 'ready';\n\\conninfo\n")
        .await;
    // "ready", then \conninfo's two lines.
    let hello = psql.read_lines(3).await;
    assert_eq!(hello[0], "ready");
    assert!(
        hello[2].starts_with("SSL connection"),
        "psql over TLS: {hello:?}"
    );
    // Every session has its credential once its lookup is done.
    let looked_up = eventually(Duration::from_secs(10), || async {
        proxy.shared.metrics.moves.with_credential.get() >= 24
    })
    .await;
    assert!(looked_up);
    let verifier = cluster
        .psql(
            0,
            "select rolpassword from pg_authid where rolname = 'mover'",
        )
        .unwrap();
    let kept_key = client_key(PASSWORD, &verifier);
    cluster
        .psql(0, "alter role mover password 'changed'")
        .unwrap();
    // The standby must have the new password before it is promoted.
    let replayed = eventually(Duration::from_secs(10), || async {
        let conn = cluster.node(1).conn_string_as("mover");
        let c =
            connect_with(&conn.replace(&format!("password={PASSWORD}"), "password=changed")).await;
        c.is_ok()
    })
    .await;
    assert!(replayed, "the standby never replayed the password change");

    // 20 sessions × (3 SETs + LISTEN + a prepared statement), at least.
    let tracked = proxy.shared.metrics.moves.state_bytes.get();
    assert!(tracked > 20 * 100, "tracked state bytes: {tracked}");
    let crashed = Instant::now();
    blocking(|| {
        cluster.stop_node(0, StopMode::Immediate)?;
        cluster.promote(1)
    })
    .unwrap();
    wait_primary(&proxy, 1).await;
    let notifier = connect_with(&cluster.node(1).conn_string()).await.unwrap();
    for (i, (w, stmt)) in movers.iter_mut().enumerate() {
        check_moved(w, i, stmt, new_port, &notifier).await;
    }
    eprintln!(
        "20 sessions checked {:?} after the crash",
        crashed.elapsed()
    );

    // The cancel key a moved session was given at login reaches its new
    // backend.
    let moved = &movers[0].0.client;
    let (slept, took) = cancel_a_sleep(moved, &cluster.node(1).conn_string()).await;
    let e = slept.expect_err("the query was cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert!(took < Duration::from_secs(20));

    // The lost block: 40001, then ROLLBACK works, on the new primary.
    let e = in_block
        .client
        .batch_execute("INSERT INTO kept VALUES (2)")
        .await
        .expect_err("a lost block cannot go on");
    assert_eq!(sqlstate(&e).as_deref(), Some("40001"), "{e:?}");
    let e = in_block
        .client
        .batch_execute("select 1")
        .await
        .expect_err("still failed");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{e:?}");
    in_block.client.batch_execute("ROLLBACK").await.unwrap();
    let (_, _, _, port) = settings_of(&in_block.client).await.unwrap();
    assert_eq!(port, new_port as i32);
    let kept: i64 = notifier
        .query_one("select count(*) from kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 0, "nothing of the lost block may exist");

    // The temp-table session: 57P01 naming the new primary.
    let e = pinned
        .client
        .batch_execute("select 1")
        .await
        .expect_err("pinned");
    let ended = pinned.ended.await.unwrap();
    let e = ended.err().unwrap_or(e);
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    let text = message(&e);
    assert!(
        text.contains("the new primary is pg2") && text.contains("temporary"),
        "{text}"
    );

    // The changed password: 57P01 with the reason, no secret in it.
    let e = refused
        .client
        .batch_execute("select 1")
        .await
        .expect_err("refused");
    let ended = refused.ended.await.unwrap();
    let e = ended.err().unwrap_or(e);
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    let text = message(&e);
    // The kept ClientKey is nowhere: not in the error, the logs, /status or
    // /metrics (in hex or base64).
    let shown = [
        text.clone(),
        String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned(),
        serde_json::to_string(&pgpivot::admin::status::report(&proxy.shared)).unwrap(),
        pgpivot::admin::exposition::render(&proxy.shared),
    ];
    let hex: String = kept_key.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(kept_key)
    };
    for (what, text) in ["error", "logs", "/status", "/metrics"].iter().zip(&shown) {
        assert!(
            !text.contains(&hex) && !text.contains(&b64),
            "the ClientKey is in {what}"
        );
    }
    assert!(shown[1].contains("session moved"), "the logs were captured");
    assert!(
        text.contains("refused the login") && text.contains("28P01"),
        "{text}"
    );

    // psql over TLS: the next command runs on the new primary with its
    // setting, and 8 MB more go through the moved session.
    psql.send("SHOW search_path; SELECT inet_server_port();\n")
        .await;
    assert_eq!(
        psql.read_lines(2).await,
        ["from_psql".to_string(), new_port.to_string()]
    );
    psql.send("COPY (select repeat('x', 1000) from generate_series(1, 8000)) TO STDOUT;\nSELECT 'done';\n")
        .await;
    let copied = psql.read_lines(8001).await;
    assert_eq!(copied.len(), 8001);
    assert!(copied[..8000].iter().all(|l| l.len() == 1000));
    assert_eq!(copied[8000], "done");

    let moves = &proxy.shared.metrics.moves;
    assert!(moves.moved.total() >= 22, "{:?}", moves.moved.get());
    assert_eq!(moves.blocked.get(), [("temp_object", 1)]);
    assert_eq!(moves.failed.get(), [("login", 1)]);
    assert!(moves.move_time.snapshot().count >= 22);
    assert_eq!(moves.moved_listening.get(), 20, "the 20 LISTENing sessions");
    for (w, _) in &movers {
        assert!(!w.ended.is_finished(), "a moved session's connection ended");
    }
    // The promotion's record in /status sums its sessions up.
    let changes = proxy.shared.topology.changes();
    let promotion = changes
        .iter()
        .rev()
        .find(|c| c.kind == "promotion")
        .unwrap();
    assert!(promotion.sessions_moved >= 22, "{promotion:?}");
    let summaries: Vec<String> = changes.iter().map(|c| c.sessions_summary()).collect();
    let all = summaries.join("; ");
    assert!(
        all.contains("temp_object 1") && all.contains("login 1"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_gives_open_sessions_no_errors() {
    capture_logs();
    let cluster = new_cluster(1);
    let mut config = config_for(&cluster);
    config.admin = Some(AdminConfig {
        address: "127.0.0.1:0".into(),
        token: None,
    });
    let proxy = start_proxy(config).await;
    let rw = proxy.addresses[0];
    let admin = proxy.admin_address.unwrap().to_string();
    let new_port = cluster.node(1).address().port();
    cluster.psql(0, "create table ticks (n bigint)").unwrap();

    // pg_terminate_backend on a node that stays up ends just that session,
    // with the server's own 57P01, as without moves.
    let victim = open(&conn_str(rw, SUPERUSER, "")).await;
    victim.client.batch_execute("select 1").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.shared.metrics.moves.with_credential.get() >= 1
        })
        .await
    );
    let pid: i32 = victim
        .client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let direct = connect_with(&cluster.node(0).conn_string()).await.unwrap();
    direct
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), victim.ended)
        .await
        .expect("the terminated session ends")
        .unwrap();
    let e = ended.expect_err("ended with the server's error");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    assert!(message(&e).contains("administrator command"), "{e:?}");
    assert!(proxy.shared.metrics.moves.moved.get().is_empty());

    let mut idle = Vec::new();
    for i in 0..10 {
        let w = open(&conn_str(rw, SUPERUSER, "")).await;
        let stmt = give_state(&w.client, i).await;
        idle.push((w, stmt));
    }
    // A client looping on one session throughout.
    let looper = open(&conn_str(rw, SUPERUSER, "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let looping = tokio::spawn({
        let (stop, done) = (stop.clone(), done.clone());
        async move {
            let insert = looper
                .client
                .prepare("insert into ticks values ($1)")
                .await?;
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                looper.client.execute(&insert, &[&n]).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tokio_postgres::Error>(n)
        }
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            done.load(Ordering::Relaxed) > 20
        })
        .await
    );

    let call = |method: &'static str, path: &'static str| {
        let admin = admin.clone();
        async move {
            pgpivot::admin::client::call(&admin, method, path, None)
                .await
                .unwrap()
        }
    };
    let (status, body) = call("POST", "/pause?scope=writes&timeout_ms=10000").await;
    assert_eq!(status, 200, "{body}");
    blocking(|| {
        cluster.stop_node(0, StopMode::Fast)?;
        cluster.promote(1)
    })
    .unwrap();
    wait_primary(&proxy, 1).await;
    let (status, body) = call("POST", "/resume").await;
    assert_eq!(status, 200, "{body}");

    let at_resume = done.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(20), || async {
            done.load(Ordering::Relaxed) > at_resume + 20 || looping.is_finished()
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);
    let written = looping
        .await
        .unwrap()
        .expect("the looping client saw no error");
    let notifier = connect_with(&cluster.node(1).conn_string()).await.unwrap();
    for (i, (w, stmt)) in idle.iter_mut().enumerate() {
        check_moved(w, i, stmt, new_port, &notifier).await;
    }
    // Every acknowledged insert is on the new primary (a fast shutdown
    // waits for the standby to have everything).
    let stored: i64 = notifier
        .query_one("select count(*) from ticks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, written);
    assert!(proxy.shared.metrics.moves.failed.get().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_sessions_on_a_lost_standby_move_to_another() {
    capture_logs();
    let cluster = new_cluster(2);
    let mut config = config_for(&cluster);
    config.listeners = vec![listener(Target::Standby)];
    let proxy = start_proxy(config).await;
    let ro = proxy.addresses[0];
    // (session number, session, its statement), by standby.
    let mut by_node: Vec<Vec<(usize, Watched, tokio_postgres::Statement)>> =
        vec![Vec::new(), Vec::new()];
    for i in 0..8 {
        let w = open(&conn_str(ro, SUPERUSER, "")).await;
        let stmt = give_settings(&w.client, i).await;
        let (_, _, _, port) = settings_of(&w.client).await.unwrap();
        let node = usize::from(port != cluster.node(1).address().port() as i32);
        by_node[node].push((i, w, stmt));
    }
    assert!(
        !by_node[0].is_empty() && !by_node[1].is_empty(),
        "sessions on both standbys"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.shared.metrics.moves.with_credential.get() >= 8
        })
        .await
    );
    blocking(|| cluster.stop_node(1, StopMode::Immediate)).unwrap();
    let other = cluster.node(2).address().port();
    for (i, w, stmt) in by_node.iter().flatten() {
        let (path, app, tz, port) = settings_of(&w.client)
            .await
            .expect("no error for a read session");
        assert_eq!((path, app, tz), expected_settings(*i), "session {i}");
        assert_eq!(port, other as i32, "session {i}");
        let row = w.client.query_one(stmt, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 2);
    }
    let moved = proxy.shared.metrics.moves.moved.get();
    assert_eq!(
        moved.iter().map(|(_, n)| n).sum::<u64>(),
        by_node[0].len() as u64,
        "{moved:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_retries_survives_a_crash_failover() {
    capture_logs();
    let cluster = new_cluster(1);
    let proxy = start_proxy(config_for(&cluster)).await;
    let rw = proxy.addresses[0];
    let host = rw.ip().to_string();
    let port = rw.port().to_string();
    let base = ["-h", host.as_str(), "-p", port.as_str(), "-U", SUPERUSER];
    let init = run_tool(
        &cluster,
        "pgbench",
        &[&base[..], &["-i", "-s", "1", "-q", "postgres"]].concat(),
    )
    .await;
    assert!(init.status.success(), "{}", text(&init));
    // The standby has the tables before the crash.
    let synced = eventually(Duration::from_secs(20), || async {
        cluster
            .psql(1, "select count(*) from pgbench_branches")
            .ok()
            .as_deref()
            == Some("1")
    })
    .await;
    assert!(synced);

    let bench = tokio::spawn({
        let cluster_bin = cluster.bindir().join("pgbench");
        let args: Vec<String> = [
            &base[..],
            &[
                "-c",
                "8",
                "-j",
                "2",
                "-T",
                "16",
                "-n",
                "--max-tries=5",
                "postgres",
            ],
        ]
        .concat()
        .into_iter()
        .map(str::to_string)
        .collect();
        async move {
            tokio::process::Command::new(cluster_bin)
                .args(args)
                .env("PGPASSWORD", PASSWORD)
                .output()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await; // let pgbench run before the crash
    blocking(|| {
        cluster.stop_node(0, StopMode::Immediate)?;
        cluster.promote(1)
    })
    .unwrap();
    let out = bench.await.unwrap();
    let report = text(&out);
    let aborted = String::from_utf8_lossy(&out.stderr)
        .matches(" aborted ")
        .count();
    let unknown = proxy
        .shared
        .metrics
        .moves
        .in_flight_answered
        .get()
        .iter()
        .filter(|(code, _)| *code == "08007")
        .map(|(_, n)| *n as usize)
        .sum::<usize>();
    eprintln!("pgbench: {aborted} clients aborted, {unknown} answered 08007\n{report}");
    assert!(
        aborted <= unknown,
        "clients aborted for other reasons than an unknown commit: {report}"
    );
    assert!(aborted < 8, "every client aborted: {report}");
    let after: i64 = connect_with(&cluster.node(1).conn_string())
        .await
        .unwrap()
        .query_one("select count(*) from pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(after > 0);
    assert!(proxy.shared.metrics.moves.moved.total() >= (8 - aborted) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_session_past_its_lag_budget_moves_at_its_next_idle_point() {
    capture_logs();
    let cluster = new_cluster(2);
    let mut config = config_for(&cluster);
    let mut reads = listener(Target::Standby);
    reads.max_lag_bytes = Some(64 * 1024);
    reads.on_lag = pgpivot::config::OnLag::Disconnect;
    config.listeners = vec![reads];
    let proxy = start_proxy(config).await;
    let ro = proxy.addresses[0];
    let lagging_port = cluster.node(1).address().port() as i32;
    let mut on_lagging = Vec::new();
    for i in 0..6 {
        let w = open(&conn_str(ro, SUPERUSER, "")).await;
        give_settings(&w.client, i).await;
        let (_, _, _, port) = settings_of(&w.client).await.unwrap();
        if port == lagging_port {
            on_lagging.push((i, w));
        }
    }
    assert!(!on_lagging.is_empty(), "sessions on pg2");
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.shared.metrics.moves.with_credential.get() >= 6
        })
        .await
    );
    // pg2 stops replaying and falls behind by about 2 MB.
    blocking(|| cluster.psql(1, "select pg_wal_replay_pause()")).unwrap();
    blocking(|| {
        cluster.psql(
            0,
            "create table filler (x text); insert into filler select repeat('x', 1000) from generate_series(1, 2000)",
        )
    })
    .unwrap();
    let moved = eventually(Duration::from_secs(20), || async {
        proxy.shared.metrics.moves.moved.total() >= on_lagging.len() as u64
    })
    .await;
    assert!(moved, "{:?}", proxy.shared.metrics.moves.moved.get());
    let other = cluster.node(2).address().port() as i32;
    for (i, w) in &on_lagging {
        let (path, app, tz, port) = settings_of(&w.client)
            .await
            .expect("no error after the move");
        assert_eq!((path, app, tz), expected_settings(*i));
        assert_eq!(
            port, other,
            "session {i} moved to the standby within budget"
        );
    }
    assert_eq!(
        proxy.shared.metrics.moves.moved.get(),
        [("lagging", on_lagging.len() as u64)]
    );
    blocking(|| cluster.psql(1, "select pg_wal_replay_resume()")).unwrap();
}

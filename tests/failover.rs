//! Failover: pgpivot follows promotions it did not make, fences stale
//! primaries, and holds new sessions through the gap. Each test breaks its
//! own cluster.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgpivot::localcluster::{LocalCluster, StopMode, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::topology::Status;

use common::*;

/// Runs blocking cluster operations from async tests.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Waits until pgpivot's topology names node `id` as the primary.
async fn wait_primary(proxy: &Proxy, id: usize, timeout: Duration) -> Duration {
    let started = Instant::now();
    let ok = eventually(timeout, || async {
        proxy.shared.topology.load().primary == Some(id)
    })
    .await;
    assert!(
        ok,
        "node {id} never became primary: {:?}",
        proxy.shared.topology.load().primary
    );
    started.elapsed()
}

/// The port of the server a session through `addr` lands on, and whether it
/// is in recovery.
async fn landing(addr: std::net::SocketAddr) -> Result<(i32, bool), tokio_postgres::Error> {
    let client = connect_with(&conn_str(addr, SUPERUSER, "")).await?;
    let row = client
        .query_one("select inet_server_port(), pg_is_in_recovery()", &[])
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Makes node 0 wait for one synchronous standby, so that every commit it
/// acknowledges is on that standby; returns the standby's index.
fn make_synchronous(cluster: &LocalCluster) -> usize {
    cluster
        .psql(0, "alter system set synchronous_standby_names = '*'")
        .unwrap();
    cluster.psql(0, "select pg_reload_conf()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let name = cluster
            .psql(
                0,
                "select application_name from pg_stat_replication where sync_state = 'sync'",
            )
            .unwrap();
        if let Some(i) = cluster.nodes().iter().position(|n| n.name == name) {
            return i;
        }
        assert!(Instant::now() < deadline, "no synchronous standby");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Inserts a row every `every` through pgpivot, reconnecting after errors,
/// and records which ids were acknowledged and how errors split.
#[derive(Default)]
struct WriterLog {
    acked: BTreeSet<i64>,
    errors_in_flight: usize,
    errors_connect: usize,
    last_ok_before_gap: Option<Instant>,
    first_ok_after_gap: Option<Instant>,
}

fn spawn_writer(
    addr: std::net::SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<WriterLog>>, tokio::task::JoinHandle<()>) {
    let log = Arc::new(Mutex::new(WriterLog::default()));
    let shared = log.clone();
    let task = tokio::spawn(async move {
        let mut client = None;
        let mut id = 0i64;
        let mut in_gap = false;
        while !stop.load(Ordering::Relaxed) {
            if client.is_none() {
                match connect_with(&conn_str(addr, SUPERUSER, "")).await {
                    Ok(c) => client = Some(c),
                    Err(_) => {
                        shared.lock().unwrap().errors_connect += 1;
                        continue;
                    }
                }
            }
            id += 1;
            let sql = "insert into writes (id) values ($1) on conflict do nothing";
            let result = client.as_ref().unwrap().execute(sql, &[&id]).await;
            {
                let mut log = shared.lock().unwrap();
                match result {
                    Ok(_) => {
                        log.acked.insert(id);
                        if in_gap && log.first_ok_after_gap.is_none() {
                            log.first_ok_after_gap = Some(Instant::now());
                        } else if !in_gap {
                            log.last_ok_before_gap = Some(Instant::now());
                        }
                    }
                    Err(_) => {
                        log.errors_in_flight += 1;
                        in_gap = true;
                        client = None;
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    });
    (log, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_failover_keeps_every_acknowledged_write_and_holds_new_sessions() {
    let cluster = new_cluster(2);
    let sync = blocking(|| make_synchronous(&cluster));
    let proxy = start_proxy(config_for(&cluster)).await;
    let rw = proxy.addresses[0];
    connect(rw)
        .await
        .batch_execute("create table writes (id bigint primary key)")
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (log, writer) = spawn_writer(rw, Duration::from_millis(20), stop.clone());
    assert!(
        eventually(Duration::from_secs(10), || async {
            log.lock().unwrap().acked.len() >= 10
        })
        .await
    );

    blocking(|| cluster.stop_node(0, StopMode::Immediate)).unwrap();
    // New sessions opened while there is no primary must wait, not fail.
    let waiting: Vec<_> = (0..5).map(|_| tokio::spawn(landing(rw))).collect();
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.shared.topology.load().primary.is_none()
        })
        .await,
        "the crash was not noticed"
    );
    blocking(|| cluster.promote(sync)).unwrap();
    wait_primary(&proxy, sync, Duration::from_secs(10)).await;
    let new_port = cluster.node(sync).port as i32;
    for w in waiting {
        let (port, in_recovery) = w
            .await
            .unwrap()
            .expect("a held session connects, not fails");
        assert_eq!((port, in_recovery), (new_port, false));
    }

    let before = log.lock().unwrap().acked.len();
    assert!(
        eventually(Duration::from_secs(15), || async {
            log.lock().unwrap().acked.len() > before + 10
        })
        .await,
        "the writer did not resume through the same address"
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let direct = connect_with(&cluster.node(sync).conn_string())
        .await
        .unwrap();
    let stored: BTreeSet<i64> = direct
        .query("select id from writes", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let log = log.lock().unwrap();
    let lost: Vec<_> = log.acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on the new primary: {lost:?}"
    );
    assert!(
        log.errors_in_flight <= 2,
        "only in-flight writes may fail: {}",
        log.errors_in_flight
    );
    assert_eq!(
        log.errors_connect, 0,
        "new sessions must be held, not refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_moves_writes_and_the_old_primary_becomes_a_standby() {
    let cluster = new_cluster(2);
    let proxy = start_proxy(config_for(&cluster)).await;
    let rw = proxy.addresses[0];
    blocking(|| {
        cluster.stop_node(0, StopMode::Fast)?;
        cluster.promote(1)?;
        cluster.rejoin_as_standby(0, 1)
    })
    .unwrap();
    wait_primary(&proxy, 1, Duration::from_secs(10)).await;
    let ok = eventually(Duration::from_secs(10), || async {
        proxy.shared.topology.load().nodes[0].status == Status::Standby
    })
    .await;
    assert!(ok, "the old primary did not come back as a standby");
    let (port, in_recovery) = landing(rw).await.unwrap();
    assert_eq!((port, in_recovery), (cluster.node(1).port as i32, false));
    let client = connect(rw).await;
    client
        .batch_execute("create table after_switchover (x int)")
        .await
        .unwrap();
    // The old primary is now a read target: a standby-only session can land on it.
    let mut seen_old = false;
    for _ in 0..20 {
        let conn = conn_str(
            proxy.addresses[1],
            SUPERUSER,
            "options='-c pgpivot.target_session_attrs=standby'",
        );
        let c = connect_with(&conn).await.unwrap();
        let port: i32 = c
            .query_one("select inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        seen_old |= port == cluster.node(0).port as i32;
    }
    assert!(seen_old, "no read session landed on the rejoined node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_an_old_primary_on_a_lower_timeline_never_gets_writes() {
    let cluster = new_cluster(1);
    // The idle session is to be ended, not moved (whether it could move
    // would depend on its credential lookup having finished; tests/moves.rs
    // covers moves).
    let mut config = config_for(&cluster);
    config.failover.move_sessions = false;
    let proxy = start_proxy(config).await;
    let rw = proxy.addresses[0];
    // A session idle on the primary when it is superseded.
    let (_idle, idle_connection) = connect_watched(&conn_str(rw, SUPERUSER, "")).await;
    let idle_end = tokio::spawn(async move { (idle_connection.await, Instant::now()) });
    blocking(|| cluster.promote(1)).unwrap(); // node 0 keeps running: two primaries
    let promoted = Instant::now();
    wait_primary(&proxy, 1, Duration::from_secs(10)).await;
    let status = proxy.shared.topology.load().nodes[0].status;
    assert!(
        matches!(
            status,
            Status::StalePrimary {
                timeline: 1,
                current: 2
            }
        ),
        "{status:?}"
    );

    // The idle session was ended with 57P01 naming the new primary, within
    // one monitor interval (100 ms here) of the promotion, plus slack for a
    // debug build on a loaded machine.
    let (ended, at) = tokio::time::timeout(Duration::from_secs(5), idle_end)
        .await
        .expect("the idle session on the old primary was not ended")
        .unwrap();
    let err = ended
        .unwrap()
        .expect_err("the session must end with an error");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    assert!(message(&err).contains("pg2"), "{}", message(&err));
    let after = at.saturating_duration_since(promoted);
    eprintln!("idle session on the old primary ended {after:?} after pg_ctl promote returned");
    assert!(
        after <= Duration::from_millis(600),
        "ended {after:?} after the promotion"
    );

    for _ in 0..20 {
        let (port, _) = landing(rw).await.unwrap();
        assert_eq!(
            port,
            cluster.node(1).port as i32,
            "a write session went to the stale primary"
        );
    }
    // Restarting the old primary keeps it on its old timeline: still fenced off.
    blocking(|| {
        cluster.stop_node(0, StopMode::Immediate)?;
        cluster.start_node(0)
    })
    .unwrap();
    let stale = eventually(Duration::from_secs(10), || async {
        matches!(
            proxy.shared.topology.load().nodes[0].status,
            Status::StalePrimary { .. }
        )
    })
    .await;
    assert!(stale);
    for _ in 0..10 {
        let (port, _) = landing(rw).await.unwrap();
        assert_eq!(port, cluster.node(1).port as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_primary_new_sessions_are_held_then_refused_with_57p03() {
    let cluster = new_cluster(1);
    let mut config = config_for(&cluster);
    config.failover.hold_timeout_ms = 1500;
    let proxy = start_proxy(config).await;
    blocking(|| cluster.stop_node(0, StopMode::Immediate)).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.shared.topology.load().primary.is_none()
        })
        .await
    );
    let started = Instant::now();
    let err = connect_with(&conn_str(proxy.addresses[0], SUPERUSER, ""))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    assert!(message(&err).contains("no primary"), "{}", message(&err));
    assert!(
        waited >= Duration::from_millis(1400),
        "did not hold: {waited:?}"
    );
    // Reads still work while writes are held.
    let (port, in_recovery) = landing(proxy.addresses[1]).await.unwrap();
    assert_eq!((port, in_recovery), (cluster.node(1).port as i32, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_promoting_is_followed() {
    let cluster = new_cluster_with(3, vec!["promote_trigger_file = 'promote.trigger'".into()]);
    let proxy = start_proxy(config_for(&cluster)).await;
    // pg_ctl promote
    blocking(|| {
        cluster.stop_node(0, StopMode::Immediate)?;
        cluster.promote(1)
    })
    .unwrap();
    wait_primary(&proxy, 1, Duration::from_secs(10)).await;
    // SELECT pg_promote()
    blocking(|| cluster.stop_node(1, StopMode::Immediate)).unwrap();
    blocking(|| cluster.psql(2, "select pg_promote()")).unwrap();
    wait_primary(&proxy, 2, Duration::from_secs(10)).await;
    // The trigger file of classic streaming-replication setups.
    blocking(|| cluster.stop_node(2, StopMode::Immediate)).unwrap();
    let trigger = cluster.node(3).data_dir.join("promote.trigger");
    std::fs::write(&trigger, b"").unwrap();
    wait_primary(&proxy, 3, Duration::from_secs(15)).await;
    let (port, in_recovery) = landing(proxy.addresses[0]).await.unwrap();
    assert_eq!((port, in_recovery), (cluster.node(3).port as i32, false));
}

/// Resumes stopped processes even if the test fails.
struct Frozen(Vec<String>);

impl Frozen {
    fn node(cluster: &LocalCluster, i: usize) -> Frozen {
        let pidfile =
            std::fs::read_to_string(cluster.node(i).data_dir.join("postmaster.pid")).unwrap();
        let postmaster = pidfile.lines().next().unwrap().trim().to_string();
        let children = std::process::Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .unwrap();
        let mut pids = vec![postmaster];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
        let status = std::process::Command::new("kill")
            .arg("-STOP")
            .args(&pids)
            .status()
            .unwrap();
        assert!(status.success());
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .args(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_is_detected_by_the_poll_timeout() {
    let cluster = new_cluster(1);
    let mut config = config_for(&cluster);
    config.monitor.interval_ms = 100;
    config.monitor.timeout_ms = 500;
    // Its session is to be ended, not held for a move to a primary that
    // never comes (tests/moves.rs covers moves).
    config.failover.move_sessions = false;
    let (interval, timeout, failures) = (100, 500, config.monitor.failures as u64);
    let proxy = start_proxy(config).await;
    let idle = connect(proxy.addresses[0]).await;
    let frozen = Frozen::node(&cluster, 0);
    let started = Instant::now();
    let noticed = eventually(Duration::from_secs(10), || async {
        proxy.shared.topology.load().nodes[0].status == Status::Down
    })
    .await;
    let took = started.elapsed();
    assert!(noticed, "a SIGSTOPped primary was never marked down");
    // Each failed poll costs at most one interval plus one timeout.
    let bound = Duration::from_millis(failures * (interval + timeout) + 300);
    assert!(took <= bound, "detection took {took:?}, bound {bound:?}");
    eprintln!("hung primary detected in {took:?} (interval {interval} ms, timeout {timeout} ms, failures {failures})");
    // Its sessions are ended by pgpivot, not left hanging with the server.
    let err = tokio::time::timeout(Duration::from_secs(5), idle.simple_query("select 1"))
        .await
        .expect("the session on the hung primary was not ended")
        .unwrap_err();
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keeps_working_for_sessions_from_before_a_topology_change() {
    let cluster = new_cluster(2);
    let proxy = start_proxy(config_for(&cluster)).await;
    let standby_only = conn_str(
        proxy.addresses[1],
        SUPERUSER,
        "options='-c pgpivot.target_session_attrs=standby'",
    );
    let client = connect_with(&standby_only).await.unwrap();
    let row = client
        .query_one("select inet_server_port(), pg_backend_pid()", &[])
        .await
        .unwrap();
    let (port, pid): (i32, i32) = (row.get(0), row.get(1));
    let mine = cluster
        .nodes()
        .iter()
        .position(|n| n.port as i32 == port)
        .unwrap();
    let other = cluster
        .nodes()
        .iter()
        .position(|n| n.port as i32 != port && n.name != "pg1")
        .unwrap();
    let token = client.cancel_token();
    let generation = proxy.shared.topology.load().generation;
    // Another standby goes away: a new generation, this session unaffected.
    blocking(|| cluster.stop_node(other, StopMode::Immediate)).unwrap();
    let changed = eventually(Duration::from_secs(10), || async {
        proxy.shared.topology.load().generation > generation
    })
    .await;
    assert!(changed);
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    wait_running(&cluster.node(mine).conn_string(), pid).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("cancelled within 5 s")
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_tries_another_standby_when_its_pick_refuses() {
    let cluster = new_cluster(2);
    let mut config = config_for(&cluster);
    // A slow, patient monitor: the dead standby stays "up" in the topology
    // for the whole test (its refused connect pokes the monitor, but a poll
    // or two is below `monitor.failures`), so only the session's own retry
    // can avoid it. A heavy weight makes pg2 the first pick.
    config.monitor.interval_ms = 5_000;
    config.monitor.failures = 5;
    config.nodes[1].weight = 10;
    let proxy = start_proxy(config).await;
    blocking(|| cluster.stop_node(1, StopMode::Immediate)).unwrap();
    let standby_only = conn_str(
        proxy.addresses[1],
        SUPERUSER,
        "options='-c pgpivot.target_session_attrs=standby'",
    );
    let client = connect_with(&standby_only).await.unwrap();
    let row = client
        .query_one("select inet_server_port()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), cluster.node(2).port as i32);
    assert_eq!(
        proxy.shared.topology.load().nodes[1].status,
        Status::Standby,
        "the monitor noticed too early for this test to mean anything"
    );
    assert_eq!(
        proxy.shared.metrics.sessions_held.get(),
        0,
        "the session waited"
    );
}

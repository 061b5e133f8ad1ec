//! A fault matrix, with figures: one test per fault, each printing one
//! `fault: <name>: <figure>` line (run with `--nocapture` to see them) and
//! asserting the invariants with generous deadlines.
//!
//! # How the faults are made
//!
//! Partitions must drop packets silently (no FIN, no RST), as a real
//! network partition does. Every node of the test cluster listens on its own
//! port of 127.0.0.1, so a partition is an nftables table of our own with an
//! `output` chain that drops every loopback packet to or from one port
//! (`oifname "lo" tcp dport P drop; oifname "lo" tcp sport P drop`). The
//! kernel then drops that node's packets both ways: the monitor's polls, the
//! sessions' backend connections and anything else on that port, exactly as
//! a cut link would (the test's own direct connections to the node are cut
//! too, so the checks on a partitioned node run after the heal). The same
//! rule on a client's ephemeral port makes a client vanish without a FIN.
//! Network namespaces with veth pairs would also work, but would need a
//! PostgreSQL node inside a namespace; the loopback rule is as real a drop
//! and has no moving parts. Each table is named
//! `pgpivot_faults_<pid>_<n>` and removed by an RAII guard (also on panic);
//! tables left by a run that was killed are removed at the next run.
//!
//! A backend that accepts TCP but never answers is a forwarder in the test
//! that relays to a real standby (so the monitor first sees a healthy
//! standby and sessions are routed to it) and then turns silent: it keeps
//! accepting, keeps every socket open and never sends another byte.
//!
//! Partitions need root and `nft` (`.ci/run` installs nftables). Without
//! them those tests print why and pass, unless `CI` is set: then they fail.
//!
//! Every test also checks that the proxy released what it used: the open
//! files of this process (sockets, pipes, files; see `open_fds` for what is
//! left out and why) and tokio's alive tasks return to their values from
//! before the proxy started, once it is shut down. The tests run one at a
//! time (a partition of the shared cluster's primary would disturb a
//! neighbour, and the fd count is per process).

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpivot::config::{FileConfig, ListenerConfig, NodeConfig};
use pgpivot::localcluster::{LocalCluster, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::routing::Target;
use pgpivot::topology::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use common::*;

/// One test at a time (see the module doc). A tokio mutex: it is held
/// across awaits, and a panicking test does not poison it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------
// Partitions: nftables drop rules on loopback ports.
// ---------------------------------------------------------------------

const TABLE_PREFIX: &str = "pgpivot_faults_";

fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all_sync(script.as_bytes())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

trait WriteAllSync {
    fn write_all_sync(self, bytes: &[u8]) -> Result<(), String>;
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, bytes: &[u8]) -> Result<(), String> {
        std::io::Write::write_all(&mut self, bytes).map_err(|e| e.to_string())
    }
}

/// Whether this machine can make partitions; the reason when not.
fn partitions_available() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Err("not running as root (nftables rules need CAP_NET_ADMIN)".into());
    }
    remove_stale_tables();
    let probe = format!("{TABLE_PREFIX}{}_probe", std::process::id());
    nft(&format!(
        "add table inet {probe}\ndelete table inet {probe}\n"
    ))
}

/// Removes tables left by runs that were killed before their guards ran.
fn remove_stale_tables() {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(TABLE_PREFIX)
            .and_then(|rest| rest.split('_').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = nft(&format!("delete table inet {name}\n"));
        }
    }
}

/// True when the test may go on; false (after saying why) when it is
/// skipped. Under CI a missing capability fails the test instead.
fn can_partition(fault: &str) -> bool {
    match partitions_available() {
        Ok(()) => true,
        Err(reason) if std::env::var_os("CI").is_some() => {
            panic!("fault: {fault}: cannot make partitions under CI: {reason}")
        }
        Err(reason) => {
            eprintln!("fault: {fault}: skipped: {reason}");
            false
        }
    }
}

/// Loopback packets to and from some ports are dropped while this lives.
struct Partition {
    table: String,
    healed: bool,
}

impl Partition {
    fn cut(ports: &[u16]) -> Partition {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let table = format!(
            "{TABLE_PREFIX}{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut script = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0; policy accept; }}\n"
        );
        for port in ports {
            script.push_str(&format!(
                "add rule inet {table} out oifname \"lo\" tcp dport {port} drop\n\
                 add rule inet {table} out oifname \"lo\" tcp sport {port} drop\n"
            ));
        }
        nft(&script).expect("install the partition");
        Partition {
            table,
            healed: false,
        }
    }

    fn heal(&mut self) {
        if !self.healed {
            self.healed = true;
            if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
                eprintln!("fault: cannot remove nftables table {}: {e}", self.table);
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}

/// TCP sockets of this network namespace towards `port` that still hold
/// unsent or unacknowledged data, or a FIN not yet acknowledged: what a
/// healed link could still deliver to that server.
fn undelivered_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = f
                .get(2)
                .and_then(|a| a.split(':').nth(1))
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let state = f.get(3).copied().unwrap_or("");
            let tx_queue = f
                .get(4)
                .and_then(|q| q.split(':').next())
                .and_then(|q| u64::from_str_radix(q, 16).ok())
                .unwrap_or(0);
            // 04 FIN_WAIT1, 0B CLOSING.
            remote_port == Some(port) && (tx_queue > 0 || state == "04" || state == "0B")
        })
        .count()
}

// ---------------------------------------------------------------------
// Resources: fds and tasks back to baseline.
// ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Resources {
    fds: usize,
    tasks: usize,
}

fn resources() -> Resources {
    Resources {
        fds: open_fds(),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
    }
}

/// Open files of this process: the distinct objects its descriptors point
/// at (sockets, pipes, files), anonymous inodes left out. While a test
/// runs, the harness starts the next test's thread and with it that test's
/// tokio runtime (an epoll and an eventfd, and a dup of the process-wide
/// signal socket), and drops the previous one's: neither the anonymous
/// inodes nor a second descriptor of the same socket say anything about
/// this test. The listing's own directory handle counts equally every time.
fn open_fds() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|target| !target.to_string_lossy().starts_with("anon_inode:"))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Shuts the proxy down and waits until fds and tasks are back at `base`.
/// No slack: every socket and task the proxy or the test opened is gone.
async fn stop_and_check(fault: &str, proxy: Proxy, base: Resources) {
    let left = proxy.shutdown(Duration::from_secs(5)).await;
    assert_eq!(left, 0, "{fault}: sessions still open at shutdown");
    let released = eventually(Duration::from_secs(10), || async {
        let now = resources();
        now.fds <= base.fds && now.tasks <= base.tasks
    })
    .await;
    let now = resources();
    assert!(
        released,
        "{fault}: not released: fds {} → {}, tasks {} → {}",
        base.fds, now.fds, base.tasks, now.tasks
    );
}

// ---------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------

fn cluster() -> &'static LocalCluster {
    tokio::task::block_in_place(shared_cluster)
}

/// Fast timings: faults are noticed within about a second.
fn fast_config(cluster: &LocalCluster) -> FileConfig {
    let mut file = config_for(cluster);
    file.monitor.interval_ms = 100;
    file.monitor.timeout_ms = 500;
    file.monitor.failures = 2;
    file.failover.hold_timeout_ms = 3_000;
    file.limits.connect_timeout_ms = 1_000;
    file.limits.startup_timeout_ms = 2_000;
    file.limits.tcp_keepalive_s = 1;
    // These figures are for sessions ended at a fault, as without moves
    // (`move_sessions = false`); tests/moves.rs covers sessions that move.
    file.failover.move_sessions = false;
    file
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Waits until node `id` is down in pgpivot's topology; the time it took.
async fn wait_down(proxy: &Proxy, id: usize, since: Instant, timeout: Duration) -> Duration {
    let down = eventually(timeout, || async {
        proxy.shared.topology.load().nodes[id].status == Status::Down
    })
    .await;
    assert!(down, "node {id} was never marked down");
    since.elapsed()
}

/// The port of the server a client is connected to.
async fn server_port(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    let row = client.query_one("select inet_server_port()", &[]).await?;
    Ok(row.get(0))
}

/// A watched client's end: when its connection task finished, and with what.
type Told = tokio::task::JoinHandle<(Instant, Option<String>, String)>;

/// Resolves when the watched connection ends: its end time and SQLSTATE.
fn watch_end(connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>) -> Told {
    tokio::spawn(async move {
        let result = connection.await.expect("connection task");
        let text = result
            .as_ref()
            .map_or_else(|e| e.to_string(), |()| "closed".into());
        (
            Instant::now(),
            result.err().and_then(|e| sqlstate(&e)),
            text,
        )
    })
}

/// Runs `sql` through `client` every 10 ms until `stop`; returns the
/// number of queries, the errors and the slowest round trip.
fn keep_querying(
    client: tokio_postgres::Client,
    sql: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>, Duration)> {
    tokio::spawn(async move {
        let (mut n, mut errors, mut slowest) = (0, Vec::new(), Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            match client.batch_execute(sql).await {
                Ok(()) => n += 1,
                Err(e) => errors.push(e.to_string()),
            }
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (n, errors, slowest)
    })
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
fn error_code(body: &[u8]) -> Option<String> {
    body.split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

/// Reads one backend message: its tag and body.
async fn read_message(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    stream.read_exact(&mut body).await?;
    Ok((header[0], body))
}

// ---------------------------------------------------------------------
// 1. Partition between pgpivot and the primary.
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_from_the_primary() {
    const FAULT: &str = "primary partition";
    let _serial = SERIAL.lock().await;
    if !can_partition(FAULT) {
        return;
    }
    let cluster = cluster();
    let primary_port = cluster.node(0).port;
    let admin = connect_with(&cluster.node(0).conn_string()).await.unwrap();
    admin
        .batch_execute("create table if not exists fault_writes (seq int); truncate fault_writes")
        .await
        .unwrap();
    drop(admin);

    let base = resources();
    let proxy = start_proxy(fast_config(cluster)).await;
    let rw = proxy.addresses[0];
    let app = "application_name=fault_primary";
    // A session writing in a loop, and an idle one.
    let (writer, writer_conn) = connect_watched(&conn_str(rw, SUPERUSER, app)).await;
    let (idle, idle_conn) = connect_watched(&conn_str(rw, SUPERUSER, app)).await;
    idle.batch_execute("select 1").await.unwrap();
    let idle_told = watch_end(idle_conn);
    let writer_told = watch_end(writer_conn);
    let (acked_tx, acked_rx) = tokio::sync::watch::channel(0i32);
    let writing = tokio::spawn(async move {
        let mut seq = 0i32;
        loop {
            seq += 1;
            // A simple query: the message in flight at the cut is the
            // write itself (an extended query would prepare first).
            let result = writer
                .batch_execute(&format!("insert into fault_writes values ({seq})"))
                .await;
            match result {
                Ok(_) => {
                    acked_tx.send_replace(seq);
                }
                Err(e) => return (Instant::now(), sqlstate(&e), seq),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut acked = acked_rx.clone();
    acked.wait_for(|&n| n >= 5).await.unwrap();

    let mut partition = Partition::cut(&[primary_port]);
    let cut = Instant::now();
    let detection = wait_down(&proxy, 0, cut, Duration::from_secs(10)).await;
    assert_eq!(proxy.shared.topology.load().primary, None);
    let (told_at, code, failed_seq) = tokio::time::timeout(Duration::from_secs(10), writing)
        .await
        .expect("the writing session was never told")
        .unwrap();
    let code = code.expect("the writing session got an ErrorResponse");
    assert!(
        code == "57P01" || code == "08006",
        "writing session ended with {code}"
    );
    let (idle_at, idle_code, _) = tokio::time::timeout(Duration::from_secs(10), idle_told)
        .await
        .expect("the idle session was never told")
        .unwrap();
    let idle_code = idle_code.expect("the idle session got an ErrorResponse");
    assert!(idle_code == "57P01" || idle_code == "08006", "{idle_code}");
    let _ = writer_told.await;
    // A new read-write session meanwhile is held (no primary), not sent to
    // the partitioned node; it connects once the link heals or gets 57P03.
    let held_started = Instant::now();
    let held_conn = conn_str(rw, SUPERUSER, app);
    let held = tokio::spawn(async move { connect_with(&held_conn).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a new session was not held");

    let queued_at_heal = undelivered_to(primary_port);
    partition.heal();
    let healed = Instant::now();
    let held = held.await.unwrap();
    let held_for = held_started.elapsed();
    let held_outcome = match &held {
        Ok(c) => {
            assert_eq!(server_port(c).await.unwrap(), primary_port as i32);
            "connected after the heal".to_string()
        }
        Err(e) => {
            assert_eq!(sqlstate(e).as_deref(), Some("57P03"), "{e}");
            "57P03".to_string()
        }
    };
    drop(held);
    // Nothing that was queued towards the primary when the session was told
    // may reach it after the heal: wait until no socket of ours still holds
    // data for it, then count the rows past the last acknowledged one.
    let drained = eventually(Duration::from_secs(20), || async {
        undelivered_to(primary_port) == 0
    })
    .await;
    assert!(
        drained,
        "data for the primary still queued 20 s after the heal"
    );
    let last_acked = *acked_rx.borrow();
    let observer = connect_with(&cluster.node(0).conn_string()).await.unwrap();
    let late: i64 = observer
        .query_one(
            "select count(*) from fault_writes where seq > $1",
            &[&last_acked],
        )
        .await
        .unwrap()
        .get(0);
    // The sessions' backends never heard of the end (the RST was dropped):
    // end them so that they do not linger in the shared cluster.
    observer
        .batch_execute(
            "select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name = 'fault_primary'",
        )
        .await
        .unwrap();
    drop(observer);
    assert_eq!(
        late, 0,
        "the statement in flight at the partition (seq {failed_seq}) reached the primary \
         after its session was ended"
    );
    println!(
        "fault: {FAULT}: detected (node down) in {} ms; writing session told {code} after {} ms, \
         idle session {idle_code} after {} ms; new session held {} ms ({held_outcome}, heal at {} ms); \
         {queued_at_heal} sockets with data queued for it at the heal, 0 late writes on it",
        ms(detection),
        ms(told_at - cut),
        ms(idle_at - cut),
        ms(held_for),
        ms(healed - cut),
    );
    stop_and_check(FAULT, proxy, base).await;
}

// ---------------------------------------------------------------------
// 2. Partition between pgpivot and one standby.
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_from_a_standby() {
    const FAULT: &str = "standby partition";
    let _serial = SERIAL.lock().await;
    if !can_partition(FAULT) {
        return;
    }
    let cluster = cluster();
    let (p0, p1, p2) = (
        cluster.node(0).port as i32,
        cluster.node(1).port as i32,
        cluster.node(2).port as i32,
    );
    let base = resources();
    let proxy = start_proxy(fast_config(cluster)).await;
    let (rw, read) = (proxy.addresses[0], proxy.addresses[1]);
    let app = "application_name=fault_standby";

    // A read session on each standby (round robin places them).
    let mut on_cut = None;
    let mut on_other = None;
    for _ in 0..20 {
        let (client, conn) = connect_watched(&conn_str(read, SUPERUSER, app)).await;
        match server_port(&client).await.unwrap() {
            p if p == p1 && on_cut.is_none() => on_cut = Some((client, conn)),
            p if p == p2 && on_other.is_none() => on_other = Some((client, conn)),
            _ => {}
        }
        if on_cut.is_some() && on_other.is_some() {
            break;
        }
    }
    let (cut_client, cut_conn) = on_cut.expect("a session on the first standby");
    let (other_client, other_conn) = on_other.expect("a session on the second standby");
    let cut_told = watch_end(cut_conn);
    let other_told = watch_end(other_conn);
    let stop = Arc::new(AtomicBool::new(false));
    let primary_client = connect(rw).await;
    assert_eq!(server_port(&primary_client).await.unwrap(), p0);
    let on_primary = keep_querying(primary_client, "select 1", stop.clone());
    let on_standby = keep_querying(other_client, "select 1", stop.clone());

    let mut partition = Partition::cut(&[p1 as u16]);
    let cut = Instant::now();
    // A session that starts at once may still be routed to the cut node
    // (not down yet): it must land elsewhere within the connect timeout.
    let first = Instant::now();
    let early = connect_with(&conn_str(read, SUPERUSER, app)).await.unwrap();
    let early_connect = first.elapsed();
    let early_port = server_port(&early).await.unwrap();
    drop(early);
    let detection = wait_down(&proxy, 1, cut, Duration::from_secs(10)).await;
    let (told_at, code, text) = tokio::time::timeout(Duration::from_secs(10), cut_told)
        .await
        .expect("the session on the cut standby was never told")
        .unwrap();
    assert_eq!(
        code.as_deref(),
        Some("08006"),
        "session on the cut standby: {text}"
    );
    drop(cut_client);
    let mut later_ports = Vec::new();
    for _ in 0..4 {
        let c = connect_with(&conn_str(read, SUPERUSER, app)).await.unwrap();
        later_ports.push(server_port(&c).await.unwrap());
    }
    assert!(
        !other_told.is_finished(),
        "the other standby's session ended"
    );
    stop.store(true, Ordering::Relaxed);
    let (n_primary, errors_primary, slowest_primary) = on_primary.await.unwrap();
    let (n_standby, errors_standby, slowest_standby) = on_standby.await.unwrap();
    partition.heal();

    drop(other_told);
    assert_ne!(
        early_port, p1,
        "a new session was placed on the cut standby"
    );
    assert!(
        early_connect < Duration::from_millis(1_000 + 2_000),
        "a new session took {early_connect:?}"
    );
    assert!(!later_ports.contains(&p1), "{later_ports:?}");
    assert!(
        errors_primary.is_empty(),
        "primary session: {errors_primary:?}"
    );
    assert!(
        errors_standby.is_empty(),
        "other standby: {errors_standby:?}"
    );
    assert!(n_primary > 0 && n_standby > 0);
    // Generous: 2 shared cores; a hiccup is not a failure, a stall is.
    assert!(
        slowest_primary < Duration::from_secs(1),
        "{slowest_primary:?}"
    );
    assert!(
        slowest_standby < Duration::from_secs(1),
        "{slowest_standby:?}"
    );
    let back = eventually(Duration::from_secs(10), || async {
        proxy.shared.topology.load().nodes[1].status == Status::Standby
    })
    .await;
    assert!(back, "the standby did not come back after the heal");
    let observer = connect_with(&cluster.node(1).conn_string()).await.unwrap();
    observer
        .batch_execute(
            "select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name = 'fault_standby'",
        )
        .await
        .unwrap();
    drop(observer);
    println!(
        "fault: {FAULT}: detected (node down) in {} ms; its read session told {} after {} ms; \
         a session started at the cut connected elsewhere in {} ms; primary session {} queries, \
         other standby {} queries, 0 errors, slowest {} ms / {} ms",
        ms(detection),
        code.unwrap_or_default(),
        ms(told_at - cut),
        ms(early_connect),
        n_primary,
        n_standby,
        ms(slowest_primary),
        ms(slowest_standby),
    );
    stop_and_check(FAULT, proxy, base).await;
}

// ---------------------------------------------------------------------
// 3. A client that vanishes without a FIN.
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishes_without_fin() {
    const FAULT: &str = "vanished client";
    let _serial = SERIAL.lock().await;
    if !can_partition(FAULT) {
        return;
    }
    let cluster = cluster();
    let base = resources();
    let config = fast_config(cluster);
    let keepalive = Duration::from_secs(config.limits.tcp_keepalive_s);
    let proxy = start_proxy(config).await;
    let rw = proxy.addresses[0];
    let observer = connect_with(&cluster.node(0).conn_string()).await.unwrap();
    // Two clients: one idle, one whose query's answer is on its way when
    // it vanishes (pgpivot then holds unacknowledged data for it, and
    // keepalive alone would not probe).
    let idle = RawClient::connect(rw).await;
    let busy = RawClient::connect(rw).await;
    let busy_query = {
        let client = busy.client.clone();
        tokio::spawn(async move {
            let _ = client
                .simple_query("select pg_sleep(0.5), repeat('x', 200000)")
                .await;
        })
    };
    wait_running(&cluster.node(0).conn_string(), busy.pid).await;
    let gauge = || proxy.shared.metrics.sessions_active.get();
    assert_eq!(gauge(), 2);

    // The clients' packets are dropped from now on; then they go away
    // (their FINs are dropped too).
    let _partition = Partition::cut(&[idle.port, busy.port]);
    let cut = Instant::now();
    let (idle_pid, busy_pid) = (idle.pid, busy.pid);
    idle.vanish().await;
    busy.vanish().await;
    busy_query.abort();

    let deadline = Duration::from_secs(30);
    let gone = |pid: i32| {
        let observer = &observer;
        async move {
            let row = observer
                .query_one(
                    "select count(*) from pg_stat_activity where pid = $1",
                    &[&pid],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0) == 0
        }
    };
    let mut idle_gone = None;
    let mut busy_gone = None;
    let mut gauge_zero = None;
    let all = loop {
        if idle_gone.is_none() && gone(idle_pid).await {
            idle_gone = Some(cut.elapsed());
        }
        if busy_gone.is_none() && gone(busy_pid).await {
            busy_gone = Some(cut.elapsed());
        }
        if gauge_zero.is_none() && gauge() == 0 {
            gauge_zero = Some(cut.elapsed());
        }
        if idle_gone.is_some() && busy_gone.is_some() && gauge_zero.is_some() {
            break true;
        }
        if cut.elapsed() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        all,
        "not reaped within {deadline:?}: idle backend {idle_gone:?}, busy backend \
         {busy_gone:?}, sessions gauge {} ({gauge_zero:?})",
        gauge()
    );
    drop(observer);
    let (idle_gone, busy_gone, gauge_zero) =
        (idle_gone.unwrap(), busy_gone.unwrap(), gauge_zero.unwrap());
    // What net.rs sets: first probe after `keepalive` of silence, then
    // every max(keepalive / 4, 1 s), 4 probes; TCP_USER_TIMEOUT the same
    // total.
    let interval = (keepalive / 4).max(Duration::from_secs(1));
    let expected = keepalive + interval * 4;
    assert!(
        idle_gone >= expected.saturating_sub(Duration::from_millis(500)),
        "reaped before keepalive could have: {idle_gone:?}"
    );
    println!(
        "fault: {FAULT}: tcp_keepalive_s={} (idle {} s, then 4 probes {} s apart, user timeout \
         {} ms); idle client's backend gone after {} ms, client with an answer in flight {} ms, \
         session gauge 0 after {} ms",
        keepalive.as_secs(),
        keepalive.as_secs(),
        interval.as_secs(),
        ms(expected),
        ms(idle_gone),
        ms(busy_gone),
        ms(gauge_zero),
    );
    stop_and_check(FAULT, proxy, base).await;
}

/// A tokio-postgres client on a socket the test opened, so that its port
/// is known.
struct RawClient {
    client: Arc<tokio_postgres::Client>,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    port: u16,
    pid: i32,
}

impl RawClient {
    async fn connect(address: SocketAddr) -> RawClient {
        let tcp = TcpStream::connect(address).await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let config: tokio_postgres::Config =
            conn_str(address, SUPERUSER, "application_name=fault_vanish")
                .parse()
                .unwrap();
        let (client, connection) = config
            .connect_raw(tcp, tokio_postgres::NoTls)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        // A simple query: nothing is left to say afterwards (an extended
        // query's statement is closed later, which would put data in flight).
        let rows = client
            .simple_query("select pg_backend_pid()")
            .await
            .unwrap();
        let pid = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .expect("a pid");
        RawClient {
            client: Arc::new(client),
            connection,
            port,
            pid,
        }
    }

    /// Drops the socket without a Terminate (its FIN goes nowhere).
    async fn vanish(self) {
        self.connection.abort();
        let _ = self.connection.await;
    }
}

// ---------------------------------------------------------------------
// 4. A backend that accepts TCP but never answers.
// ---------------------------------------------------------------------

/// Relays to `upstream` until told to go silent; then accepts and holds
/// connections (new and old) without ever sending a byte.
struct BlackHole {
    address: SocketAddr,
    silent: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
    connections: tokio_util::task::TaskTracker,
}

impl BlackHole {
    async fn start(upstream: SocketAddr) -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (silent, _) = tokio::sync::watch::channel(false);
        let stop = CancellationToken::new();
        let connections = tokio_util::task::TaskTracker::new();
        let (tx, s, tracker) = (silent.clone(), stop.clone(), connections.clone());
        connections.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = s.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                tracker.spawn(Self::serve(client, upstream, tx.subscribe(), s.clone()));
            }
        });
        BlackHole {
            address,
            silent,
            stop,
            connections,
        }
    }

    async fn serve(
        mut client: TcpStream,
        upstream: SocketAddr,
        mut silent: tokio::sync::watch::Receiver<bool>,
        stop: CancellationToken,
    ) {
        if *silent.borrow() {
            stop.cancelled().await;
            return;
        }
        let Ok(mut server) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let relay = async {
            tokio::select! {
                _ = tokio::io::copy(&mut cr, &mut sw) => {}
                _ = tokio::io::copy(&mut sr, &mut cw) => {}
            }
        };
        tokio::select! {
            _ = relay => {}
            _ = Self::went_silent(&mut silent) => stop.cancelled().await,
            _ = stop.cancelled() => {}
        }
    }

    /// Resolves once the hole is silent (the watch guard is not held on).
    async fn went_silent(silent: &mut tokio::sync::watch::Receiver<bool>) {
        let _ = silent.wait_for(|s| *s).await.map(|_| ());
    }

    async fn close(self) {
        self.stop.cancel();
        self.connections.close();
        self.connections.wait().await;
        drop(self.silent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_accepts_but_never_answers() {
    const FAULT: &str = "silent backend";
    let _serial = SERIAL.lock().await;
    let cluster = cluster();
    let base = resources();
    let hole = BlackHole::start(cluster.node(2).address()).await;
    let mut file = fast_config(cluster);
    file.listeners = vec![listener(Target::PreferStandby)];
    file.nodes = vec![
        NodeConfig::new(
            &cluster.node(0).name,
            &cluster.node(0).address().to_string(),
        ),
        NodeConfig::new(
            &cluster.node(1).name,
            &cluster.node(1).address().to_string(),
        ),
        NodeConfig::new("hole", &hole.address.to_string()),
    ];
    let connect_timeout = Duration::from_millis(file.limits.connect_timeout_ms);
    let hold = Duration::from_millis(file.failover.hold_timeout_ms);
    let proxy = start_proxy(file).await;
    let read = proxy.addresses[0];
    let hole_port = cluster.node(2).port as i32;
    let app = "application_name=fault_silent";

    // A session relayed through the hole while it still answers.
    let mut through_hole = None;
    for _ in 0..20 {
        let (client, conn) = connect_watched(&conn_str(read, SUPERUSER, app)).await;
        if server_port(&client).await.unwrap() == hole_port {
            through_hole = Some((client, conn));
            break;
        }
    }
    let (hole_client, hole_conn) = through_hole.expect("a session through the hole");
    // Answered only once the statement of `server_port` is closed: nothing
    // of this session is left in flight when the hole goes silent.
    hole_client.simple_query("select 1").await.unwrap();
    let hole_told = watch_end(hole_conn);

    hole.silent.send_replace(true);
    let silenced = Instant::now();
    // New sessions right away: round robin sends some to the hole, which
    // the monitor has not marked down yet.
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                let result = connect_with(&conn_str(read, SUPERUSER, app)).await;
                let outcome = match result {
                    Ok(c) => Ok(server_port(&c).await.unwrap()),
                    Err(e) => Err(sqlstate(&e)),
                };
                (started.elapsed(), outcome)
            })
        })
        .collect();
    let detection = wait_down(&proxy, 2, silenced, Duration::from_secs(10)).await;
    let mut slowest = Duration::ZERO;
    let mut refused = 0;
    for a in attempts {
        let (took, outcome) = a.await.unwrap();
        slowest = slowest.max(took);
        match outcome {
            Ok(port) => {
                assert_ne!(port, hole_port, "a session was placed on the silent node");
                assert!(took < connect_timeout + Duration::from_secs(2), "{took:?}");
            }
            Err(code) => {
                assert_eq!(code.as_deref(), Some("57P03"));
                assert!(took < connect_timeout + hold + Duration::from_secs(2));
                refused += 1;
            }
        }
    }
    let (told_at, code, text) = tokio::time::timeout(Duration::from_secs(10), hole_told)
        .await
        .expect("the session on the silent node was never told")
        .unwrap();
    assert_eq!(code.as_deref(), Some("08006"), "{text}");
    drop(hole_client);
    println!(
        "fault: {FAULT}: marked down {} ms after it went silent; 6 new sessions: slowest connect \
         {} ms (connect_timeout {} ms), {} got 57P03, none placed on it; its open session told \
         08006 after {} ms",
        ms(detection),
        ms(slowest),
        ms(connect_timeout),
        refused,
        ms(told_at - silenced),
    );
    let left = proxy.shutdown(Duration::from_secs(5)).await;
    assert_eq!(left, 0);
    hole.close().await;
    // The hole held pg3 backends open; they go when it closes.
    let observer = connect_with(&cluster.node(2).conn_string()).await.unwrap();
    let gone = eventually(Duration::from_secs(10), || async {
        let n: i64 = observer
            .query_one(
                "select count(*) from pg_stat_activity where application_name = 'fault_silent'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    assert!(gone, "backends behind the silent node linger");
    drop(observer);
    let released = eventually(Duration::from_secs(10), || async {
        let now = resources();
        now.fds <= base.fds && now.tasks <= base.tasks
    })
    .await;
    assert!(released, "{FAULT}: {base:?} → {:?}", resources());
}

// ---------------------------------------------------------------------
// 5. A slowloris client.
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_startup() {
    const FAULT: &str = "slowloris";
    let _serial = SERIAL.lock().await;
    let cluster = cluster();
    let base = resources();
    let config = fast_config(cluster);
    let startup_timeout = Duration::from_millis(config.limits.startup_timeout_ms);
    let proxy = start_proxy(config).await;
    let rw = proxy.addresses[0];
    const SLOW: usize = 20;
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            tokio::spawn(async move {
                let mut tcp = TcpStream::connect(rw).await.unwrap();
                let started = Instant::now();
                let packet = startup_packet(SUPERUSER);
                let mut sent = 0;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let answer = loop {
                    let mut header = [0u8; 1];
                    tokio::select! {
                        _ = tick.tick(), if sent < packet.len() => {
                            // The proxy may have closed already: the read says.
                            let _ = tcp.write_all(&packet[sent..sent + 1]).await;
                            sent += 1;
                        }
                        r = tcp.peek(&mut header) => {
                            let _ = r;
                            break read_message(&mut tcp).await;
                        }
                    }
                };
                (started.elapsed(), sent, answer)
            })
        })
        .collect();
    // Others connect and query meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest_other = Duration::ZERO;
    let mut others = 0;
    while slow.iter().any(|s| !s.is_finished()) {
        let started = Instant::now();
        let c = connect(rw).await;
        c.batch_execute("select 1").await.unwrap();
        slowest_other = slowest_other.max(started.elapsed());
        others += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latest = Duration::ZERO;
    let mut earliest = Duration::MAX;
    for s in slow {
        let (took, sent, answer) = s.await.unwrap();
        let (t, body) = answer.expect("an ErrorResponse before the close");
        assert_eq!(t, b'E');
        assert_eq!(error_code(&body).as_deref(), Some("08P01"));
        assert!(sent < 10, "sent {sent} bytes");
        latest = latest.max(took);
        earliest = earliest.min(took);
    }
    assert!(earliest >= startup_timeout - Duration::from_millis(50));
    assert!(
        latest < startup_timeout + Duration::from_secs(2),
        "{latest:?}"
    );
    assert!(others > 0);
    assert!(slowest_other < Duration::from_secs(1), "{slowest_other:?}");
    println!(
        "fault: {FAULT}: {SLOW} clients at 1 byte/s got 08P01 after {}-{} ms \
         (startup_timeout_ms {}); {others} other sessions meanwhile, slowest connect+query {} ms",
        ms(earliest),
        ms(latest),
        ms(startup_timeout),
        ms(slowest_other),
    );
    stop_and_check(FAULT, proxy, base).await;
}

// ---------------------------------------------------------------------
// 6. A connection storm.
// ---------------------------------------------------------------------

#[derive(Debug)]
enum Attempt {
    /// The backend asked for authentication: a session was set up.
    Accepted,
    /// 53300 (pgpivot's limit, or the server's).
    Refused,
    Error(String),
}

async fn attempt(address: SocketAddr) -> Attempt {
    let go = async {
        let mut tcp = TcpStream::connect(address).await?;
        tcp.write_all(&startup_packet(SUPERUSER)).await?;
        read_message(&mut tcp).await
    };
    match tokio::time::timeout(Duration::from_secs(10), go).await {
        Err(_) => Attempt::Error("timed out".into()),
        Ok(Err(e)) => Attempt::Error(e.to_string()),
        Ok(Ok((b'R', _))) => Attempt::Accepted,
        Ok(Ok((b'E', body))) if error_code(&body).as_deref() == Some("53300") => Attempt::Refused,
        Ok(Ok((t, body))) => Attempt::Error(format!(
            "{} {:?}",
            t as char,
            String::from_utf8_lossy(&body)
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storm() {
    const FAULT: &str = "connection storm";
    const ATTEMPTS: usize = 5_000;
    const CONCURRENCY: usize = 200;
    const LIMIT: usize = 64;
    let _serial = SERIAL.lock().await;
    let cluster = cluster();
    let base = resources();
    let mut file = fast_config(cluster);
    let mut storm_listener = listener(Target::ReadWrite);
    storm_listener.max_connections = Some(LIMIT);
    file.listeners = vec![
        storm_listener,
        ListenerConfig::new("127.0.0.1:0", Target::ReadWrite),
    ];
    let proxy = start_proxy(file).await;
    let (storm, calm) = (proxy.addresses[0], proxy.addresses[1]);
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = keep_querying(connect(calm).await, "select 1", stop.clone());

    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    // 5,000 attempts in 10 s: one every 2 ms, at most 200 at a time.
    let mut pace = tokio::time::interval(Duration::from_millis(2));
    let mut tasks = Vec::with_capacity(ATTEMPTS);
    let mut newcomer = None;
    for i in 0..ATTEMPTS {
        pace.tick().await;
        let slot = slots.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let outcome = attempt(storm).await;
            drop(slot);
            (t.elapsed(), outcome)
        }));
        if i == ATTEMPTS / 2 {
            // A new session on the other listener in the thick of it.
            newcomer = Some(tokio::spawn(async move {
                let t = Instant::now();
                let c = connect(calm).await;
                c.batch_execute("select 1").await.unwrap();
                t.elapsed()
            }));
        }
    }
    let mut latencies = Vec::with_capacity(ATTEMPTS);
    let (mut accepted, mut refused, mut errors) = (0, 0, Vec::new());
    for t in tasks {
        let (took, outcome) = t.await.unwrap();
        latencies.push(took);
        match outcome {
            Attempt::Accepted => accepted += 1,
            Attempt::Refused => refused += 1,
            Attempt::Error(e) => errors.push(e),
        }
    }
    let elapsed = started.elapsed();
    let newcomer = newcomer.unwrap().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let (queries, bystander_errors, slowest) = bystander.await.unwrap();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let p50 = latencies[latencies.len() / 2];
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert_eq!(accepted + refused, ATTEMPTS);
    assert!(accepted > 0);
    assert!(bystander_errors.is_empty(), "{bystander_errors:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "bystander stalled {slowest:?}"
    );
    assert!(
        newcomer < Duration::from_secs(2),
        "newcomer took {newcomer:?}"
    );
    // Every session of the storm ends: only the bystander's is left, then none.
    let drained = eventually(Duration::from_secs(15), || async {
        proxy.shared.metrics.sessions_active.get() == 0
    })
    .await;
    assert!(
        drained,
        "{} sessions left",
        proxy.shared.metrics.sessions_active.get()
    );
    println!(
        "fault: {FAULT}: {ATTEMPTS} attempts ({CONCURRENCY} at a time, listener limit {LIMIT}) in \
         {} ms = {:.0}/s: {accepted} accepted, {refused} refused (53300), 0 errors; connect→first \
         answer p50 {} ms, p99 {} ms; bystander {queries} queries, 0 errors, slowest {} ms; \
         new session meanwhile {} ms",
        ms(elapsed),
        ATTEMPTS as f64 / elapsed.as_secs_f64(),
        ms(p50),
        ms(p99),
        ms(slowest),
        ms(newcomer),
    );
    stop_and_check(FAULT, proxy, base).await;
}

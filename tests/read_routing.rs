//! Read routing against a real cluster (a primary and two hot standbys):
//!
//! - where sessions land for each target, per listener and per session
//!   (`options=-c pgpivot.target_session_attrs=...`), how reads spread over
//!   the standbys (also while sessions come and go), and that the
//!   `pgpivot.*` options never reach the server;
//! - lag budgets: a standby whose replay is paused while the primary writes
//!   gets no new sessions until it catches up; with every standby behind,
//!   each target falls back, waits or is refused as documented, and a
//!   waiting `standby` session goes ahead once a standby catches up;
//! - an idle primary does not make its standbys look old;
//! - a 100 ms budget really bounds how stale a read can be;
//! - a standby lost mid-session, `on_lag = "disconnect"` and the ceiling on
//!   per-session budgets.
//!
//! Every session reports the server it landed on with
//! `select inet_server_port()`. The tests run one at a time (see [`serial`]):
//! most share one cluster whose replay they pause, and several measure
//! timings that a concurrent cluster start would distort.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use pgpivot::config::{FileConfig, ListenerConfig, OnLag};
use pgpivot::localcluster::{LocalCluster, StopMode, MD5_USER, SUPERUSER};
use pgpivot::proxy::Proxy;
use pgpivot::routing::Target;
use pgpivot::topology::{NodeId, Status, Topology};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Error};

use common::*;

/// The byte budget of the lag tests: far below the few hundred KB written
/// while replay is paused, far above an idle standby's lag (0).
const BUDGET_BYTES: u64 = 1024;

/// Lets one test run at a time. A tokio mutex: it is held across awaits and
/// is not poisoned by a failing test.
static SERIAL: AsyncMutex<()> = AsyncMutex::const_new(());

/// Waits for this test's turn; the turn lasts as long as the guard.
async fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Runs blocking cluster operations from async tests.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The cluster shared by the tests of this binary (started by the first).
fn cluster() -> &'static LocalCluster {
    blocking(shared_cluster)
}

/// The port of node `i`, as `inet_server_port()` reports it.
fn port(cluster: &LocalCluster, i: NodeId) -> i32 {
    i32::from(cluster.node(i).port)
}

/// A listener with a default target and lag budgets.
fn budget_listener(
    target: Target,
    max_lag_bytes: Option<u64>,
    max_lag_ms: Option<u64>,
) -> ListenerConfig {
    ListenerConfig {
        max_lag_bytes,
        max_lag_ms,
        ..listener(target)
    }
}

/// The harness config for `cluster` with these listeners instead of its own.
fn config_with(cluster: &LocalCluster, listeners: Vec<ListenerConfig>) -> FileConfig {
    FileConfig {
        listeners,
        ..config_for(cluster)
    }
}

/// A connection string through `addr` as `user`, with libpq `options` when
/// not empty.
fn through(addr: SocketAddr, user: &str, options: &str) -> String {
    let extra = match options {
        "" => String::new(),
        options => format!("options='{options}'"),
    };
    conn_str(addr, user, &extra)
}

/// A connection string through `addr` as [`MD5_USER`], whose cheap
/// authentication lets a debug build open many sessions quickly.
fn reader(addr: SocketAddr) -> String {
    through(addr, MD5_USER, "")
}

/// Opens a session and asks which server it landed on. The session stays
/// open as long as the returned client.
async fn open_session(conn: &str) -> Result<(Client, i32), Error> {
    let client = connect_with(conn).await?;
    let port = client
        .query_one("select inet_server_port()", &[])
        .await?
        .get(0);
    Ok((client, port))
}

/// Opens `n` sessions through `conn` at once, all open together, and counts
/// how many landed on each server port.
async fn spread(conn: &str, n: usize) -> BTreeMap<i32, usize> {
    let sessions = try_join_all((0..n).map(|_| open_session(conn)))
        .await
        .expect("sessions open through pgpivot");
    let mut counts = BTreeMap::new();
    for (_, port) in &sessions {
        *counts.entry(*port).or_default() += 1;
    }
    counts
}

/// Starts pgpivot with `config` and waits until it has seen every standby
/// (nodes 1..) as one: the harness waits for the primary only, and the
/// standbys' monitors may log in a few hundred ms later (SCRAM in a debug
/// build), when early sessions would all go to the first standby seen.
async fn start(config: FileConfig) -> Proxy {
    let standbys = 1..config.nodes.len();
    let proxy = start_proxy(config).await;
    let seen = topology_until(&proxy, Duration::from_secs(20), |t| {
        standbys.clone().all(|i| t.nodes[i].is_standby())
    })
    .await;
    assert!(
        seen,
        "pgpivot did not see every standby: {:?}",
        statuses(&proxy)
    );
    proxy
}

/// Every node's status, for assertion messages.
fn statuses(proxy: &Proxy) -> Vec<(String, Status)> {
    let t = proxy.shared.topology.load();
    t.nodes.iter().map(|n| (n.name.clone(), n.status)).collect()
}

/// Polls pgpivot's topology until `check` holds, for at most `timeout`.
async fn topology_until(
    proxy: &Proxy,
    timeout: Duration,
    check: impl Fn(&Topology) -> bool,
) -> bool {
    eventually(timeout, || {
        let holds = check(&proxy.shared.topology.load());
        async move { holds }
    })
    .await
}

/// Whether pgpivot measures node `i` as more than [`BUDGET_BYTES`] behind.
fn behind(t: &Topology, i: NodeId) -> bool {
    t.nodes[i].lag_bytes.is_some_and(|b| b > BUDGET_BYTES)
}

/// Whether pgpivot measures node `i` as within [`BUDGET_BYTES`].
fn within(t: &Topology, i: NodeId) -> bool {
    t.nodes[i].lag_bytes.is_some_and(|b| b <= BUDGET_BYTES)
}

/// The lag figures of every standby, for assertion messages.
fn lags(proxy: &Proxy) -> Vec<(String, Option<u64>, Option<Duration>)> {
    let t = proxy.shared.topology.load();
    let standbys = t.nodes.iter().filter(|n| n.is_standby());
    standbys
        .map(|n| (n.name.clone(), n.lag_bytes, n.lag))
        .collect()
}

/// Writes about `kb` KB of WAL on the primary (node 0), directly.
fn write_on_primary(cluster: &LocalCluster, kb: usize) {
    let sql = format!(
        "create table if not exists lag_filler (x text);
         insert into lag_filler select repeat('x', 1000) from generate_series(1, {kb})"
    );
    cluster.psql(0, &sql).expect("write on the primary");
}

/// Waits until every standby is measured within [`BUDGET_BYTES`], so a test
/// starts from caught-up standbys.
async fn wait_caught_up(proxy: &Proxy, cluster: &LocalCluster) {
    let standbys: Vec<NodeId> = (1..cluster.nodes().len()).collect();
    let ok = topology_until(proxy, Duration::from_secs(20), |t| {
        standbys.iter().all(|&i| within(t, i))
    })
    .await;
    assert!(ok, "standbys did not catch up: {:?}", lags(proxy));
}

/// Replay paused on some standbys; resumed when dropped, so a failing test
/// does not leave the shared cluster paused.
struct ReplayPaused<'a> {
    cluster: &'a LocalCluster,
    nodes: Vec<NodeId>,
}

impl<'a> ReplayPaused<'a> {
    /// Pauses replay on `nodes` (`pg_wal_replay_pause()` on each standby).
    fn new(cluster: &'a LocalCluster, nodes: &[NodeId]) -> ReplayPaused<'a> {
        // Built first, so a failure half-way still resumes what was paused.
        let paused = ReplayPaused {
            cluster,
            nodes: nodes.to_vec(),
        };
        for &i in nodes {
            blocking(|| cluster.psql(i, "select pg_wal_replay_pause()")).expect("pause replay");
        }
        paused
    }
}

impl Drop for ReplayPaused<'_> {
    fn drop(&mut self) {
        for &i in &self.nodes {
            if let Err(e) = self.cluster.psql(i, "select pg_wal_replay_resume()") {
                eprintln!("cannot resume replay on node {i}: {e}");
            }
        }
    }
}

/// Pauses replay on `nodes`, writes a few hundred KB on the primary and
/// waits until pgpivot measures each of them past [`BUDGET_BYTES`]. That
/// must take at most two monitor intervals (plus scheduling slack on a busy
/// 2-core machine): a poll of the primary already under way when the write
/// commits may read the old position, the next one sees the new.
async fn lag_behind<'a>(
    proxy: &Proxy,
    cluster: &'a LocalCluster,
    nodes: &[NodeId],
) -> ReplayPaused<'a> {
    let paused = ReplayPaused::new(cluster, nodes);
    blocking(|| write_on_primary(cluster, 300));
    let written = Instant::now();
    let interval = proxy.shared.settings().monitor.interval;
    let bound = 2 * interval + Duration::from_millis(300);
    let ok = topology_until(proxy, Duration::from_secs(10), |t| {
        nodes.iter().all(|&i| behind(t, i))
    })
    .await;
    let took = written.elapsed();
    assert!(
        ok,
        "paused standbys never measured behind: {:?}",
        lags(proxy)
    );
    assert!(took <= bound, "lag noticed after {took:?}, bound {bound:?}");
    paused
}

/// Awaits the end of a watched connection (see `connect_watched`).
async fn ended(connection: JoinHandle<Result<(), Error>>, timeout: Duration) -> Result<(), Error> {
    tokio::time::timeout(timeout, connection)
        .await
        .expect("the session was not ended")
        .expect("connection task")
}

/// Asserts that `result` is how a session ends after pgpivot ended it with
/// `code`.
fn assert_ended_with(result: Result<(), Error>, code: &str) {
    let err = result.expect_err("the session must end with an error");
    assert_eq!(sqlstate(&err).as_deref(), Some(code), "{err:?}");
}

/// Asserts that a session whose server was lost was told so with 08006, or
/// (if the server's own goodbye came first) just saw its connection close.
fn assert_lost(result: Result<(), Error>) {
    if let Err(err) = result {
        let code = sqlstate(&err);
        assert!(
            code.as_deref() == Some("08006") || err.is_closed(),
            "{err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_over_the_standbys_and_writes_stay_on_the_primary() {
    let _serial = serial().await;
    let cluster = cluster();
    let proxy = start(config_for(cluster)).await;
    let (rw, ro) = (proxy.addresses[0], proxy.addresses[1]);
    let primary = port(cluster, 0);
    let standbys = [port(cluster, 1), port(cluster, 2)];

    let reads = spread(&reader(ro), 100).await;
    assert!(
        reads.keys().all(|p| standbys.contains(p)),
        "a read left the standbys: {reads:?}"
    );
    for p in standbys {
        let share = reads.get(&p).copied().unwrap_or(0);
        assert!(share >= 30, "standby {p} got {share} of 100: {reads:?}");
    }
    let writes = spread(&reader(rw), 20).await;
    assert_eq!(writes, BTreeMap::from([(primary, 20)]));

    // A session's own target overrides its listener's, both ways.
    let to_primary = through(ro, MD5_USER, "-c pgpivot.target_session_attrs=read-write");
    assert_eq!(
        spread(&to_primary, 10).await,
        BTreeMap::from([(primary, 10)])
    );
    let to_standby = through(rw, MD5_USER, "-c pgpivot.target_session_attrs=standby");
    let landed = spread(&to_standby, 10).await;
    assert!(landed.keys().all(|p| standbys.contains(p)), "{landed:?}");
}

/// Opens and closes sessions through `conn` one after another until `stop`;
/// returns the errors, with how many sessions were tried.
async fn churn(conn: String, stop: Instant) -> (usize, Vec<String>) {
    let (mut tried, mut errors) = (0, Vec::new());
    while Instant::now() < stop {
        tried += 1;
        if let Err(e) = open_session(&conn).await {
            errors.push(message(&e));
        }
    }
    (tried, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_keeps_working_while_sessions_come_and_go() {
    let _serial = serial().await;
    let cluster = cluster();
    let proxy = start(config_for(cluster)).await;
    let stop = Instant::now() + Duration::from_secs(3);
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(churn(reader(proxy.addresses[1]), stop)))
        .collect();
    let (mut tried, mut errors) = (0, Vec::new());
    for c in clients {
        let (n, e) = c.await.unwrap();
        tried += n;
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "{} of {tried} sessions failed, e.g. {:?}",
        errors.len(),
        errors[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_options_are_validated_and_never_forwarded() {
    let _serial = serial().await;
    let cluster = cluster();
    let proxy = start(config_for(cluster)).await;
    let rw = proxy.addresses[0];

    let bad = through(rw, MD5_USER, "-c pgpivot.target_session_attrs=leader");
    let err = connect_with(&bad)
        .await
        .expect_err("a bad target must be refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err}");
    assert!(
        message(&err).contains("pgpivot.target_session_attrs"),
        "{}",
        message(&err)
    );

    // Other options still reach the server; pgpivot's own do not.
    let options = "-c application_name=routed -c pgpivot.target_session_attrs=standby";
    let client = connect_with(&through(rw, MD5_USER, options)).await.unwrap();
    let row = client
        .query_one(
            "select current_setting('pgpivot.target_session_attrs', true),
                    current_setting('application_name'), pg_is_in_recovery()",
            &[],
        )
        .await
        .unwrap();
    let forwarded: Option<String> = row.get(0);
    assert_eq!(forwarded, None, "the pgpivot.* option reached the server");
    assert_eq!(row.get::<_, String>(1), "routed");
    assert!(
        row.get::<_, bool>(2),
        "the session's own target was not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_standby_gets_no_new_sessions_until_it_catches_up() {
    let _serial = serial().await;
    let cluster = cluster();
    let listeners = vec![budget_listener(
        Target::PreferStandby,
        Some(BUDGET_BYTES),
        None,
    )];
    let proxy = start(config_with(cluster, listeners)).await;
    let ro = reader(proxy.addresses[0]);
    wait_caught_up(&proxy, cluster).await;

    let paused = lag_behind(&proxy, cluster, &[1]).await;
    let ok = topology_until(&proxy, Duration::from_secs(5), |t| within(t, 2)).await;
    assert!(
        ok,
        "the other standby should be within budget: {:?}",
        lags(&proxy)
    );
    assert_eq!(
        spread(&ro, 20).await,
        BTreeMap::from([(port(cluster, 2), 20)])
    );

    drop(paused);
    wait_caught_up(&proxy, cluster).await;
    let reads = spread(&ro, 20).await;
    assert!(
        reads.get(&port(cluster, 1)).is_some_and(|&n| n > 0),
        "the caught-up standby got no sessions: {reads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_standby_lagging_each_target_falls_back_waits_or_is_refused() {
    let _serial = serial().await;
    let cluster = cluster();
    let listeners = [Target::PreferStandby, Target::Standby, Target::ReadOnly]
        .map(|target| budget_listener(target, Some(BUDGET_BYTES), None))
        .to_vec();
    let mut config = config_with(cluster, listeners);
    config.failover.hold_timeout_ms = 1500;
    let proxy = start(config).await;
    let [prefer, standby, read_only] = [0, 1, 2].map(|i| proxy.addresses[i]);
    wait_caught_up(&proxy, cluster).await;
    let _paused = lag_behind(&proxy, cluster, &[1, 2]).await;
    let primary = port(cluster, 0);

    assert_eq!(
        spread(&reader(prefer), 5).await,
        BTreeMap::from([(primary, 5)])
    );

    let started = Instant::now();
    let err = connect_with(&reader(standby))
        .await
        .expect_err("no standby is within budget");
    let waited = started.elapsed();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    assert!(message(&err).contains("standby"), "{}", message(&err));
    assert!(
        waited >= Duration::from_millis(1400),
        "did not hold: {waited:?}"
    );

    let client = connect_with(&through(read_only, SUPERUSER, ""))
        .await
        .unwrap();
    let row = client
        .query_one(
            "select inet_server_port(), current_setting('default_transaction_read_only')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i32>(0), row.get::<_, String>(1)),
        (primary, "on".into())
    );
    let err = client
        .batch_execute("insert into lag_filler values ('read-only?')")
        .await
        .expect_err("a read-only session on the primary must not write");
    assert_eq!(sqlstate(&err).as_deref(), Some("25006"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_standby_session_is_released_when_a_standby_catches_up() {
    let _serial = serial().await;
    let cluster = cluster();
    let listeners = vec![budget_listener(Target::Standby, Some(BUDGET_BYTES), None)];
    let mut config = config_with(cluster, listeners);
    config.failover.hold_timeout_ms = 5000;
    let proxy = start(config).await;
    let conn = reader(proxy.addresses[0]);
    wait_caught_up(&proxy, cluster).await;
    let paused = lag_behind(&proxy, cluster, &[1, 2]).await;

    let started = Instant::now();
    let held = tokio::spawn(async move { open_session(&conn).await.map(|(_, port)| port) });
    let metrics = &proxy.shared.metrics;
    let waiting = eventually(Duration::from_secs(2), || async {
        metrics.sessions_waiting.get() == 1
    })
    .await;
    assert!(waiting, "the standby session was not held");
    drop(paused);
    let landed = held.await.unwrap();
    let waited = started.elapsed();
    let landed =
        landed.unwrap_or_else(|e| panic!("held session refused after {waited:?}: {}", message(&e)));
    assert!([port(cluster, 1), port(cluster, 2)].contains(&landed));
    assert!(
        waited < Duration::from_millis(4000),
        "released only after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_primary_leaves_its_standbys_at_zero_lag() {
    let _serial = serial().await;
    let cluster = cluster();
    let listeners = vec![budget_listener(
        Target::PreferStandby,
        Some(BUDGET_BYTES),
        Some(100),
    )];
    let proxy = start(config_with(cluster, listeners)).await;
    let ro = reader(proxy.addresses[0]);

    // Nothing writes for 10 s (the case reported: a lag taken as the age of
    // the last replayed transaction grows without bound on an idle primary).
    // Sampled meanwhile, the standbys' lag never reaches a second.
    let idle = Instant::now() + Duration::from_secs(10);
    let mut worst = Duration::ZERO;
    while Instant::now() < idle {
        let t = proxy.shared.topology.load();
        worst = t
            .nodes
            .iter()
            .filter_map(|n| n.lag)
            .fold(worst, Duration::max);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("idle for 10 s: the standbys' largest lag was {worst:?}");
    assert!(
        worst < Duration::from_secs(1),
        "lag reached {worst:?} while idle"
    );

    // A background WAL record (a checkpoint, a standby snapshot) can be in
    // flight at any one poll; it is replayed within the next.
    let zero = |t: &Topology| {
        (1..=2).all(|i| t.nodes[i].lag_bytes == Some(0) && t.nodes[i].lag == Some(Duration::ZERO))
    };
    let ok = topology_until(&proxy, Duration::from_secs(2), zero).await;
    assert!(ok, "idle standbys must be at zero lag: {:?}", lags(&proxy));
    let reads = spread(&ro, 20).await;
    let standbys = [port(cluster, 1), port(cluster, 2)];
    assert!(reads.keys().all(|p| standbys.contains(p)), "{reads:?}");
}

/// Commits of the counter, in order: (value, when the commit returned).
type Commits = Vec<(i64, Instant)>;

/// One read of the counter: when its session was asked for, the value read
/// and the server that answered.
struct Read {
    at: Instant,
    value: i64,
    port: i32,
}

/// Increments the counter on the primary (`conn`) every few ms until
/// `stop`, recording each commit after it returns.
async fn count_up(conn: String, stop: Instant) -> Commits {
    let client = connect_with(&conn)
        .await
        .expect("writer connects to the primary");
    let mut commits = Commits::new();
    while Instant::now() < stop {
        let sql = "update counter set v = v + 1 returning v";
        let row = client.query_one(sql, &[]).await.expect("counter update");
        commits.push((row.get(0), Instant::now()));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    commits
}

/// Reads the counter through `addr` until `stop`, one new session per read
/// (routing, and so the lag budget, applies when a session starts).
async fn read_counter(addr: SocketAddr, stop: Instant, reads: Arc<Mutex<Vec<Read>>>) {
    while Instant::now() < stop {
        let at = Instant::now();
        let client = connect_with(&reader(addr))
            .await
            .expect("read session through pgpivot");
        let sql = "select v, inet_server_port() from counter";
        let row = client.query_one(sql, &[]).await.expect("counter read");
        let read = Read {
            at,
            value: row.get(0),
            port: row.get(1),
        };
        reads.lock().unwrap().push(read);
    }
}

/// How stale `read` was: the time between the first commit it missed and
/// when its session was asked for (zero when it missed nothing committed
/// by then).
fn staleness(commits: &Commits, read: &Read) -> Duration {
    let missed = commits.partition_point(|&(v, _)| v <= read.value);
    commits.get(missed).map_or(Duration::ZERO, |&(_, at)| {
        read.at.saturating_duration_since(at)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_within_a_100_ms_budget_are_never_older_than_the_budget_allows() {
    let _serial = serial().await;
    let cluster = cluster();
    let listeners = vec![budget_listener(Target::PreferStandby, None, Some(100))];
    let mut config = config_with(cluster, listeners);
    config.monitor.interval_ms = 50;
    let proxy = start(config).await;
    let setup = "drop table if exists counter;
                 create table counter (v bigint not null);
                 insert into counter values (0);
                 grant select on counter to public";
    blocking(|| cluster.psql(0, setup)).unwrap();
    wait_caught_up(&proxy, cluster).await;

    // 4 s of writes and reads; replay on pg2 stops from 1 s to 2.5 s, so
    // the budget has something to refuse.
    let began = Instant::now();
    let stop = began + Duration::from_secs(4);
    let writer = tokio::spawn(count_up(cluster.node(0).conn_string(), stop));
    let reads = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(read_counter(proxy.addresses[0], stop, reads.clone())))
        .collect();
    tokio::time::sleep_until((began + Duration::from_secs(1)).into()).await;
    let paused = ReplayPaused::new(cluster, &[1]);
    tokio::time::sleep_until((began + Duration::from_millis(2500)).into()).await;
    drop(paused);
    let commits = writer.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }

    // pgpivot learns a standby's lag by polling: a commit is first seen by
    // the primary's next poll, up to one monitor interval after it returns,
    // and a standby is only as fresh as the last poll says. So a read may
    // miss commits up to budget + one interval old, plus slack for the
    // polls' own duration and the age of the snapshot the router read.
    let interval = proxy.shared.settings().monitor.interval;
    let allowance = Duration::from_millis(100) + interval + Duration::from_millis(50);
    let reads = reads.lock().unwrap();
    let mut by_port = BTreeMap::<i32, usize>::new();
    for r in reads.iter() {
        *by_port.entry(r.port).or_default() += 1;
    }
    let on_primary = by_port.get(&port(cluster, 0)).copied().unwrap_or(0);
    let worst = reads
        .iter()
        .map(|r| staleness(&commits, r))
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} reads by port {by_port:?} against {} commits; the stalest missed a commit {worst:?} old",
        reads.len(),
        commits.len()
    );
    assert!(
        commits.len() > 100 && reads.len() > 100,
        "too little traffic to judge"
    );
    assert!(
        on_primary * 2 <= reads.len(),
        "most reads avoided the standbys: {by_port:?}"
    );
    assert!(
        worst <= allowance,
        "a read missed a commit {worst:?} old (allowance {allowance:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_a_killed_standby_end_and_new_ones_go_to_the_other() {
    let _serial = serial().await;
    let cluster = blocking(|| new_cluster(2));
    // Sessions ended, as without moves (tests/moves.rs covers moves).
    let mut config = config_for(&cluster);
    config.failover.move_sessions = false;
    let proxy = start(config).await;
    let ro = reader(proxy.addresses[1]);
    let victim = port(&cluster, 1);

    // Six sessions, all open together so they split three per standby.
    let (mut on_victim, mut others) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        let (client, connection) = connect_watched(&ro).await;
        let row = client.query_one("select inet_server_port()", &[]).await;
        let landed: i32 = row.unwrap().get(0);
        let sessions = if landed == victim {
            &mut on_victim
        } else {
            &mut others
        };
        sessions.push((client, connection));
    }
    assert_eq!(on_victim.len(), 3, "sessions did not split evenly");
    let (busy, busy_connection) = on_victim.pop().unwrap();
    let query =
        tokio::spawn(async move { busy.simple_query("select pg_sleep(30)").await.map(drop) });

    // An immediate stop: every backend exits at once, as in a crash.
    blocking(|| cluster.stop_node(1, StopMode::Immediate)).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the query on the killed standby did not end")
        .unwrap()
        .expect_err("the query on the killed standby must fail");
    assert_lost(Err(err));
    assert_lost(ended(busy_connection, Duration::from_secs(10)).await);
    for (_client, connection) in on_victim {
        assert_lost(ended(connection, Duration::from_secs(10)).await);
    }

    assert_eq!(
        spread(&ro, 10).await,
        BTreeMap::from([(port(&cluster, 2), 10)])
    );
    let down = topology_until(&proxy, Duration::from_secs(10), |t| {
        t.nodes[1].status == Status::Down
    })
    .await;
    assert!(down, "the killed standby was never marked down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_lag_disconnect_ends_sessions_at_their_next_idle_point() {
    let _serial = serial().await;
    let cluster = cluster();
    let disconnect = ListenerConfig {
        on_lag: OnLag::Disconnect,
        ..budget_listener(Target::PreferStandby, Some(BUDGET_BYTES), None)
    };
    let stay = budget_listener(Target::PreferStandby, Some(BUDGET_BYTES), None);
    // Sessions ended, as without moves (tests/moves.rs covers moves).
    let mut config = config_with(cluster, vec![disconnect, stay]);
    config.failover.move_sessions = false;
    let proxy = start(config).await;
    let [ending, staying] = [0, 1].map(|i| reader(proxy.addresses[i]));
    wait_caught_up(&proxy, cluster).await;

    let (idle, idle_connection) = connect_watched(&ending).await;
    let (busy, busy_connection) = connect_watched(&ending).await;
    let (in_tx, in_tx_connection) = connect_watched(&ending).await;
    let (kept, kept_connection) = connect_watched(&staying).await;
    for client in [&idle, &busy, &in_tx, &kept] {
        let row = client
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .unwrap();
        assert!(
            row.get::<_, bool>(0),
            "every session must start on a standby"
        );
    }
    in_tx.batch_execute("begin; select 1").await.unwrap();
    // Still running when the lag is noticed: it must complete first.
    // The task hands the client back: dropping it would close the session
    // cleanly (Terminate) before pgpivot's 57P01 could arrive.
    let query = tokio::spawn(async move {
        let result = busy.simple_query("select pg_sleep(2)").await.map(drop);
        (busy, result)
    });
    let _paused = lag_behind(&proxy, cluster, &[1, 2]).await;

    let ended_idle = ended(idle_connection, Duration::from_secs(5)).await;
    let err = ended_idle
        .as_ref()
        .expect_err("the idle session must be ended");
    assert!(message(err).contains("lag budget"), "{}", message(err));
    assert_ended_with(ended_idle, "57P01");
    let (_busy, result) = query.await.unwrap();
    result.expect("the running query completes");
    assert_ended_with(
        ended(busy_connection, Duration::from_secs(5)).await,
        "57P01",
    );

    // The transaction is not cut short, the session ends once it is over.
    in_tx
        .simple_query("select 1")
        .await
        .expect("an open transaction continues");
    in_tx
        .batch_execute("commit")
        .await
        .expect("its commit is answered");
    assert_ended_with(
        ended(in_tx_connection, Duration::from_secs(5)).await,
        "57P01",
    );

    kept.simple_query("select 1")
        .await
        .expect("on_lag = stay keeps the session");
    assert!(!kept_connection.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_budgets_are_capped_by_the_listener_ceiling() {
    let _serial = serial().await;
    let cluster = cluster();
    let capped = ListenerConfig {
        session_max_lag_ms: Some(5000),
        ..listener(Target::PreferStandby)
    };
    let proxy = start(config_with(cluster, vec![capped])).await;
    let addr = proxy.addresses[0];

    let too_loose = through(addr, MD5_USER, "-c pgpivot.max_lag_ms=60000");
    let err = connect_with(&too_loose)
        .await
        .expect_err("a budget above the ceiling");
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err}");
    assert!(
        message(&err).contains("pgpivot.max_lag_ms"),
        "{}",
        message(&err)
    );
    for ms in [10, 5000] {
        let conn = through(addr, MD5_USER, &format!("-c pgpivot.max_lag_ms={ms}"));
        let (_, landed) = open_session(&conn)
            .await
            .unwrap_or_else(|e| panic!("max_lag_ms={ms}: {e}"));
        assert!((0..3).any(|i| port(cluster, i) == landed));
    }
}

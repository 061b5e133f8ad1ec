//! Failover benchmark: what clients of pgpivot see when the primary crashes
//! and its synchronous standby is promoted.
//!
//! One [`LocalCluster`] (a primary and one standby) is reused for every run:
//! after a run the crashed primary is rewound (`pg_rewind`) and rejoined as a
//! standby of the promoted node, so the roles alternate, `pg1` → `pg2` →
//! `pg1` ... A rejoin (about 1 s) is cheaper than a fresh cluster (about
//! 3 s), and every run after the first starts from what a real cluster looks
//! like after a failover: a rewound node, a new timeline. Before each crash
//! the primary is made synchronous (`synchronous_standby_names = '*'`, and
//! the bench waits for `sync_state = 'sync'`), so no acknowledged write can
//! be lost; the promoted node gets that setting reset before the next run
//! (it has no standby until the old primary rejoins).
//!
//! Each run starts a fresh in-process pgpivot ([`Proxy::start`]) in front of
//! both nodes with the default `[monitor]` and `[failover]` settings (poll
//! every 250 ms, 1000 ms timeout, down after 2 failed polls, hold new
//! sessions up to 30 s) and one read-write listener. Then:
//!
//! 1. a **writer** inserts one row every 10 ms through the read-write
//!    listener, on one session, reconnecting through the same address after
//!    an error; each insert returns `inet_server_port()`, so every
//!    acknowledgement names the server that committed it;
//! 2. after 20 acknowledged writes, and a delay that moves the crash to a
//!    different point of pgpivot's poll cycle in each run (`k/N` of the poll
//!    interval in run `k+1` of `N`, see [`crash_phase`]), the primary is
//!    crashed (`pg_ctl stop -m immediate`) and the standby promoted at once
//!    (`pg_ctl promote -w`);
//! 3. from the crash until pgpivot publishes the new primary, a **prober**
//!    opens a new session through the listener every 50 ms (each on its own
//!    task, so held sessions overlap) and checks where it landed;
//! 4. a **watcher** subscribed to pgpivot's topology channel timestamps
//!    every generation it publishes;
//! 5. once the writer has 20 acknowledgements after the crash it stops, and
//!    the new primary is asked directly which rows it holds.
//!
//! Columns (times in milliseconds):
//!
//! * `detect_ms`: `pg_ctl promote -w` returned → pgpivot published the
//!   promoted node as primary. `pg_ctl` notices the end of recovery by
//!   polling every 100 ms, so pgpivot can be first: the figure may be
//!   negative.
//! * `promote_ms`: how long the `pg_ctl promote -w` call took.
//! * `window_ms`: the writer's view of the outage, from its last
//!   acknowledged write on the old primary to its first on the new one.
//!   `window-promote_ms` subtracts `promote_ms`, the part that is the bench's
//!   own doing; what remains is the crash itself (`pg_ctl stop` returning),
//!   detection, and the writer's reconnect.
//! * `inflight_err`: writer inserts that failed on an open session.
//! * `new_sess_err`: connects through pgpivot that failed, the writer's
//!   reconnects and the prober's sessions together (a prober session landing
//!   anywhere but on the promoted primary counts too). The writer reconnects
//!   the moment its insert fails, while the crashed server may still be
//!   exiting; the prober starts once `pg_ctl stop` has returned.
//! * `new_sess_waited`: prober sessions that waited through the gap and
//!   then succeeded on the new primary; `max_wait_ms` is the longest wait.
//!   They are all released together when the new primary is published, so
//!   after a long gap they also load it while the writer reconnects.
//! * `lost`: acknowledged ids missing on the new primary afterwards.
//! * `stale_writes`: writes acknowledged by the old primary's port after the
//!   crash had completed (a session left on a dead or stale primary).
//! * `down_ms`: the crash → pgpivot published "no primary" (`-` when the
//!   promotion was seen first and the primary changed in one step). Failed
//!   connects to the dead primary make pgpivot poll it at once, so this
//!   mostly tracks the writer's and the prober's first reconnects.
//! * `stop_ms`: how long `pg_ctl stop -m immediate -w` took to return (it
//!   polls for the server's exit); it is part of `window-promote_ms`.
//!
//! Then `p50` (nearest rank) and `max` over the runs, the targets and
//! whether they were met, every distinct client error message, and
//! pgpivot's own change log for the last run (times relative to the crash).
//! The bench fails if an acknowledged write was lost or went to a stale
//! primary.
//!
//! **Idle sessions** (`[failover] move_sessions`, on by default): before each
//! crash, 200 sessions are opened through pgpivot, each with its own
//! `application_name`, and left idle. Once the new primary is published each
//! runs one query, all at once. `idle_kept` counts those that answered from
//! the new primary with their setting intact, `idle_err` those that failed;
//! `move_p50_ms` / `move_p99_ms` are pgpivot's own move times (the old
//! server's goodbye → relaying on the new node, which includes waiting for
//! the promotion), and `idle_ans_p99_ms` the slowest first answer after the
//! publication as the clients saw it. After the crash runs, one **planned
//! switchover** (`POST /pause?scope=writes`, fast stop, promote,
//! `POST /resume`) with the writer and 200 idle sessions prints the same
//! figures and the writer's errors.
//!
//! ```text
//! cargo bench --bench failover
//! cargo bench --bench failover -- --runs 10
//! PGPIVOT_BENCH_RUNS=3 cargo bench --bench failover
//! RUST_LOG=pgpivot=info cargo bench --bench failover   # pgpivot's logs
//! ```

// Benches run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, Row};

use pgpivot::config::{FileConfig, ListenerConfig};
use pgpivot::decider::{ChangeRecord, TopologyHandle};
use pgpivot::localcluster::{
    ClusterOptions, LocalCluster, LocalNode, StopMode, PASSWORD, SUPERUSER,
};
use pgpivot::metrics::LatencySnapshot;
use pgpivot::proxy::Proxy;
use pgpivot::routing::Target;
use pgpivot::topology::{NodeId, Status};

/// Runs when neither `--runs` nor `PGPIVOT_BENCH_RUNS` says otherwise.
const DEFAULT_RUNS: usize = 5;
/// Pause between two writer inserts.
const WRITE_EVERY: Duration = Duration::from_millis(10);
/// Pause between two prober sessions.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Acknowledged writes before the crash, and after it before the run ends.
const ACKS_BEFORE_CRASH: usize = 20;
const ACKS_AFTER_CRASH: usize = 20;
/// Deadline of every step that waits for something.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two checks of a condition being waited for.
const POLL: Duration = Duration::from_millis(1);
/// Longest acceptable `detect_ms` at the default 250 ms poll interval.
const DETECTION_TARGET_MS: f64 = 300.0;
/// Idle sessions opened before each crash; each must keep working after it.
const IDLE_SESSIONS: usize = 200;
/// Where an idle session is, and whether its setting survived.
const IDLE_SQL: &str = "select current_setting('application_name'), inet_server_port()";
/// The writer's insert; the port tells which server acknowledged it.
const INSERT_SQL: &str =
    "insert into writes (run, id) values ($1, $2) returning inet_server_port()";
/// Where a prober session landed.
const LANDING_SQL: &str = "select inet_server_port(), pg_is_in_recovery()";

/// Command line, after `cargo bench --bench failover --`.
#[derive(Parser, Debug)]
#[command(about = "pgpivot crash-failover benchmark")]
struct Options {
    /// Crash failovers to run [env: PGPIVOT_BENCH_RUNS] [default: 5].
    #[arg(long)]
    runs: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Options {
    /// Number of runs: the command line, else the environment, else 5.
    fn runs(&self) -> anyhow::Result<usize> {
        let runs = match (self.runs, std::env::var("PGPIVOT_BENCH_RUNS")) {
            (Some(runs), _) => runs,
            (None, Ok(text)) => text
                .parse()
                .with_context(|| format!("PGPIVOT_BENCH_RUNS={text:?} is not a number"))?,
            (None, Err(_)) => DEFAULT_RUNS,
        };
        if runs == 0 {
            bail!("at least one run is needed");
        }
        Ok(runs)
    }
}

/// Which node is the primary in a run (node ids are cluster indexes: the
/// proxy's node list is the cluster's, in order).
#[derive(Debug, Clone, Copy)]
struct Roles {
    primary: NodeId,
    standby: NodeId,
}

impl Roles {
    /// The roles after the standby was promoted and the primary rejoined.
    fn swapped(self) -> Roles {
        Roles {
            primary: self.standby,
            standby: self.primary,
        }
    }
}

/// When a step began and ended.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: Instant,
    end: Instant,
}

/// Runs a blocking cluster operation without stalling the runtime (the
/// proxy, writer and prober keep running), and times it.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Span) {
    let start = Instant::now();
    let value = tokio::task::block_in_place(f);
    (
        value,
        Span {
            start,
            end: Instant::now(),
        },
    )
}

/// Milliseconds from `from` to `to`, negative when `to` came first.
fn ms_between(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => ms(d),
        None => -ms(from - to),
    }
}

/// A duration in milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Locks a mutex, ignoring poisoning (a panicked task fails the bench
/// through its join handle anyway).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits until `check` holds, for at most [`STEP_TIMEOUT`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !check() {
        if Instant::now() >= deadline {
            bail!("timed out after {STEP_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The cluster

/// Makes `roles.primary` wait for `roles.standby` on every commit and waits
/// until its `pg_stat_replication` shows the standby as `sync`.
fn make_synchronous(cluster: &LocalCluster, roles: Roles) -> anyhow::Result<()> {
    cluster.psql(
        roles.primary,
        "alter system set synchronous_standby_names = '*'",
    )?;
    cluster.psql(roles.primary, "select pg_reload_conf()")?;
    let sql = format!(
        "select count(*) from pg_stat_replication \
         where application_name = '{}' and sync_state = 'sync'",
        cluster.node(roles.standby).name
    );
    let deadline = Instant::now() + STEP_TIMEOUT;
    while cluster.psql(roles.primary, &sql)? != "1" {
        if Instant::now() >= deadline {
            bail!(
                "{} never became a synchronous standby of {}",
                cluster.node(roles.standby).name,
                cluster.node(roles.primary).name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Undoes [`make_synchronous`] on node `i`: a promoted node has no standby
/// until the old primary rejoins, and must not wait for one.
fn make_asynchronous(cluster: &LocalCluster, i: NodeId) -> anyhow::Result<()> {
    cluster.psql(i, "alter system reset synchronous_standby_names")?;
    cluster.psql(i, "select pg_reload_conf()")?;
    Ok(())
}

/// After a run: rejoins the crashed primary as a synchronous standby of the
/// promoted node and returns the roles of the next run. `pg_rewind` copies
/// the promoted node's (reset) configuration to the rejoined one, so only
/// the new primary ever carries `synchronous_standby_names`.
fn rejoin_crashed_primary(cluster: &LocalCluster, roles: Roles) -> anyhow::Result<Roles> {
    let next = roles.swapped();
    make_asynchronous(cluster, next.primary)?;
    cluster.rejoin_as_standby(next.standby, next.primary)?;
    make_synchronous(cluster, next)?;
    Ok(next)
}

/// libpq connection string for the superuser through `addr`.
fn conn_string(addr: SocketAddr) -> String {
    format!(
        "host={} port={} user={SUPERUSER} password={PASSWORD} dbname=postgres",
        addr.ip(),
        addr.port()
    )
}

/// Opens a tokio-postgres session (its connection runs on its own task).
async fn connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// An error as a client sees it: SQLSTATE and message for server (or
/// pgpivot) errors, else the driver's description.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// The port in column `i` of `row` (an `inet_server_port()`).
fn port_of(row: &Row, i: usize) -> u16 {
    u16::try_from(row.get::<_, i32>(i)).unwrap_or(0)
}

/// The ids of run `run` that `node` holds, read directly (not through
/// pgpivot).
async fn stored_ids(node: &LocalNode, run: i32) -> anyhow::Result<BTreeSet<i64>> {
    let client = connect(&node.conn_string()).await?;
    let rows = client
        .query("select id from writes where run = $1", &[&run])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

// ---------------------------------------------------------------------------
// pgpivot and the tasks around it

/// pgpivot in front of `cluster`: default `[monitor]` and `[failover]`,
/// one read-write listener on an ephemeral port.
async fn start_proxy(cluster: &LocalCluster) -> anyhow::Result<Proxy> {
    // Default [monitor] and [failover] settings: the figures are for those.
    let listeners = vec![ListenerConfig::new("127.0.0.1:0", Target::ReadWrite)];
    let file = pgpivot::demo::file_config(cluster, listeners);
    Ok(Proxy::start(file.validate()?).await?)
}

/// Whether pgpivot's topology shows `roles` (primary and streaming standby).
fn shows(topology: &TopologyHandle, roles: Roles) -> bool {
    let t = topology.load();
    t.primary == Some(roles.primary) && t.nodes[roles.standby].status == Status::Standby
}

/// A task that runs until asked to stop; dropping it aborts the task.
struct Background<T> {
    stop: Arc<AtomicBool>,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> Background<T> {
    /// Spawns `body`, which should return soon after its flag is set.
    fn spawn<Fut>(body: impl FnOnce(Arc<AtomicBool>) -> Fut) -> Background<T>
    where
        Fut: Future<Output = T> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(body(stop.clone()));
        Background { stop, task }
    }

    /// Sets the flag and waits for the task's result.
    async fn finish(mut self) -> anyhow::Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        Ok((&mut self.task).await?)
    }
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A topology generation, stamped when the watcher saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    primary: Option<NodeId>,
}

/// Records every generation pgpivot announces on its watch channel.
fn watch_topology(topology: TopologyHandle) -> Background<Vec<Seen>> {
    Background::spawn(|stop| async move {
        let mut changes = topology.subscribe();
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            // Wake now and then to look at the flag.
            match tokio::time::timeout(Duration::from_millis(50), changes.changed()).await {
                Ok(Ok(())) => seen.push(Seen {
                    at: Instant::now(),
                    primary: topology.load().primary,
                }),
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
        seen
    })
}

/// One acknowledged insert.
#[derive(Debug, Clone, Copy)]
struct Ack {
    id: i64,
    at: Instant,
    /// Port of the server that committed it.
    port: u16,
}

/// What the writer saw.
#[derive(Debug, Default)]
struct WriterLog {
    acks: Vec<Ack>,
    /// Inserts that failed on an open session.
    inflight_errors: Vec<String>,
    /// Connects through pgpivot that failed.
    connect_errors: Vec<String>,
}

impl WriterLog {
    /// Acknowledgements received after `t`.
    fn acks_after(&self, t: Instant) -> usize {
        self.acks.iter().filter(|a| a.at > t).count()
    }
}

/// The writer: one insert every [`WRITE_EVERY`] through `addr`, run `run`,
/// logging into `log`.
fn spawn_writer(addr: SocketAddr, run: i32, log: Arc<Mutex<WriterLog>>) -> Background<()> {
    Background::spawn(move |stop| async move {
        let conn = conn_string(addr);
        let mut session: Option<Client> = None;
        let mut id = 0i64;
        while !stop.load(Ordering::Relaxed) {
            let client = match session.take() {
                Some(client) => client,
                None => match connect(&conn).await {
                    Ok(client) => client,
                    Err(e) => {
                        lock(&log).connect_errors.push(describe(&e));
                        tokio::time::sleep(WRITE_EVERY).await;
                        continue;
                    }
                },
            };
            id += 1;
            let result = client.query_one(INSERT_SQL, &[&run, &id]).await;
            let at = Instant::now();
            match result {
                Ok(row) => {
                    let port = port_of(&row, 0);
                    lock(&log).acks.push(Ack { id, at, port });
                    session = Some(client);
                }
                Err(e) => lock(&log).inflight_errors.push(describe(&e)),
            }
            tokio::time::sleep(WRITE_EVERY).await;
        }
    })
}

/// One prober session: how long its connect took and where it landed.
#[derive(Debug)]
struct Probe {
    waited: Duration,
    /// `Err` if it failed or landed anywhere but on the primary at
    /// `expected` (the port of the node being promoted).
    outcome: Result<(), String>,
}

/// Opens one session through `addr` and checks where it landed.
async fn probe_once(addr: SocketAddr, expected: u16) -> Probe {
    let started = Instant::now();
    let client = match connect(&conn_string(addr)).await {
        Ok(client) => client,
        Err(e) => {
            return Probe {
                waited: started.elapsed(),
                outcome: Err(describe(&e)),
            }
        }
    };
    let waited = started.elapsed();
    let outcome = match client.query_one(LANDING_SQL, &[]).await {
        Ok(row) if (port_of(&row, 0), row.get(1)) == (expected, false) => Ok(()),
        Ok(row) => Err(format!(
            "landed on port {} (in recovery: {})",
            port_of(&row, 0),
            row.get::<_, bool>(1)
        )),
        Err(e) => Err(describe(&e)),
    };
    Probe { waited, outcome }
}

/// The prober: a new session through `addr` every [`PROBE_EVERY`] until
/// stopped, each on its own task; returns them all once they ended.
fn spawn_prober(addr: SocketAddr, expected: u16) -> Background<Vec<Probe>> {
    Background::spawn(move |stop| async move {
        let mut sessions = Vec::new();
        loop {
            sessions.push(tokio::spawn(probe_once(addr, expected)));
            tokio::time::sleep(PROBE_EVERY).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let mut probes = Vec::new();
        for session in sessions {
            probes.push(session.await.unwrap_or_else(|e| Probe {
                waited: Duration::ZERO,
                outcome: Err(format!("probe task failed: {e}")),
            }));
        }
        probes
    })
}

// ---------------------------------------------------------------------------
// One run

/// An extra delay before the crash of run `run` of `runs`: `(run - 1) / runs`
/// of the default poll interval.
///
/// Without it every run would crash and promote at the same point of the
/// monitors' poll cycle (they start with the proxy, and the steps before the
/// crash take about the same time each run), and `detect_ms` would measure
/// that one phase over and over. Spreading the crash evenly over one
/// interval samples every phase, which a handful of runs can't be trusted to
/// do at random.
fn crash_phase(run: usize, runs: usize) -> Duration {
    let interval = Duration::from_millis(FileConfig::default().monitor.interval_ms);
    interval * (run - 1) as u32 / runs as u32
}

/// Everything one run observed, before it is reduced to [`Figures`].
struct RunRecord {
    roles: Roles,
    old_port: u16,
    new_port: u16,
    /// The `pg_ctl stop -m immediate` call, and the wall clock at its start
    /// in ms since the Unix epoch (to place pgpivot's change log).
    crash: Span,
    crash_unix_ms: f64,
    /// The `pg_ctl promote -w` call.
    promote: Span,
    seen: Vec<Seen>,
    writes: WriterLog,
    probes: Vec<Probe>,
    stored: BTreeSet<i64>,
    changes: Vec<ChangeRecord>,
    idle: IdleOutcome,
    move_time: LatencySnapshot,
}

/// What the idle sessions saw after the cutover.
#[derive(Debug, Default)]
struct IdleOutcome {
    kept: usize,
    errors: Vec<String>,
    /// Each session's first answer after the publication, in ms.
    answer_ms: Vec<f64>,
}

/// Opens [`IDLE_SESSIONS`] sessions, 20 at a time, each with its own
/// `application_name`.
async fn open_idle(addr: SocketAddr) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(IDLE_SESSIONS);
    for batch in (0..IDLE_SESSIONS).collect::<Vec<_>>().chunks(20) {
        let opened = futures_util::future::try_join_all(batch.iter().map(|&i| async move {
            let client = connect(&conn_string(addr)).await?;
            client
                .batch_execute(&format!("SET application_name = 'idle {i}'"))
                .await?;
            Ok::<_, tokio_postgres::Error>(client)
        }))
        .await
        .context("opening the idle sessions")?;
        clients.extend(opened);
    }
    Ok(clients)
}

/// Every idle session's next query, all at once.
async fn check_idle(clients: &[Client], new_port: u16) -> IdleOutcome {
    let answers =
        futures_util::future::join_all(clients.iter().enumerate().map(|(i, c)| async move {
            let started = Instant::now();
            let row = c.query_one(IDLE_SQL, &[]).await;
            (i, row, started.elapsed())
        }))
        .await;
    let mut outcome = IdleOutcome::default();
    for (i, row, took) in answers {
        outcome.answer_ms.push(ms(took));
        match row {
            Ok(row)
                if row.get::<_, String>(0) == format!("idle {i}")
                    && port_of(&row, 1) == new_port =>
            {
                outcome.kept += 1
            }
            Ok(row) => outcome.errors.push(format!(
                "idle session {i} answered as {:?} from port {}",
                row.get::<_, String>(0),
                port_of(&row, 1)
            )),
            Err(e) => outcome.errors.push(describe(&e)),
        }
    }
    outcome
}

/// Microseconds to milliseconds for a snapshot quantile.
fn quantile_ms(s: &LatencySnapshot, q: f64) -> Option<f64> {
    let found = s.quantiles.iter().find(|(at, _)| *at == q);
    found
        .filter(|_| s.count > 0)
        .map(|(_, us)| *us as f64 / 1000.0)
}

/// Crashes `roles.primary` under load and promotes `roles.standby`, with a
/// fresh pgpivot in front of the cluster; run number `run` tags the rows.
/// The crash comes `phase` later than the bench could make it.
async fn run_once(
    cluster: &LocalCluster,
    roles: Roles,
    run: i32,
    phase: Duration,
) -> anyhow::Result<RunRecord> {
    let proxy = start_proxy(cluster).await?;
    let topology = proxy.shared.topology.clone();
    eventually("pgpivot to see the primary and its standby", || {
        shows(&topology, roles)
    })
    .await?;
    let rw = proxy.addresses[0];
    let new_port = cluster.node(roles.standby).port;
    let watcher = watch_topology(topology.clone());
    let idle = open_idle(rw).await?;
    let log = Arc::new(Mutex::new(WriterLog::default()));
    let writer = spawn_writer(rw, run, log.clone());
    eventually("writes before the crash", || {
        lock(&log).acks.len() >= ACKS_BEFORE_CRASH
    })
    .await?;
    tokio::time::sleep(phase).await;

    let crash_unix_ms = ms(SystemTime::now().duration_since(UNIX_EPOCH)?);
    let (stopped, crash) = timed(|| cluster.stop_node(roles.primary, StopMode::Immediate));
    stopped?;
    let prober = spawn_prober(rw, new_port);
    let (promoted, promote) = timed(|| cluster.promote(roles.standby));
    promoted?;
    eventually("pgpivot to publish the promoted primary", || {
        topology.load().primary == Some(roles.standby)
    })
    .await?;
    let probes = prober.finish().await?;
    let idle = check_idle(&idle, new_port).await;
    eventually("writes after the failover", || {
        lock(&log).acks_after(crash.end) >= ACKS_AFTER_CRASH
    })
    .await?;
    writer.finish().await?;
    let writes = std::mem::take(&mut *lock(&log));

    let record = RunRecord {
        roles,
        old_port: cluster.node(roles.primary).port,
        new_port,
        crash,
        crash_unix_ms,
        promote,
        seen: watcher.finish().await?,
        writes,
        probes,
        stored: stored_ids(cluster.node(roles.standby), run).await?,
        changes: topology.changes(),
        idle,
        move_time: proxy.shared.metrics.moves.move_time.snapshot(),
    };
    proxy.shutdown(Duration::from_secs(1)).await;
    Ok(record)
}

/// A planned switchover from `roles.primary` to `roles.standby` through
/// pgpivot's admin endpoint, with the writer and [`IDLE_SESSIONS`] idle
/// sessions; prints their figures. Fails if a write or an idle session saw
/// an error.
async fn switchover_once(cluster: &LocalCluster, roles: Roles, run: i32) -> anyhow::Result<()> {
    let listeners = vec![ListenerConfig::new("127.0.0.1:0", Target::ReadWrite)];
    let mut file = pgpivot::demo::file_config(cluster, listeners);
    file.admin = Some(pgpivot::config::AdminConfig {
        address: "127.0.0.1:0".into(),
        token: None,
    });
    let proxy = Proxy::start(file.validate()?).await?;
    let topology = proxy.shared.topology.clone();
    eventually("pgpivot to see the primary and its standby", || {
        shows(&topology, roles)
    })
    .await?;
    let admin = proxy.admin_address.context("admin endpoint")?.to_string();
    let rw = proxy.addresses[0];
    let new_port = cluster.node(roles.standby).port;
    let idle = open_idle(rw).await?;
    let log = Arc::new(Mutex::new(WriterLog::default()));
    let writer = spawn_writer(rw, run, log.clone());
    eventually("writes before the switchover", || {
        lock(&log).acks.len() >= ACKS_BEFORE_CRASH
    })
    .await?;
    let call = |method, path| pgpivot::admin::client::call(&admin, method, path, None);
    let began = Instant::now();
    let (status, body) = call("POST", "/pause?scope=writes&timeout_ms=10000").await?;
    anyhow::ensure!(status == 200, "pause: {body}");
    blocking_step(|| cluster.stop_node(roles.primary, StopMode::Fast))?;
    blocking_step(|| cluster.promote(roles.standby))?;
    eventually("pgpivot to publish the promoted primary", || {
        topology.load().primary == Some(roles.standby)
    })
    .await?;
    let (status, body) = call("POST", "/resume").await?;
    anyhow::ensure!(status == 200, "resume: {body}");
    let resumed = began.elapsed();
    let outcome = check_idle(&idle, new_port).await;
    eventually("writes after the switchover", || {
        lock(&log).acks_after(began + resumed) >= ACKS_AFTER_CRASH
    })
    .await?;
    writer.finish().await?;
    let writes = std::mem::take(&mut *lock(&log));
    let moves = proxy.shared.metrics.moves.move_time.snapshot();
    let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    println!(
        "\nplanned switchover (pause, fast stop, promote, resume in {:.0} ms): \
         {IDLE_SESSIONS} idle sessions: kept {}, errors {}; move p50 {} ms, p99 {} ms; \
         first answers p99 {} ms; writer errors {}",
        ms(resumed),
        outcome.kept,
        outcome.errors.len(),
        show(quantile_ms(&moves, 0.5)),
        show(quantile_ms(&moves, 0.99)),
        show(nearest_rank(&outcome.answer_ms, 0.99)),
        writes.inflight_errors.len() + writes.connect_errors.len(),
    );
    for e in outcome.errors.iter().chain(&writes.inflight_errors).take(5) {
        println!("  error: {e}");
    }
    proxy.shutdown(Duration::from_secs(1)).await;
    let errors = outcome.errors.len() + writes.inflight_errors.len() + writes.connect_errors.len();
    anyhow::ensure!(
        errors == 0,
        "{errors} client errors at the planned switchover"
    );
    Ok(())
}

/// Runs a blocking cluster step off the runtime's async path.
fn blocking_step<T, E: Into<anyhow::Error>>(f: impl FnOnce() -> Result<T, E>) -> anyhow::Result<T> {
    tokio::task::block_in_place(f).map_err(Into::into)
}

/// The figures of one run (see the module documentation).
#[derive(Debug, Clone)]
struct Figures {
    detect_ms: f64,
    promote_ms: f64,
    window_ms: f64,
    window_minus_promote_ms: f64,
    inflight_err: usize,
    new_sess_err: usize,
    new_sess_waited: usize,
    max_wait_ms: f64,
    lost: usize,
    stale_writes: usize,
    down_ms: Option<f64>,
    stop_ms: f64,
    idle_kept: usize,
    idle_err: usize,
    move_p50_ms: Option<f64>,
    move_p99_ms: Option<f64>,
    idle_answer_p99_ms: Option<f64>,
}

impl RunRecord {
    /// When the watcher first saw, after the crash began, a topology whose
    /// primary is `primary`.
    fn first_seen(&self, primary: Option<NodeId>) -> Option<Instant> {
        self.seen
            .iter()
            .find(|s| s.at >= self.crash.start && s.primary == primary)
            .map(|s| s.at)
    }

    /// Instants of the writes acknowledged by the server at `port`.
    fn acks_from(&self, port: u16) -> impl Iterator<Item = Instant> + '_ {
        self.writes
            .acks
            .iter()
            .filter(move |a| a.port == port)
            .map(|a| a.at)
    }

    /// Reduces the run to its figures; fails if the run lacks an event a
    /// figure is measured from.
    fn figures(&self) -> anyhow::Result<Figures> {
        let published = self
            .first_seen(Some(self.roles.standby))
            .context("the watcher never saw the promoted primary")?;
        let last_old = self
            .acks_from(self.old_port)
            .max()
            .context("no write was acknowledged by the old primary")?;
        let first_new = self
            .acks_from(self.new_port)
            .min()
            .context("no write was acknowledged by the new primary")?;
        let window_ms = ms_between(last_old, first_new);
        let promote_ms = ms(self.promote.end - self.promote.start);
        let probe_errors = self.probes.iter().filter(|p| p.outcome.is_err()).count();
        let lost = self
            .writes
            .acks
            .iter()
            .filter(|a| !self.stored.contains(&a.id));
        let stale = self
            .acks_from(self.old_port)
            .filter(|&at| at > self.crash.end);
        Ok(Figures {
            detect_ms: ms_between(self.promote.end, published),
            promote_ms,
            window_ms,
            window_minus_promote_ms: window_ms - promote_ms,
            inflight_err: self.writes.inflight_errors.len(),
            new_sess_err: self.writes.connect_errors.len() + probe_errors,
            new_sess_waited: self.probes.len() - probe_errors,
            max_wait_ms: self.probes.iter().map(|p| ms(p.waited)).fold(0.0, f64::max),
            lost: lost.count(),
            stale_writes: stale.count(),
            down_ms: self
                .first_seen(None)
                .map(|at| ms_between(self.crash.start, at)),
            stop_ms: ms(self.crash.end - self.crash.start),
            idle_kept: self.idle.kept,
            idle_err: self.idle.errors.len(),
            move_p50_ms: quantile_ms(&self.move_time, 0.5),
            move_p99_ms: quantile_ms(&self.move_time, 0.99),
            idle_answer_p99_ms: nearest_rank(&self.idle.answer_ms, 0.99),
        })
    }

    /// Every client error of this run, prefixed with where it happened.
    fn error_messages(&self) -> Vec<String> {
        let labelled = |kind: &str, messages: &[String]| -> Vec<String> {
            messages.iter().map(|m| format!("{kind}: {m}")).collect()
        };
        let probes: Vec<String> = self
            .probes
            .iter()
            .filter_map(|p| p.outcome.clone().err())
            .collect();
        [
            labelled("in-flight insert", &self.writes.inflight_errors),
            labelled("writer reconnect", &self.writes.connect_errors),
            labelled("prober session", &probes),
            labelled("idle session", &self.idle.errors),
        ]
        .concat()
    }
}

// ---------------------------------------------------------------------------
// Report

/// A column of the results table.
struct Column {
    name: &'static str,
    decimals: usize,
    value: fn(&Figures) -> Option<f64>,
}

const COLUMNS: &[Column] = &[
    Column {
        name: "detect_ms",
        decimals: 1,
        value: |f| Some(f.detect_ms),
    },
    Column {
        name: "promote_ms",
        decimals: 1,
        value: |f| Some(f.promote_ms),
    },
    Column {
        name: "window_ms",
        decimals: 1,
        value: |f| Some(f.window_ms),
    },
    Column {
        name: "window-promote_ms",
        decimals: 1,
        value: |f| Some(f.window_minus_promote_ms),
    },
    Column {
        name: "inflight_err",
        decimals: 0,
        value: |f| Some(f.inflight_err as f64),
    },
    Column {
        name: "new_sess_err",
        decimals: 0,
        value: |f| Some(f.new_sess_err as f64),
    },
    Column {
        name: "new_sess_waited",
        decimals: 0,
        value: |f| Some(f.new_sess_waited as f64),
    },
    Column {
        name: "max_wait_ms",
        decimals: 1,
        value: |f| Some(f.max_wait_ms),
    },
    Column {
        name: "lost",
        decimals: 0,
        value: |f| Some(f.lost as f64),
    },
    Column {
        name: "stale_writes",
        decimals: 0,
        value: |f| Some(f.stale_writes as f64),
    },
    Column {
        name: "down_ms",
        decimals: 1,
        value: |f| f.down_ms,
    },
    Column {
        name: "stop_ms",
        decimals: 1,
        value: |f| Some(f.stop_ms),
    },
    Column {
        name: "idle_kept",
        decimals: 0,
        value: |f| Some(f.idle_kept as f64),
    },
    Column {
        name: "idle_err",
        decimals: 0,
        value: |f| Some(f.idle_err as f64),
    },
    Column {
        name: "move_p50_ms",
        decimals: 1,
        value: |f| f.move_p50_ms,
    },
    Column {
        name: "move_p99_ms",
        decimals: 1,
        value: |f| f.move_p99_ms,
    },
    Column {
        name: "idle_ans_p99_ms",
        decimals: 1,
        value: |f| f.idle_answer_p99_ms,
    },
];

/// Prints one table line: a label, then one right-aligned cell per column.
fn print_row(label: &str, cells: impl Iterator<Item = String>) {
    let mut line = format!("{label:<4}");
    for (column, cell) in COLUMNS.iter().zip(cells) {
        line.push_str(&format!(
            "  {cell:>width$}",
            width = column.name.len().max(7)
        ));
    }
    println!("{}", line.trim_end());
}

/// A value formatted for `column`, `-` when there is none.
fn cell(column: &Column, value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.*}", column.decimals))
}

/// The `q` quantile of `values` by nearest rank (an observed value).
fn nearest_rank(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// The per-run lines, then p50 and max of each column.
fn print_table(figures: &[Figures]) {
    print_row("run", COLUMNS.iter().map(|c| c.name.to_string()));
    for (i, f) in figures.iter().enumerate() {
        print_row(
            &(i + 1).to_string(),
            COLUMNS.iter().map(|c| cell(c, (c.value)(f))),
        );
    }
    for (label, q) in [("p50", 0.5), ("max", 1.0)] {
        print_row(
            label,
            COLUMNS.iter().map(|c| {
                let values: Vec<f64> = figures.iter().filter_map(c.value).collect();
                cell(c, nearest_rank(&values, q))
            }),
        );
    }
}

/// The targets and whether every run met them.
fn print_targets(figures: &[Figures]) {
    println!(
        "targets: detection <= {DETECTION_TARGET_MS:.0} ms at the default 250 ms interval; \
         0 new-session errors; 0 stale writes"
    );
    let max_detect = figures.iter().map(|f| f.detect_ms).fold(f64::MIN, f64::max);
    let total = |count: fn(&Figures) -> usize| figures.iter().map(count).sum::<usize>();
    let verdicts = [
        (
            format!("detection: max {max_detect:.1} ms"),
            max_detect <= DETECTION_TARGET_MS,
        ),
        (
            format!("new-session errors: {}", total(|f| f.new_sess_err)),
            total(|f| f.new_sess_err) == 0,
        ),
        (
            format!("stale writes: {}", total(|f| f.stale_writes)),
            total(|f| f.stale_writes) == 0,
        ),
        (
            format!("lost writes: {}", total(|f| f.lost)),
            total(|f| f.lost) == 0,
        ),
    ];
    for (what, met) in verdicts {
        println!("  {what:<32} {}", if met { "met" } else { "MISSED" });
    }
}

/// Every distinct client error over all runs, with its count.
fn print_errors(errors: &BTreeMap<String, usize>) {
    if errors.is_empty() {
        println!("client errors: none");
        return;
    }
    println!("client errors (all runs):");
    for (message, count) in errors {
        println!("  {count:>3} x {message}");
    }
}

/// pgpivot's change log of one run, in milliseconds from the crash.
fn print_change_log(run: usize, record: &RunRecord) {
    println!("pgpivot topology changes, run {run} (ms after the crash):");
    for change in &record.changes {
        let offset = change.at_unix_ms as f64 - record.crash_unix_ms;
        println!(
            "  {offset:>+9.1}  gen {:<3} {:<13} {}",
            change.generation, change.kind, change.summary
        );
    }
}

// ---------------------------------------------------------------------------
// Main

/// Every run on one cluster, then the report. Fails if a run failed or an
/// acknowledged write was lost or reached a stale primary.
async fn bench(cluster: &LocalCluster, runs: usize) -> anyhow::Result<()> {
    let mut roles = Roles {
        primary: 0,
        standby: 1,
    };
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let table = "create table writes (run int, id bigint, primary key (run, id))";
        cluster.psql(roles.primary, table)?;
        make_synchronous(cluster, roles)
    })?;
    let mut figures = Vec::new();
    let mut errors = BTreeMap::new();
    let mut last = None;
    for run in 1..=runs {
        let name = |i: NodeId| cluster.node(i).name.clone();
        if run > 1 {
            let (rejoined, took) = timed(|| rejoin_crashed_primary(cluster, roles));
            roles = rejoined.with_context(|| format!("rejoining {}", name(roles.primary)))?;
            let took = took.end - took.start;
            eprintln!(
                "rejoined {} as a synchronous standby in {took:.1?}",
                name(roles.standby)
            );
        }
        eprintln!(
            "run {run}/{runs}: crashing {}, promoting {}",
            name(roles.primary),
            name(roles.standby)
        );
        let phase = crash_phase(run, runs);
        let record = run_once(cluster, roles, run as i32, phase)
            .await
            .with_context(|| format!("run {run}"))?;
        figures.push(record.figures().with_context(|| format!("run {run}"))?);
        for message in record.error_messages() {
            *errors.entry(message).or_insert(0) += 1;
        }
        last = Some(record);
    }
    let (rejoined, _) = timed(|| rejoin_crashed_primary(cluster, roles));
    roles = rejoined.context("rejoining before the switchover")?;
    let switchover = switchover_once(cluster, roles, runs as i32 + 1).await;
    println!();
    print_table(&figures);
    print_targets(&figures);
    print_errors(&errors);
    if let Some(record) = &last {
        print_change_log(runs, record);
    }
    let broken: usize = figures.iter().map(|f| f.lost + f.stale_writes).sum();
    if broken > 0 {
        bail!("{broken} acknowledged write(s) lost or sent to a stale primary");
    }
    switchover
}

fn main() -> anyhow::Result<()> {
    let began = Instant::now();
    let runs = Options::parse().runs()?;
    common::init_tracing("error");
    eprintln!("starting a local PostgreSQL primary and one standby...");
    let cluster = LocalCluster::start(ClusterOptions {
        standbys: 1,
        // The idle sessions, the writer, the prober and the monitor.
        extra_conf: vec!["max_connections = 300".into()],
        ..ClusterOptions::default()
    })
    .context("a local PostgreSQL cluster (are the server binaries installed?)")?;
    let started = began.elapsed();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(bench(&cluster, runs));
    drop(runtime);
    drop(cluster);
    println!(
        "\n{runs} runs, {} CPUs; cluster start {:.1} s, whole bench {:.1} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    outcome
}

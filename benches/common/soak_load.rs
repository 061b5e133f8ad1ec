//! The soak bench's client sessions: tokio-postgres connections through
//! pgpivot, each playing one role until the run is cancelled, and the
//! totals they add up to.
//!
//! Roles, by default share of the sessions (the remainder is `short`;
//! [`Mix`] changes the shares):
//!
//! * `short`: a prepared single-row SELECT (and, one query in ten, a simple
//!   query) every `query_interval` ± 50 %.
//! * `copy` (5 %): every 5–15 s, alternately `COPY ... TO STDOUT` and
//!   `COPY ... FROM STDIN` (into a temporary table, truncated after) of
//!   [`COPY_ROWS`] × [`COPY_WIDTH`] bytes, each size checked.
//! * `idle` (10 %): one query after connecting, then silent until the end,
//!   when one more query checks that the session survived.
//! * `churn` (5 %): connect, a query or two, stay 5–15 s, disconnect,
//!   reconnect: a few sessions per second close and reopen.
//!
//! Every `tls_every`-th session (each role gets its share) negotiates TLS
//! with pgpivot. An error is counted by SQLSTATE (or by kind when there is
//! none), its first occurrences kept verbatim; the session then reconnects
//! after a second, so the population stays the same.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use pgpivot::backend_tls::MonitorTls;

/// Rows and row width (bytes, newline included) of every COPY: 300 KB.
pub const COPY_ROWS: usize = 300;
pub const COPY_WIDTH: usize = 1_000;
/// The rows every `short` query reads from.
pub const KV_ROWS: i32 = 10_000;
/// Sessions that connect at once while the population ramps up.
const RAMP_CONCURRENCY: usize = 16;
/// Error messages kept verbatim.
const KEPT_MESSAGES: usize = 10;

/// What a session does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Short,
    Copy,
    Idle,
    Churn,
}

/// Shares of the sessions, in percent, per role; `short` takes the rest.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub idle: usize,
    pub copy: usize,
    pub churn: usize,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            idle: 10,
            copy: 5,
            churn: 5,
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = anyhow::Error;

    /// `idle:copy:churn` percentages, e.g. `10:5:5`.
    fn from_str(s: &str) -> anyhow::Result<Mix> {
        let parts: Vec<usize> = s
            .split(':')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("mix {s:?} is not idle:copy:churn percentages"))?;
        match parts[..] {
            [idle, copy, churn] if idle + copy + churn <= 100 => Ok(Mix { idle, copy, churn }),
            _ => anyhow::bail!("mix {s:?} is not idle:copy:churn percentages (sum <= 100)"),
        }
    }
}

impl Role {
    /// The role of session `i` of `n`: idle, copy and churn in blocks after
    /// the short ones, so that every block holds its share of TLS sessions.
    pub fn of(i: usize, n: usize, mix: Mix) -> Role {
        let idle = n * mix.idle / 100;
        let copy = n * mix.copy / 100;
        let churn = n * mix.churn / 100;
        let short = n - idle - copy - churn;
        match i {
            i if i < short => Role::Short,
            i if i < short + idle => Role::Idle,
            i if i < short + idle + copy => Role::Copy,
            _ => Role::Churn,
        }
    }
}

/// How sessions reach pgpivot.
#[derive(Clone)]
pub struct Endpoint {
    /// Plaintext sessions (`sslmode=disable`).
    pub plain: tokio_postgres::Config,
    /// TLS sessions (`sslmode=require`) and their connector (no certificate
    /// check: the bench's certificate is self-signed); `None`: no TLS.
    pub tls: Option<(tokio_postgres::Config, MonitorTls)>,
    /// Every this many sessions, one uses TLS (0: none).
    pub tls_every: usize,
    /// Mean pause between two queries of a `short` session.
    pub query_interval: Duration,
    pub mix: Mix,
}

/// Totals shared by every session; the sampler reads and resets the
/// latency histogram.
pub struct Totals {
    pub queries: AtomicU64,
    pub copies_out: AtomicU64,
    pub copies_in: AtomicU64,
    pub copy_bytes: AtomicU64,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub idle_alive: AtomicU64,
    pub tls_connects: AtomicU64,
    /// Latency of `short` queries since the last sample, nanoseconds.
    pub latency: Mutex<Histogram<u64>>,
    errors: Mutex<Errors>,
}

#[derive(Default)]
struct Errors {
    by_code: BTreeMap<String, u64>,
    messages: Vec<String>,
}

impl Totals {
    pub fn new() -> Totals {
        Totals {
            queries: AtomicU64::new(0),
            copies_out: AtomicU64::new(0),
            copies_in: AtomicU64::new(0),
            copy_bytes: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            idle_alive: AtomicU64::new(0),
            tls_connects: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
            errors: Mutex::new(Errors::default()),
        }
    }

    /// Counts `err` by SQLSTATE (or kind) and keeps its text if it is one
    /// of the first.
    fn error(&self, session: usize, role: Role, what: &str, err: &anyhow::Error) {
        let code = match err.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => match pg.code() {
                Some(state) => state.code().to_owned(),
                None if pg.is_closed() => "closed".to_owned(),
                None => "no-sqlstate".to_owned(),
            },
            None => "check".to_owned(),
        };
        // A std Mutex: held for one map update, never across an await.
        let mut errors = self.errors.lock().unwrap();
        *errors.by_code.entry(code).or_default() += 1;
        if errors.messages.len() < KEPT_MESSAGES {
            errors
                .messages
                .push(format!("session {session} ({role:?}) {what}: {err:#}"));
        }
    }

    /// Errors so far, by SQLSTATE or kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap().by_code.clone()
    }

    /// The first error messages.
    pub fn messages(&self) -> Vec<String> {
        self.errors.lock().unwrap().messages.clone()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.lock().unwrap().by_code.values().sum()
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A histogram of nanoseconds, 1 µs to 60 s.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Starts `n` sessions, at most [`RAMP_CONCURRENCY`] connecting at a time;
/// resolves once every one has connected (or failed to) once. The sessions
/// run until `stop` is cancelled; the returned set drains as they close.
pub async fn start_sessions(
    endpoint: Endpoint,
    n: usize,
    totals: Arc<Totals>,
    stop: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let ramp = Arc::new(Semaphore::new(RAMP_CONCURRENCY));
    let connected = Arc::new(Semaphore::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let endpoint = Arc::new(endpoint);
    for i in 0..n {
        let session = Session {
            id: i,
            role: Role::of(i, n, endpoint.mix),
            tls: endpoint.tls.is_some() && endpoint.tls_every > 0 && i % endpoint.tls_every == 0,
            endpoint: endpoint.clone(),
            totals: totals.clone(),
            stop: stop.clone(),
            rng: StdRng::seed_from_u64(i as u64),
        };
        let (ramp, connected) = (ramp.clone(), connected.clone());
        tasks.spawn(session.run(ramp, connected));
    }
    let _all = connected.acquire_many(n as u32).await;
    tasks
}

/// One client session slot: reconnects after errors (and, for `churn`, on
/// purpose) until the run stops.
struct Session {
    id: usize,
    role: Role,
    tls: bool,
    endpoint: Arc<Endpoint>,
    totals: Arc<Totals>,
    stop: CancellationToken,
    rng: StdRng,
}

impl Session {
    async fn run(mut self, ramp: Arc<Semaphore>, connected: Arc<Semaphore>) {
        let first = {
            let _turn = ramp.acquire().await;
            self.connect().await
        };
        connected.add_permits(1);
        let mut client = first;
        loop {
            let outcome = match client.take() {
                Some(c) => self.play(c).await,
                None => Ok(()),
            };
            if let Err(err) = outcome {
                self.totals.error(self.id, self.role, "query", &err);
                if !self.pause(Duration::from_secs(1)).await {
                    return;
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
            Totals::add(&self.totals.reconnects, 1);
            client = self.connect().await;
            if client.is_none() && !self.pause(Duration::from_secs(1)).await {
                return;
            }
        }
    }

    /// A new connection with its driver spawned; a failure is counted.
    async fn connect(&self) -> Option<Client> {
        let endpoint = self.endpoint.clone();
        let connected = match (&endpoint.tls, self.tls) {
            (Some((config, tls)), true) => {
                config.connect(tls.clone()).await.map(|(client, conn)| {
                    self.drive(conn);
                    client
                })
            }
            _ => endpoint.plain.connect(NoTls).await.map(|(client, conn)| {
                self.drive(conn);
                client
            }),
        };
        match connected {
            Ok(client) => {
                Totals::add(&self.totals.connects, 1);
                if self.tls {
                    Totals::add(&self.totals.tls_connects, 1);
                }
                Some(client)
            }
            Err(err) => {
                self.totals
                    .error(self.id, self.role, "connect", &err.into());
                None
            }
        }
    }

    /// Spawns a connection's driver; an error it ends with (a server's
    /// asynchronous FATAL, a reset) is counted.
    fn drive<F>(&self, conn: F)
    where
        F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
    {
        let (totals, id, role) = (self.totals.clone(), self.id, self.role);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                totals.error(id, role, "connection", &err.into());
            }
        });
    }

    /// Sleeps for `d` unless the run stops first; whether it did not.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.stop.cancelled() => false,
        }
    }

    /// A duration uniformly within `mean` ± 50 %.
    fn jitter(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(self.rng.random_range(0.5..1.5))
    }

    /// The role's work on one connection; returns when the connection
    /// should be replaced (churn) or the run stops.
    async fn play(&mut self, client: Client) -> anyhow::Result<()> {
        match self.role {
            Role::Short => self.short(&client).await,
            Role::Copy => self.copy(&client).await,
            Role::Idle => self.idle(&client).await,
            Role::Churn => self.churn(&client).await,
        }
    }

    async fn short(&mut self, client: &Client) -> anyhow::Result<()> {
        let statement = client
            .prepare("select v from soak_kv where id = $1")
            .await?;
        for n in 0u64.. {
            let pause = self.jitter(self.endpoint.query_interval);
            if !self.pause(pause).await {
                return Ok(());
            }
            let started = Instant::now();
            if n % 10 == 9 {
                client
                    .simple_query("select pg_backend_pid(), now()")
                    .await?;
            } else {
                let id = self.rng.random_range(1..=KV_ROWS);
                let row = client.query_one(&statement, &[&id]).await?;
                anyhow::ensure!(row.get::<_, &str>(0).len() == 32, "short row");
            }
            let nanos = started.elapsed().as_nanos() as u64;
            let _ = self.totals.latency.lock().unwrap().record(nanos.max(1_000));
            Totals::add(&self.totals.queries, 1);
        }
        Ok(())
    }

    async fn copy(&mut self, client: &Client) -> anyhow::Result<()> {
        client
            .batch_execute("create temp table if not exists soak_in (v text)")
            .await?;
        for n in 0u64.. {
            let pause = self.jitter(Duration::from_secs(10));
            if !self.pause(pause).await {
                return Ok(());
            }
            if n % 2 == 0 {
                copy_out(client).await?;
                Totals::add(&self.totals.copies_out, 1);
            } else {
                copy_in(client).await?;
                Totals::add(&self.totals.copies_in, 1);
            }
            Totals::add(&self.totals.copy_bytes, (COPY_ROWS * COPY_WIDTH) as u64);
        }
        Ok(())
    }

    async fn idle(&mut self, client: &Client) -> anyhow::Result<()> {
        client.simple_query("select 1").await?;
        Totals::add(&self.totals.queries, 1);
        self.stop.cancelled().await;
        // Still there after the whole run?
        client.simple_query("select 1").await?;
        Totals::add(&self.totals.queries, 1);
        Totals::add(&self.totals.idle_alive, 1);
        Ok(())
    }

    async fn churn(&mut self, client: &Client) -> anyhow::Result<()> {
        let queries = self.rng.random_range(1..=2);
        for _ in 0..queries {
            client.simple_query("select 1").await?;
            Totals::add(&self.totals.queries, 1);
        }
        let stay = self.jitter(Duration::from_secs(10));
        self.pause(stay).await;
        Ok(())
    }
}

/// `COPY ... TO STDOUT` of the standard size, checked.
async fn copy_out(client: &Client) -> anyhow::Result<()> {
    let sql = format!(
        "copy (select repeat('x', {}) from generate_series(1, {COPY_ROWS})) to stdout",
        COPY_WIDTH - 1
    );
    let mut stream = std::pin::pin!(client.copy_out(sql.as_str()).await?);
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    anyhow::ensure!(
        bytes == COPY_ROWS * COPY_WIDTH,
        "COPY TO STDOUT gave {bytes} bytes"
    );
    Ok(())
}

/// `COPY ... FROM STDIN` of the standard size in 64 KiB chunks, checked,
/// then the table emptied.
async fn copy_in(client: &Client) -> anyhow::Result<()> {
    let line = format!("{}\n", "y".repeat(COPY_WIDTH - 1));
    let per_chunk = 64 * 1024 / COPY_WIDTH;
    let sink = client.copy_in("copy soak_in from stdin").await?;
    let mut sink = std::pin::pin!(sink);
    let mut left = COPY_ROWS;
    while left > 0 {
        let rows = left.min(per_chunk);
        sink.send(Bytes::from(line.repeat(rows))).await?;
        left -= rows;
    }
    let rows = sink.as_mut().finish().await?;
    anyhow::ensure!(rows == COPY_ROWS as u64, "COPY FROM STDIN took {rows} rows");
    client.batch_execute("truncate soak_in").await?;
    Ok(())
}

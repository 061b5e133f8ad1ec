//! The relay bench's bulk case: 100 MB through one connection, each way.
//!
//! * **out**: `COPY (select repeat('x', 1000) from generate_series(1,
//!   100000)) TO STDOUT` (100.1 MB of rows); the client counts the bytes.
//! * **in**: `COPY bench_sink FROM STDIN` of the same rows, sent in 64 KiB
//!   chunks, into an unlogged one-column table (truncated before each run,
//!   outside the timing); the server's row count is checked.
//!
//! MB/s is bytes / 10^6 / seconds from the COPY request to its end. Seven
//! runs per target and direction, interleaved across targets so slow drift
//! of the machine spreads over all of them; best and median are reported,
//! and the median's ratio to the first target's (direct).

use std::pin::pin;
use std::time::Instant;

use anyhow::bail;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use super::fleet::Target;

/// Rows and row width: 100,000 × (1,000 + newline) bytes.
const ROWS: usize = 100_000;
const WIDTH: usize = 1_000;
/// Rows per chunk the client sends COPY FROM STDIN in (64 KiB).
const ROWS_PER_CHUNK: usize = 64;
/// Runs per target and direction.
const RUNS: usize = 7;

/// Which way the bytes go.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// COPY TO STDOUT: server → client.
    Out,
    /// COPY FROM STDIN: client → server.
    In,
}

impl Direction {
    fn title(self) -> &'static str {
        match self {
            Direction::Out => "COPY TO STDOUT",
            Direction::In => "COPY FROM STDIN",
        }
    }
}

/// Best and median MB/s of one target in one direction.
pub struct BulkResult {
    best: f64,
    median: f64,
}

impl BulkResult {
    fn from_runs(mut runs: Vec<f64>) -> BulkResult {
        runs.sort_by(f64::total_cmp);
        BulkResult {
            best: runs[runs.len() - 1],
            median: runs[runs.len() / 2],
        }
    }
}

/// The table `COPY FROM STDIN` fills (on the primary, before any target).
pub async fn create_sink(direct: &Client) -> anyhow::Result<()> {
    direct
        .batch_execute("create unlogged table bench_sink (v text)")
        .await?;
    Ok(())
}

/// Runs every direction against every target.
pub async fn bulk_case(targets: &[Target]) -> Vec<(Direction, Vec<anyhow::Result<BulkResult>>)> {
    let mut out = Vec::new();
    for direction in [Direction::Out, Direction::In] {
        out.push((direction, one_direction(targets, direction).await));
    }
    out
}

async fn one_direction(
    targets: &[Target],
    direction: Direction,
) -> Vec<anyhow::Result<BulkResult>> {
    let mut runs: Vec<anyhow::Result<Vec<f64>>> = targets.iter().map(|_| Ok(Vec::new())).collect();
    for round in 1..=RUNS {
        for (target, slot) in targets.iter().zip(&mut runs) {
            let Ok(done) = slot else { continue };
            eprintln!(
                "bulk {}: {} run {round}/{RUNS} ...",
                direction.title(),
                target.name
            );
            let client = match target.connect().await {
                Ok(client) => client,
                Err(err) => {
                    *slot = Err(err);
                    continue;
                }
            };
            let run = match direction {
                Direction::Out => copy_out(&client).await,
                Direction::In => copy_in(&client).await,
            };
            match run {
                Ok(mb_s) => done.push(mb_s),
                Err(err) => *slot = Err(err),
            }
        }
    }
    runs.into_iter()
        .map(|r| r.map(BulkResult::from_runs))
        .collect()
}

/// One COPY TO STDOUT; MB/s (10^6 bytes per second).
async fn copy_out(client: &Client) -> anyhow::Result<f64> {
    let sql =
        format!("copy (select repeat('x', {WIDTH}) from generate_series(1, {ROWS})) to stdout");
    let started = Instant::now();
    let mut stream = pin!(client.copy_out(&sql).await?);
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let expected = ROWS * (WIDTH + 1);
    if bytes != expected {
        bail!("COPY returned {bytes} bytes, expected {expected}");
    }
    Ok(bytes as f64 / 1e6 / seconds)
}

/// One COPY FROM STDIN; MB/s.
async fn copy_in(client: &Client) -> anyhow::Result<f64> {
    client.batch_execute("truncate bench_sink").await?;
    let row = "x".repeat(WIDTH) + "\n";
    let chunk = Bytes::from(row.repeat(ROWS_PER_CHUNK));
    let started = Instant::now();
    let mut sink = pin!(
        client
            .copy_in::<_, Bytes>("copy bench_sink (v) from stdin")
            .await?
    );
    let mut sent = 0;
    while sent < ROWS {
        let rows = ROWS_PER_CHUNK.min(ROWS - sent);
        let piece = chunk.slice(..rows * row.len());
        sink.feed(piece).await?;
        sent += rows;
    }
    let copied = sink.as_mut().finish().await?;
    let seconds = started.elapsed().as_secs_f64();
    if copied != ROWS as u64 {
        bail!("COPY stored {copied} rows, expected {ROWS}");
    }
    Ok((ROWS * row.len()) as f64 / 1e6 / seconds)
}

/// Prints one table per direction; ratios are of medians, against the
/// first (direct) target.
pub fn print_bulk(targets: &[Target], results: &[(Direction, Vec<anyhow::Result<BulkResult>>)]) {
    let mb = (ROWS * (WIDTH + 1)) as f64 / 1e6;
    for (i, (direction, results)) in results.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let title = format!("bulk {} {mb:.0} MB", direction.title());
        println!(
            "{title:<28} {:>12} {:>14} {:>14}",
            "MB/s (best)", "MB/s (median)", "median/direct"
        );
        let base = results[0].as_ref().ok().map(|b| b.median);
        for (target, result) in targets.iter().zip(results) {
            match result {
                Ok(r) => println!(
                    "{:<28} {:>12.1} {:>14.1} {:>14}",
                    target.name,
                    r.best,
                    r.median,
                    super::ratio(r.median, base)
                ),
                Err(err) => println!("{:<28} failed: {err:#}", target.name),
            }
        }
    }
}

/// Failed runs, for the bench's exit status.
pub fn failures(results: &[(Direction, Vec<anyhow::Result<BulkResult>>)]) -> usize {
    results
        .iter()
        .flat_map(|(_, r)| r)
        .filter(|r| r.is_err())
        .count()
}

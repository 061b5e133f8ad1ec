//! Stage 6 of a movable session, between two relays: moving it to another
//! node with its state.
//!
//! ```text
//! relay stopped ─► goodbye? ─────► in flight? ──────► hold ───────► connect ─► log in ───────► replay
//! (MovePoint)      node gone, or   08007 / 40001 +    pause gate,   route as   kept            SET, Parse,
//!                  one backend     ReadyForQuery      hold timeout  a new      credential,     LISTEN, a lost
//!                  ended (relay    to the client                    session    cancel key      block as a
//!                  its goodbye)                                                retargeted      failed one
//! ```
//!
//! What the client sees of a move is a delay, plus, for work the old node
//! took down with it, the error a retry loop expects: 40001 for a
//! transaction block that had not committed, 08007 when a commit's outcome
//! is unknown. [`answer_lost_block`] gives the next statement of a session
//! that sat idle in a lost block its 40001. A move that fails ends the
//! session with 57P01 and the reason ([`MoveError`]).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::connect::{self, Connected, Routes};
use super::ending::eligibility;
use super::error::ConnectError;
use super::mobility::{Blocker, Mobility};
use super::params::SessionRequest;
use super::relay::{MoveCause, MovePoint, ReadBuffer};
use super::state::Replay;
use super::stream::send;
use crate::address::BackendAddress;
use crate::cancel::Registration;
use crate::config::Settings;
use crate::credentials::relogin::{self, ReloginError};
use crate::credentials::store::SecretStore;
use crate::metrics::Gauge;
use crate::pause::Pause;
use crate::protocol::frame::{read_message, Frame, Framer};
use crate::protocol::messages::{self, tag, Severity, TxStatus};
use crate::protocol::sqlstate;
use crate::protocol::startup::{CancelKey, StartupMessage};
use crate::topology::NodeId;

/// Most a replayed statement's answer may be.
const REPLAY_MESSAGE_LIMIT: usize = 1024 * 1024;

/// What a move needs of the session and the proxy.
pub struct MoveContext<'a> {
    pub routes: Routes<'a>,
    pub settings: &'a Settings,
    pub request: &'a SessionRequest,
    pub startup: &'a StartupMessage,
    pub pause: &'a Pause,
    pub busy_gauge: &'a Gauge,
    pub secrets: Option<&'a SecretStore>,
    pub mobility: &'a Mobility,
    pub cancel: Option<&'a Registration>,
    /// The node the session leaves, and where it is (asked, after a
    /// goodbye, whether it still accepts connections).
    pub node: NodeId,
    pub node_name: &'a str,
    pub node_address: &'a BackendAddress,
    pub placed_on_standby: bool,
}

/// A session on its new node, ready to relay.
pub struct Moved {
    pub connected: Connected,
    /// The transaction status the client was last told.
    pub status: TxStatus,
    /// The client sat idle in a transaction block that was lost: its next
    /// statement gets 40001 ([`answer_lost_block`]).
    pub lost_block: bool,
    pub in_hot_standby: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The server ended this one backend (pg_terminate_backend) while its
    /// node stays eligible: relay its goodbye, as without moves.
    #[error("the server ended this session")]
    EndedByServer { said: Vec<u8> },
    #[error("cannot move the session: {}", .0.describe())]
    Blocked(Blocker),
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("pgpivot is paused and the hold timeout passed")]
    Paused,
    #[error("{0}")]
    Connect(ConnectError),
    #[error("logging in again on {node} failed: {source}")]
    Login { node: String, source: ReloginError },
    #[error("{node} is not the primary")]
    NotPrimary { node: String },
    #[error("replaying the session's state on {node} failed: {detail}")]
    Replay { node: String, detail: String },
    #[error("the client went away during the move")]
    ClientGone,
}

impl MoveError {
    /// The label of `pgpivot_session_move_failures_total`.
    pub fn as_label(&self) -> &'static str {
        match self {
            MoveError::EndedByServer { .. } => "ended_by_server",
            MoveError::Blocked(b) => b.as_label(),
            MoveError::ShuttingDown => "shutdown",
            MoveError::Paused => "paused",
            MoveError::Connect(_) => "connect",
            MoveError::Login { .. } => "login",
            MoveError::NotPrimary { .. } => "not_primary",
            MoveError::Replay { .. } => "replay",
            MoveError::ClientGone => "client_gone",
        }
    }
}

/// Moves the session that stopped at `point` to an eligible node. Writes to
/// the client only the answers for work in flight (see the module doc).
pub async fn move_session<C>(
    ctx: &MoveContext<'_>,
    point: MovePoint,
    client: &mut C,
) -> Result<Moved, MoveError>
where
    C: AsyncWrite + Unpin,
{
    if let MoveCause::Goodbye { said } = &point.cause {
        // A WARNING goodbye comes only from an immediate shutdown or a crash
        // (every backend gets it); a FATAL 57P01 may be a fast shutdown or
        // pg_terminate_backend of this one backend, and a silent close may
        // be anything: the node's own answer decides.
        let certain = said.first() == Some(&tag::NOTICE_RESPONSE);
        if !certain && !node_gone(ctx).await {
            let said = said.clone();
            return Err(MoveError::EndedByServer { said });
        }
    }
    if let Some(blocker) = ctx.mobility.blocker() {
        return Err(MoveError::Blocked(blocker));
    }
    let status = answer_in_flight(ctx, &point, client).await?;
    ctx.mobility.tracker().lose_backend();
    let _busy = enter(ctx).await?;
    let connected = connect::connect(ctx.routes, ctx.settings, ctx.request, ctx.startup)
        .await
        .map_err(MoveError::Connect)?;
    log_in_and_replay(ctx, connected, status, point.in_flight == 0).await
}

/// After a server's goodbye: whether its node is going away (a shutdown, a
/// crash), rather than one backend ended by an administrator. The topology
/// may already say so; otherwise the node's postmaster is asked whether it
/// accepts a connection started now ([`ping`]): one shutting down does not.
/// The monitor is asked for a poll too, so the topology catches up.
async fn node_gone(ctx: &MoveContext<'_>) -> bool {
    ctx.routes.monitor.poke(ctx.node);
    let topology = ctx.routes.topology.load();
    if eligibility(
        &topology,
        ctx.node,
        ctx.request.target,
        ctx.placed_on_standby,
    )
    .is_some()
    {
        return true;
    }
    let startup = ctx.startup.encode();
    !ping::accepts_connections(ctx.node_address, &startup, ctx.settings.connect_timeout).await
}

/// Answers the messages the old backend will not: each gets an error and
/// a ReadyForQuery, as a server would. Returns the status the client was
/// told.
async fn answer_in_flight<C: AsyncWrite + Unpin>(
    ctx: &MoveContext<'_>,
    point: &MovePoint,
    client: &mut C,
) -> Result<TxStatus, MoveError> {
    if point.in_flight == 0 {
        return Ok(point.status);
    }
    let unknown = point.status == TxStatus::Idle || ctx.mobility.tracker().commit_in_flight();
    let (code, message, after) = if unknown {
        let m = format!(
            "pgpivot: the connection to {} was lost; whether the last statement (or its commit) took effect is unknown",
            ctx.node_name
        );
        (sqlstate::TRANSACTION_RESOLUTION_UNKNOWN, m, TxStatus::Idle)
    } else {
        let m = format!(
            "pgpivot: the connection to {} was lost; the transaction was rolled back: retry it",
            ctx.node_name
        );
        (sqlstate::SERIALIZATION_FAILURE, m, TxStatus::Failed)
    };
    let in_flight = &ctx.routes.metrics.moves.in_flight_answered;
    let mut answer = BytesMut::new();
    for _ in 0..point.in_flight {
        in_flight.inc(code);
        messages::put_error(&mut answer, Severity::Error, code, &message);
        messages::put_ready(&mut answer, after);
    }
    send(client, &answer)
        .await
        .map_err(|_| MoveError::ClientGone)?;
    Ok(after)
}

/// The pause gate and hold timeout a new session meets.
async fn enter<'a>(ctx: &MoveContext<'a>) -> Result<crate::metrics::GaugeGuard<'a>, MoveError> {
    let needs_primary = ctx.request.target.needs_primary();
    let entered = crate::timers::timeout(
        ctx.settings.hold_timeout,
        ctx.pause.enter(needs_primary, ctx.busy_gauge),
    );
    tokio::select! {
        biased;
        _ = ctx.routes.shutdown.cancelled() => Err(MoveError::ShuttingDown),
        entered = entered => entered.map_err(|_| MoveError::Paused),
    }
}

/// Logs in on the new node with the kept credential, points the client's
/// cancel key at it, and replays the session's state. `status` is what the
/// client was last told; a block (open or failed) is re-created as a failed
/// one, so that only ROLLBACK (or COMMIT, which then rolls back) ends it.
async fn log_in_and_replay(
    ctx: &MoveContext<'_>,
    mut connected: Connected,
    status: TxStatus,
    idle_at_move: bool,
) -> Result<Moved, MoveError> {
    let credential = ctx
        .mobility
        .credential()
        .ok_or(MoveError::Blocked(Blocker::NoCredential))?;
    let node = connected.name.clone();
    let first = std::mem::take(&mut connected.first);
    let login = relogin::answer_challenges(&mut connected.backend, first, credential);
    let logged_in = match crate::timers::timeout(super::AUTH_TIMEOUT, login).await {
        Ok(Ok(logged_in)) => logged_in,
        Ok(Err(source)) => {
            if matches!(source, ReloginError::Refused { .. }) {
                if let (Some(store), Some(role)) = (ctx.secrets, ctx.startup.param("user")) {
                    // The password may have changed: look it up afresh for
                    // the next session of this role.
                    store.forget(role);
                }
            }
            return Err(MoveError::Login { node, source });
        }
        Err(_) => {
            let source =
                ReloginError::Protocol("no answer within the authentication timeout".into());
            return Err(MoveError::Login { node, source });
        }
    };
    let in_hot_standby = logged_in
        .parameters
        .iter()
        .any(|(name, value)| name == "in_hot_standby" && value == "on");
    if ctx.request.target.needs_primary() && in_hot_standby {
        ctx.routes.monitor.poke(connected.node);
        return Err(MoveError::NotPrimary { node });
    }
    if let (Some(cancel), Some((pid, secret))) = (ctx.cancel, logged_in.key) {
        let real = CancelKey {
            pid,
            secret: secret.into(),
        };
        cancel.retarget(&connected.address, real);
    }
    let items = ctx.mobility.tracker().replay();
    replay(&mut connected.backend, &items, status != TxStatus::Idle)
        .await
        .map_err(|detail| MoveError::Replay { node, detail })?;
    Ok(Moved {
        connected,
        status,
        lost_block: idle_at_move && status == TxStatus::InTransaction,
        in_hot_standby,
    })
}

/// Runs `items` on the new backend in one pipelined batch, then, for a lost
/// block, opens a block and fails it on purpose. Any other error fails the
/// move: the state would not be the client's.
async fn replay<S: AsyncRead + AsyncWrite + Unpin>(
    backend: &mut S,
    items: &[Replay],
    lost_block: bool,
) -> Result<(), String> {
    let mut batch = BytesMut::new();
    let mut answers = 0;
    for item in items {
        match item {
            Replay::Sql(sql) => messages::put_query(&mut batch, sql),
            Replay::Parse { name, query, types } => {
                messages::put_parse(&mut batch, name, query.as_bytes(), types);
                messages::put_sync(&mut batch);
            }
        }
        answers += 1;
    }
    if lost_block {
        messages::put_query(&mut batch, "BEGIN");
        messages::put_query(&mut batch, LOSE_BLOCK);
        answers += 2;
    }
    if answers == 0 {
        return Ok(());
    }
    send(backend, &batch).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut failure = None;
    let mut done = 0;
    while done < answers {
        let (t, body) = read_message(backend, &mut buf, REPLAY_MESSAGE_LIMIT)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the server closed the connection")?;
        match t {
            tag::ERROR_RESPONSE if lost_block && done == answers - 1 => {}
            tag::ERROR_RESPONSE => {
                let text = String::from_utf8_lossy(&body).replace('\0', " ");
                failure.get_or_insert(text);
            }
            tag::READY_FOR_QUERY => done += 1,
            _ => {} // CommandComplete, ParseComplete, ParameterStatus, notices
        }
    }
    match failure {
        Some(text) => Err(text),
        None => Ok(()),
    }
}

/// Fails the block that stands for a lost one; the server logs it as an
/// ERROR with this message.
const LOSE_BLOCK: &str = "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = 'pgpivot: this transaction was lost at a failover'; END$$";

/// What [`answer_lost_block`] did with the client's next unit of work.
#[derive(Debug, PartialEq, Eq)]
pub enum LostBlockAnswer {
    /// It ends the block (ROLLBACK, COMMIT…) or the session: relay it.
    Relay,
    /// It got 40001 and ReadyForQuery `E` from the proxy.
    Answered,
}

/// The client sat idle in a transaction block that was lost: answers its
/// next statement with 40001 (what retry loops retry) unless that statement
/// ends the block. Reads into `held`, which keeps whatever is to be relayed.
pub async fn answer_lost_block<C>(
    client: &mut C,
    held: &mut ReadBuffer,
    max_message_bytes: usize,
) -> std::io::Result<LostBlockAnswer>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let first = loop {
        match first_message(held.pending(), max_message_bytes) {
            Some(first) => break first,
            None if held.read_from(client).await? == 0 => return Ok(LostBlockAnswer::Relay),
            None => {}
        }
    };
    let error = messages::error_bytes(
        Severity::Error,
        sqlstate::SERIALIZATION_FAILURE,
        "pgpivot: this transaction was lost at a failover and rolled back: retry it",
    );
    match first {
        First::EndsBlock => Ok(LostBlockAnswer::Relay),
        First::Query { len } => {
            held.consume(len);
            let mut answer = error;
            messages::put_ready(&mut answer, TxStatus::Failed);
            send(client, &answer).await?;
            Ok(LostBlockAnswer::Answered)
        }
        First::Extended => {
            // As a server does after an error: the rest up to Sync is
            // skipped, and the Sync answered.
            send(client, &error).await?;
            skip_to_sync(client, held, max_message_bytes).await?;
            let mut ready = BytesMut::new();
            messages::put_ready(&mut ready, TxStatus::Failed);
            send(client, &ready).await?;
            Ok(LostBlockAnswer::Answered)
        }
    }
}

enum First {
    EndsBlock,
    Query { len: usize },
    Extended,
}

/// Classifies the first message in `buf`, once enough of it is there.
fn first_message(buf: &[u8], max_message_bytes: usize) -> Option<First> {
    let mut framer = Framer::new(&[tag::QUERY, tag::PARSE], max_message_bytes)
        .inspecting_up_to(max_message_bytes);
    match framer.next(buf) {
        Ok(Frame::Message { tag: t, body }) => {
            let sql = match t {
                tag::QUERY => messages::c_str(body),
                _ => messages::parse(body).and_then(|p| std::str::from_utf8(p.query).ok()),
            };
            if sql.is_some_and(ends_block) {
                Some(First::EndsBlock)
            } else if t == tag::QUERY {
                Some(First::Query {
                    len: body.len() + crate::protocol::frame::HEADER_LEN,
                })
            } else {
                Some(First::Extended)
            }
        }
        Ok(Frame::Pass {
            starts: Some(tag::TERMINATE),
            ..
        })
        // A framing error is the relay's to report.
        | Err(_) => Some(First::EndsBlock),
        Ok(Frame::Pass { .. }) => Some(First::Extended),
        Ok(Frame::Incomplete) => None,
    }
}

/// `ROLLBACK`, `ABORT`, `COMMIT`, `END` (a block that failed ends either
/// way).
fn ends_block(sql: &str) -> bool {
    let sql = sql.trim_start().as_bytes();
    let word_len = sql.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    let word = &sql[..word_len];
    ["rollback", "abort", "commit", "end"]
        .iter()
        .any(|w| word.eq_ignore_ascii_case(w.as_bytes()))
}

/// Consumes client messages up to and including the next Sync.
async fn skip_to_sync<C: AsyncRead + Unpin>(
    client: &mut C,
    held: &mut ReadBuffer,
    max_message_bytes: usize,
) -> std::io::Result<()> {
    let mut framer = Framer::new(&[], max_message_bytes);
    let mut synced = false;
    loop {
        while !synced {
            let frame = match framer.next(held.pending()) {
                Ok(Frame::Incomplete) => break,
                Ok(frame) => frame,
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            };
            synced = matches!(
                frame,
                Frame::Pass {
                    starts: Some(tag::SYNC),
                    ..
                }
            );
            held.consume(frame.len());
        }
        if synced {
            return Ok(());
        }
        if held.read_from(client).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The cause label of `pgpivot_sessions_moved_total`.
pub fn cause_label(point_cause: &MoveCause) -> &'static str {
    match point_cause {
        MoveCause::Ineligible(reason) => reason.kind().as_label(),
        MoveCause::Goodbye { .. } => "server_gone",
    }
}

mod ping;
#[cfg(test)]
mod tests;

//! Stage 5 of a session: the relay.
//!
//! Two directions run concurrently in the session's task (a client may send
//! a long pipeline while the backend streams results; relaying one direction
//! at a time would deadlock both). Each direction reads what the socket has,
//! lets the [`Framer`] find message boundaries, and writes everything up to
//! the last boundary it reached in one write. Nothing is allocated per
//! message; large messages pass through in pieces.
//!
//! Client → backend reads only type bytes: Query, Sync and FunctionCall
//! (each will be answered by a ReadyForQuery) and Terminate.
//!
//! Backend → client also reads ReadyForQuery (transaction status: idle points
//! are where a session may be ended cleanly), ParameterStatus
//! (`in_hot_standby` changes at promotion) and ErrorResponse (25006 on a
//! session routed as read-write; FATAL before a close). It also listens to
//! the session's [control signals](super::control): a session whose node stops
//! being eligible is ended with an ErrorResponse at the next message
//! boundary, and from that moment nothing more from the client reaches the
//! backend; shutdown and lag end it at its next idle point.
//!
//! A movable session (`[failover] move_sessions`, see
//! [`mobility`](super::mobility)) also has its state-defining messages fed
//! to its tracker (client Query, Parse, Close; server CommandComplete,
//! ErrorResponse, ReadyForQuery), and is not ended when its node stops being
//! eligible: the relay stops at the next quiet point (no answer pending, no
//! half-sent batch) and returns a [`MovePoint`], holding the client's next
//! bytes. The old server's goodbye (a FATAL or WARNING 57P01/57P02) at such
//! a point is kept from the client and returned too, as is a close with
//! work in flight when both streams are at a message boundary.
//!
//! Between transactions the session parks (see [`relay`]): a run of the
//! relay ends at an idle point with nothing pending, and the next starts
//! when either peer has something to say, so an idle session holds no
//! buffers and no run state.
//!
//! Pauses hold the client → backend direction at idle points, before a new
//! unit of work is forwarded. With `[metrics] relay_timing`, the first
//! request after an idle point starts a round-trip clock that the closing
//! ReadyForQuery stops.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::readable::{readable, WaitReadable};

use super::control::{Signal, Signals};
use super::ending::EndReason;
use super::mobility::Mobility;
use super::stream::send;
use crate::metrics::{LocalCounter, LocalLatency};
use crate::monitor::MonitorHandle;
use crate::protocol::frame::{Frame, FrameError, Framer};
use crate::protocol::messages::{self, tag, Severity, TxStatus};
use crate::protocol::sqlstate;
use crate::routing::Target;
use crate::topology::NodeId;

/// Upper bound on finishing a half-relayed message before ending a session
/// whose node was lost (the backend may be hung mid-message).
const END_GRACE: Duration = Duration::from_secs(1);

/// How long a movable session whose node stopped being eligible may take
/// to reach a quiet point (finish the statement in flight) before it is
/// ended like one that cannot move.
const MOVE_GRACE: Duration = Duration::from_secs(5);

/// The largest client Query or Parse whose text the tracker reads; a larger
/// one pins the session (its effect is not known).
const MAX_TRACKED_MESSAGE: usize = 1024 * 1024;

/// What the relay needs to know about its session.
pub struct RelayContext<'a> {
    pub node: NodeId,
    pub target: Target,
    pub status: TxStatus,
    pub monitor: &'a MonitorHandle,
    pub max_message_bytes: usize,
    pub metrics: &'a crate::metrics::Metrics,
    /// Signals from the session's control watch (node no longer eligible,
    /// shutdown, lag).
    pub signals: &'a Signals,
    /// The node's live figures (round-trip latency).
    pub stats: &'a crate::topology::NodeStats,
    pub pause: &'a crate::pause::Pause,
    /// Counts this session while it is busy (in a transaction or awaiting
    /// answers); a pause waits for it to reach zero.
    pub busy_gauge: &'a crate::metrics::Gauge,
    /// Set for a session that may move: its state is tracked, and a node
    /// that stops being eligible ends the relay with a [`MovePoint`].
    pub mobility: Option<&'a Mobility>,
}

impl RelayContext<'_> {
    /// Whether the session could move now.
    fn movable(&self) -> bool {
        self.mobility.is_some_and(|m| m.blocker().is_none())
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate or closed its connection.
    ClientGone,
    /// The backend closed; the client has been told (by the backend, or by
    /// the proxy's 08006).
    BackendGone,
    /// The proxy ended the session (its node stopped being eligible).
    Ended(EndReason),
    /// The client broke the protocol; it got 08P01.
    ClientProtocol(FrameError),
    /// A movable session stopped where it may move (the client's stream is
    /// left open).
    Move(MovePoint),
}

/// Where and why a movable session's relay stopped.
#[derive(Debug)]
pub struct MovePoint {
    pub cause: MoveCause,
    /// The last ReadyForQuery's transaction status.
    pub status: TxStatus,
    /// Messages still awaiting a ReadyForQuery that the old backend will not
    /// send (work in flight when it closed).
    pub in_flight: u32,
}

#[derive(Debug)]
pub enum MoveCause {
    /// The node stopped being eligible for the session.
    Ineligible(EndReason),
    /// The server closed the connection. `said` is its goodbye (a FATAL or
    /// WARNING 57P01/57P02), kept from the client; empty when it said none.
    Goodbye { said: Vec<u8> },
}

/// State shared by the two directions (same task; atomics only because the
/// futures borrow it concurrently).
struct SessionState {
    /// ReadyForQuery answers still expected.
    outstanding: AtomicU32,
    status: AtomicU8,
    /// Set when the session is ending: nothing more goes to the backend.
    stop_forwarding: AtomicBool,
    /// The client stream ends at a message boundary (safe to add a message).
    client_clean: AtomicBool,
    /// Counted in the busy gauge (not at an idle point).
    busy: AtomicBool,
    /// When the current round trip started, in ns since `epoch`.
    round_trip_start: AtomicU64,
    epoch: Instant,
    /// A move is due: the client's next unit of work is held.
    moving: AtomicBool,
    /// Extended-protocol messages went to the backend since the last Sync.
    unsynced: AtomicBool,
    /// The client → backend stream ends at a message boundary.
    upstream_clean: AtomicBool,
}

impl SessionState {
    /// Between transactions with no answer pending: the session can be ended
    /// without the client losing anything.
    fn is_idle(&self) -> bool {
        self.status.load(Ordering::Relaxed) == TxStatus::Idle as u8
            && self.outstanding.load(Ordering::Relaxed) == 0
    }

    /// The client sent something: the session is busy until it is idle again.
    fn mark_busy(&self, gauge: &crate::metrics::Gauge) {
        if !self.busy.swap(true, Ordering::Relaxed) {
            gauge.inc();
        }
    }

    fn mark_idle(&self, gauge: &crate::metrics::Gauge) {
        if self.busy.swap(false, Ordering::Relaxed) {
            gauge.dec();
        }
    }

    /// The backend has been sent whole units of work only (a Query, or
    /// messages up to a Sync): nothing half-sent it would wait to finish.
    fn upstream_quiet(&self) -> bool {
        !self.unsynced.load(Ordering::Relaxed) && self.upstream_clean.load(Ordering::Relaxed)
    }

    /// Nothing in flight either way: a point where a session may move.
    fn quiet(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) == 0 && self.upstream_quiet()
    }

    fn status(&self) -> TxStatus {
        match self.status.load(Ordering::Relaxed) {
            s if s == TxStatus::InTransaction as u8 => TxStatus::InTransaction,
            s if s == TxStatus::Failed as u8 => TxStatus::Failed,
            _ => TxStatus::Idle,
        }
    }

    fn move_point(&self, cause: MoveCause) -> Outcome {
        Outcome::Move(MovePoint {
            cause,
            status: self.status(),
            in_flight: self.outstanding.load(Ordering::Relaxed),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Relays until either side ends or the proxy ends (or moves) the session.
/// `from_client` is the client direction's buffer: bytes it holds (held at
/// a move) are relayed first, and it keeps what a move holds.
///
/// Between transactions the session *parks* when both peers are sockets
/// ([`WaitReadable`]): at an idle point with nothing pending either way, the
/// running relay (its framers, buffers and both directions' futures, about
/// 1.5 KiB, boxed for this) is dropped, and the session waits for either
/// peer to become readable, or for a signal, holding nothing but its
/// sockets. Then a new run starts where the last one stopped.
pub async fn relay<CR, CW, BR, BW>(
    cr: &mut CR,
    cw: &mut CW,
    br: &mut BR,
    bw: &mut BW,
    ctx: &RelayContext<'_>,
    from_client: &mut ReadBuffer,
) -> RelayEnd
where
    CR: AsyncRead + WaitReadable + Unpin,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + WaitReadable + Unpin,
    BW: AsyncWrite + Unpin,
{
    let mut run = Run::new(ctx, cr.waits() && br.waits());
    loop {
        // A session starts parked too (after its login, or a move, it is at
        // an idle point): a pooled connection that waits long for its first
        // query holds no run meanwhile. Bytes held (a paused query, the
        // query a move held) go to a run at once.
        if from_client.pending().is_empty() {
            wait_parked(cr, br, ctx.signals).await;
        }
        let ran = Box::pin(relay_once(cr, cw, br, bw, ctx, from_client, &mut run)).await;
        match ran {
            Ran::Parked(status) => run.status = status,
            Ran::Ended(end) => return end,
        }
    }
}

/// What carries over from one run of the relay to the next.
struct Run<'a> {
    /// The transaction status the next run starts in.
    status: TxStatus,
    /// What round-trip clocks count from (read once per session, not per
    /// run).
    epoch: Instant,
    /// Whether a run may park (both peers can wait without a buffer).
    parks: bool,
    tally: Tally<'a>,
}

impl<'a> Run<'a> {
    fn new(ctx: &RelayContext<'a>, parks: bool) -> Run<'a> {
        Run {
            status: ctx.status,
            epoch: Instant::now(),
            parks,
            tally: Tally {
                to_backend: LocalCounter::new(&ctx.metrics.bytes_from_clients),
                to_client: LocalCounter::new(&ctx.metrics.bytes_to_clients),
                round_trips: LocalLatency::new(&ctx.stats.round_trip),
            },
        }
    }
}

/// The relay's metric batches, kept across runs so that they still flush
/// in batches, not once per transaction.
struct Tally<'a> {
    to_backend: LocalCounter<'a>,
    to_client: LocalCounter<'a>,
    round_trips: LocalLatency<'a>,
}

/// How one run of the relay ended.
enum Ran {
    /// Idle with nothing pending: the session waits without a relay.
    Parked(TxStatus),
    Ended(RelayEnd),
}

/// A parked session waits here until either peer has something to read
/// (or closed), or a signal was raised; the signal stays for the next run
/// to take.
async fn wait_parked<CR, BR>(cr: &mut CR, br: &mut BR, signals: &Signals)
where
    CR: WaitReadable,
    BR: WaitReadable,
{
    // `biased`: any order will do here, and an unbiased select draws a
    // random number at every poll.
    tokio::select! {
        biased;
        _ = readable(cr) => {}
        _ = readable(br) => {}
        _ = signals.raised() => {}
    }
}

/// One run of the relay: until the session ends, moves, or parks.
async fn relay_once<CR, CW, BR, BW>(
    cr: &mut CR,
    cw: &mut CW,
    br: &mut BR,
    bw: &mut BW,
    ctx: &RelayContext<'_>,
    from_client: &mut ReadBuffer,
    run: &mut Run<'_>,
) -> Ran
where
    CR: AsyncRead + Unpin + WaitReadable,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin + WaitReadable,
    BW: AsyncWrite + Unpin,
{
    let state = SessionState {
        outstanding: AtomicU32::new(0),
        status: AtomicU8::new(run.status as u8),
        stop_forwarding: AtomicBool::new(false),
        client_clean: AtomicBool::new(true),
        busy: AtomicBool::new(false),
        round_trip_start: AtomicU64::new(0),
        epoch: run.epoch,
        moving: AtomicBool::new(false),
        unsynced: AtomicBool::new(false),
        upstream_clean: AtomicBool::new(true),
    };
    if run.status != TxStatus::Idle {
        state.mark_busy(ctx.busy_gauge);
    }
    let mut upstream = match ctx.mobility {
        Some(_) => Framer::new(&[tag::QUERY, tag::PARSE, tag::CLOSE], ctx.max_message_bytes)
            .inspecting_up_to(MAX_TRACKED_MESSAGE),
        None => Framer::new(&[], ctx.max_message_bytes),
    };
    let tally = &mut run.tally;
    let (to_backend, to_client) = (&mut tally.to_backend, &mut tally.to_client);
    // `biased` (no random draw per poll): each branch returns only when its
    // direction ends, so the order decides nothing but who goes first.
    let outcome = tokio::select! {
        biased;
        end = client_to_backend(cr, bw, &state, &mut upstream, ctx, from_client, to_backend) => end,
        end = backend_to_client(br, cw, &state, ctx, run.parks, to_client, &mut tally.round_trips) => end,
    };
    let clean = state.client_clean.load(Ordering::Relaxed);
    match &outcome {
        Outcome::ClientGone | Outcome::ClientProtocol(_) => {
            if let Outcome::ClientProtocol(e) = &outcome {
                say(cw, clean, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
            }
            if upstream.at_boundary() {
                // Tell the backend goodbye as a client would.
                let _ = send(bw, &[tag::TERMINATE, 0, 0, 0, 4]).await;
            }
        }
        Outcome::BackendGone { said_why: false } => {
            let why = "pgpivot: connection to the server was lost";
            say(cw, clean, sqlstate::CONNECTION_FAILURE, why).await;
        }
        Outcome::BackendGone { said_why: true }
        | Outcome::Ended(_)
        | Outcome::Move(_)
        | Outcome::Parked => {}
    }
    if !matches!(outcome, Outcome::Move(_) | Outcome::Parked) {
        super::close(cw).await;
    }
    state.mark_idle(ctx.busy_gauge);
    let end = match outcome {
        Outcome::Parked => return Ran::Parked(state.status()),
        Outcome::ClientGone => RelayEnd::ClientGone,
        Outcome::ClientProtocol(e) => RelayEnd::ClientProtocol(e),
        Outcome::BackendGone { .. } => RelayEnd::BackendGone,
        Outcome::Ended(r) => RelayEnd::Ended(r),
        Outcome::Move(point) => RelayEnd::Move(point),
    };
    Ran::Ended(end)
}

enum Outcome {
    ClientGone,
    ClientProtocol(FrameError),
    BackendGone {
        said_why: bool,
    },
    Ended(EndReason),
    Move(MovePoint),
    /// Idle, nothing pending either way: this run may stop (see [`relay`]).
    Parked,
}

/// Writes a FATAL error to the client if the stream is at a boundary.
async fn say<W: AsyncWrite + Unpin>(cw: &mut W, clean: bool, code: &str, message: &str) {
    if clean {
        let _ = send(cw, &messages::error_bytes(Severity::Fatal, code, message)).await;
    }
}

async fn client_to_backend<R, W>(
    cr: &mut R,
    bw: &mut W,
    state: &SessionState,
    framer: &mut Framer,
    ctx: &RelayContext<'_>,
    reader: &mut ReadBuffer,
    relayed: &mut LocalCounter<'_>,
) -> Outcome
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Bytes held at a move are relayed before anything new is read.
    let mut carried = !reader.bytes.is_empty();
    loop {
        if state.is_idle() && framer.at_boundary() {
            reader.idle();
        }
        if !std::mem::take(&mut carried) {
            match reader.read_from(cr).await {
                Ok(0) | Err(_) => return Outcome::ClientGone,
                Ok(_) => {}
            }
        }
        if state.moving.load(Ordering::Relaxed) && state.quiet() && framer.at_boundary() {
            // A move is due: this unit of work waits, in `reader`, for the
            // new backend.
            return std::future::pending().await;
        }
        let buf = &mut reader.bytes;
        if state.is_idle() && framer.at_boundary() {
            // A new unit of work starts here: the point where a pause holds
            // it. Busy first, then check, so a pause that starts in between
            // sees this session as busy rather than parked.
            loop {
                state.mark_busy(ctx.busy_gauge);
                if !ctx.pause.holds(ctx.target.needs_primary()) {
                    break;
                }
                state.mark_idle(ctx.busy_gauge);
                ctx.pause.wait_resumed(ctx.target.needs_primary()).await;
            }
        }
        let mut pos = 0;
        let mut terminated = false;
        loop {
            let frame = match framer.next(&buf[pos..]) {
                Ok(Frame::Incomplete) => break,
                Ok(frame) => frame,
                Err(e) => return Outcome::ClientProtocol(e),
            };
            if let Some(m) = ctx.mobility {
                track_client(m, &frame);
            }
            let starts = match frame {
                Frame::Pass { starts, .. } => starts,
                Frame::Message { tag, .. } => Some(tag),
                Frame::Incomplete => None,
            };
            match starts {
                Some(t @ (tag::QUERY | tag::SYNC | tag::FUNCTION_CALL)) => {
                    let before = state.outstanding.fetch_add(1, Ordering::Relaxed);
                    if before == 0 && ctx.metrics.relay_timing {
                        state
                            .round_trip_start
                            .store(state.now_ns(), Ordering::Relaxed);
                    }
                    if t == tag::SYNC {
                        state.unsynced.store(false, Ordering::Relaxed);
                    }
                }
                Some(tag::TERMINATE) => terminated = true,
                Some(tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL | tag::FLUSH) | None => {}
                // Parse, Bind, Describe, Execute, Close: answered at a Sync.
                Some(_) => state.unsynced.store(true, Ordering::Relaxed),
            }
            pos += frame.len();
        }
        state
            .upstream_clean
            .store(framer.at_boundary(), Ordering::Relaxed);
        if state.stop_forwarding.load(Ordering::Relaxed) {
            // The session is being ended: the backend gets nothing more.
            return std::future::pending().await;
        }
        if send(bw, &buf[..pos]).await.is_err() {
            // The backend is gone; let the other direction deliver whatever
            // it said before going (a FATAL, say) and end the session.
            return std::future::pending().await;
        }
        if ctx.metrics.relay_timing {
            relayed.add(pos as u64);
        }
        buf.advance(pos);
        if terminated {
            return Outcome::ClientGone;
        }
    }
}

async fn backend_to_client<R, W>(
    br: &mut R,
    cw: &mut W,
    state: &SessionState,
    ctx: &RelayContext<'_>,
    parks: bool,
    relayed: &mut LocalCounter<'_>,
    round_trips: &mut LocalLatency<'_>,
) -> Outcome
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut framer = match ctx.mobility {
        Some(_) => Framer::new(
            &[
                tag::READY_FOR_QUERY,
                tag::PARAMETER_STATUS,
                tag::ERROR_RESPONSE,
                tag::COMMAND_COMPLETE,
                tag::NOTICE_RESPONSE,
            ],
            usize::MAX,
        ),
        None => Framer::new(
            &[
                tag::READY_FOR_QUERY,
                tag::PARAMETER_STATUS,
                tag::ERROR_RESPONSE,
            ],
            usize::MAX,
        ),
    };
    let mut reader = ReadBuffer::new();
    let mut orders = Orders::default();
    let mut last_fatal = false;
    let signals = ctx.signals;
    loop {
        if state.is_idle() && framer.at_boundary() {
            reader.idle();
        }
        let grace = orders.grace();
        // `biased` (no random draw per poll): an expired grace first, then
        // bytes, then signals. A goodbye that has arrived is acted on before
        // a topology signal raised about the same event (the goodbye says
        // more); a backend that stays readable does not keep signals
        // waiting, since they are also looked at after every read (below).
        tokio::select! {
            biased;
            _ = sleep_until(grace) => {
                if let Some(due) = orders.ending.take() {
                    return Box::pin(finish(cw, state, due.0, false)).await;
                }
                orders.move_ran_out(state);
            }
            read = reader.read_from(br) => match read {
                Ok(0) | Err(_) => {
                    let buf = &reader.bytes;
                    let repairable = buf.is_empty() && framer.at_boundary() && state.upstream_quiet();
                    if repairable && orders.ending.is_none() && !last_fatal && ctx.mobility.is_some() {
                        // Closed at a boundary both ways: the session may move,
                        // answering what was in flight itself (or, if it
                        // cannot move, be told why).
                        return state.move_point(MoveCause::Goodbye { said: Vec::new() });
                    }
                    // Deliver whatever was left before saying anything.
                    if !buf.is_empty() && send(cw, buf).await.is_err() {
                        return Outcome::ClientGone;
                    }
                    if let Some(due) = orders.ending.take() {
                        return Box::pin(finish(cw, state, due.0, framer.at_boundary() && buf.is_empty())).await;
                    }
                    return Outcome::BackendGone { said_why: last_fatal };
                }
                Ok(_) => {}
            },
            _ = signals.raised() => orders.take_signal(signals, state, ctx),
        }
        let buf = &mut reader.bytes;
        let mut pos = 0;
        loop {
            let frame = match framer.next(&buf[pos..]) {
                Ok(Frame::Incomplete) => break,
                Ok(frame) => frame,
                // A backend that breaks framing cannot be relayed further.
                Err(_) => return Outcome::BackendGone { said_why: false },
            };
            if let Frame::Message { tag: t, body } = frame {
                if ctx.mobility.is_some()
                    && is_goodbye(t, body)
                    && orders.ending.is_none()
                    && state.upstream_quiet()
                {
                    // The server is going (shutdown, crash): the signal to
                    // move, not something to relay (a session that cannot
                    // move is told why by the move stage).
                    let said = buf[pos..].to_vec();
                    if pos > 0 && send(cw, &buf[..pos]).await.is_err() {
                        return Outcome::ClientGone;
                    }
                    return state.move_point(MoveCause::Goodbye { said });
                }
                if let Some(m) = ctx.mobility {
                    track_server(m, t, body);
                }
                last_fatal = observe(t, body, state, ctx, round_trips);
            } else if let Frame::Pass {
                starts: Some(_), ..
            } = frame
            {
                last_fatal = false;
            }
            pos += frame.len();
        }
        if pos > 0 {
            state.client_clean.store(false, Ordering::Relaxed);
            if send(cw, &buf[..pos]).await.is_err() {
                return Outcome::ClientGone;
            }
            if ctx.metrics.relay_timing {
                relayed.add(pos as u64);
            }
            buf.advance(pos);
        }
        let at_boundary = framer.at_boundary();
        state.client_clean.store(at_boundary, Ordering::Relaxed);
        if signals.pending() {
            orders.take_signal(signals, state, ctx);
        }
        if let Some(due) = orders.ending.take_if(|_| at_boundary) {
            return Box::pin(finish(cw, state, due.0, true)).await;
        }
        let quiet = at_boundary && buf.is_empty() && state.quiet();
        if let Some(due) = orders.moving.take_if(|_| quiet) {
            return state.move_point(MoveCause::Ineligible(due.0));
        }
        if let Some(reason) = orders.at_idle.take_if(|_| at_boundary && state.is_idle()) {
            if matches!(*reason, EndReason::Lagging { .. }) && quiet && ctx.movable() {
                // Past its lag budget: a read session moves to a standby
                // within it.
                return state.move_point(MoveCause::Ineligible(*reason));
            }
            state.stop_forwarding.store(true, Ordering::Relaxed);
            return Box::pin(finish(cw, state, *reason, true)).await;
        }
        if parks && quiet && state.is_idle() {
            // Between transactions, nothing pending or due: the session can
            // wait without this run's state (an end or move due was taken
            // above).
            return Outcome::Parked;
        }
    }
}

/// What the session's signals ordered the backend direction to do. Each
/// order is boxed: they are rare, and inline their reasons would add 150
/// bytes to the run, which is allocated anew for every transaction (boxed,
/// the run stays within the size glibc serves from its per-thread cache).
#[derive(Default)]
struct Orders {
    /// An immediate end, waiting for the current message to finish.
    ending: Option<Due>,
    /// A move due once the session is quiet.
    moving: Option<Due>,
    /// An end at the next idle point.
    at_idle: Option<Box<EndReason>>,
}

/// An end or move due, and the deadline of its grace.
type Due = Box<(EndReason, tokio::time::Instant)>;

impl Orders {
    /// When the grace of an end (else of a move) runs out.
    fn grace(&self) -> Option<tokio::time::Instant> {
        self.ending
            .as_ref()
            .or(self.moving.as_ref())
            .map(|due| due.1)
    }

    /// Takes the signal the session's watch raised, if any: an end or move
    /// due now, or an end at the next idle point.
    fn take_signal(&mut self, signals: &Signals, state: &SessionState, ctx: &RelayContext<'_>) {
        match signals.take() {
            Some(Signal::EndNow(reason))
                if self.ending.is_none() && self.moving.is_none() && ctx.movable() =>
            {
                state.moving.store(true, Ordering::Relaxed);
                self.moving = Some(Box::new((reason, grace_from_now(MOVE_GRACE))));
            }
            Some(Signal::EndNow(reason)) if self.ending.is_none() => {
                state.stop_forwarding.store(true, Ordering::Relaxed);
                self.ending = Some(Box::new((reason, grace_from_now(END_GRACE))));
            }
            Some(Signal::EndAtIdle(reason)) => self.at_idle = Some(Box::new(reason)),
            _ => {}
        }
    }

    /// A move's grace ran out with work still in flight: the session ends
    /// instead, as one that cannot move, with an end's grace.
    fn move_ran_out(&mut self, state: &SessionState) {
        let mut due = self
            .moving
            .take()
            .expect("grace only while ending or moving");
        state.stop_forwarding.store(true, Ordering::Relaxed);
        due.1 = grace_from_now(END_GRACE);
        self.ending = Some(due);
    }
}

/// When a grace of `period` starting now runs out.
fn grace_from_now(period: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + period
}

/// Resolves at `at`; never without one. The timer is boxed: it is needed
/// only while a session is being ended or moved, and inline it would add
/// its size to every idle session's relay future.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => Box::pin(crate::timers::sleep_until(at)).await,
        None => std::future::pending().await,
    }
}

/// Ends the session with the reason's error, if the stream allows a message.
/// Boxed by its callers: it runs once, and inline it would size every idle
/// session's relay future.
async fn finish<W: AsyncWrite + Unpin>(
    cw: &mut W,
    state: &SessionState,
    reason: EndReason,
    clean: bool,
) -> Outcome {
    state.client_clean.store(false, Ordering::Relaxed);
    if clean {
        let error = messages::error_bytes(Severity::Fatal, reason.sqlstate(), &reason.message());
        let _ = send(cw, &error).await;
    }
    Outcome::Ended(reason)
}

/// Reads one inspected backend message; returns whether it was a FATAL error.
fn observe(
    t: u8,
    body: &[u8],
    state: &SessionState,
    ctx: &RelayContext<'_>,
    round_trips: &mut LocalLatency<'_>,
) -> bool {
    match t {
        tag::READY_FOR_QUERY => {
            let before =
                state
                    .outstanding
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if before == Ok(1) && ctx.metrics.relay_timing {
                let started = state.round_trip_start.load(Ordering::Relaxed);
                let ns = state.now_ns().saturating_sub(started);
                round_trips.record(Duration::from_nanos(ns));
            }
            if let Some(status) = TxStatus::from_ready_for_query(body) {
                state.status.store(status as u8, Ordering::Relaxed);
            }
            if state.is_idle() {
                state.mark_idle(ctx.busy_gauge);
            }
            false
        }
        tag::PARAMETER_STATUS => {
            if let Some((b"in_hot_standby", _)) = messages::parameter_status(body) {
                // The node's role changed under us: have it polled now.
                ctx.monitor.poke(ctx.node);
            }
            false
        }
        tag::ERROR_RESPONSE => {
            if messages::sqlstate(body) == Some(sqlstate::READ_ONLY_SQL_TRANSACTION.as_bytes())
                && ctx.target.needs_primary()
            {
                ctx.monitor.poke(ctx.node);
            }
            is_fatal(body)
        }
        _ => false,
    }
}

/// Feeds the tracker a client message that defines session state.
fn track_client(m: &Mobility, frame: &Frame<'_>) {
    match *frame {
        Frame::Message {
            tag: tag::QUERY,
            body,
        } => match messages::c_bytes(body) {
            Some(sql) => m.tracker().client_query(sql),
            None => m.tracker().client_query_unread(),
        },
        Frame::Message {
            tag: tag::PARSE,
            body,
        } => match messages::parse(body) {
            Some(parse) => {
                let types = if parse.name.is_empty() {
                    Vec::new()
                } else {
                    parse.types().collect()
                };
                m.tracker().client_parse(parse.name, parse.query, &types)
            }
            None => m.tracker().client_parse_unread(),
        },
        Frame::Message {
            tag: tag::CLOSE,
            body: [b'S', name @ ..],
        } => {
            if let Some(name) = messages::c_str(name) {
                m.tracker().client_close_statement(name);
            }
        }
        Frame::Pass {
            starts: Some(t), ..
        } => match t {
            tag::QUERY => m.tracker().client_query_unread(),
            tag::PARSE => m.tracker().client_parse_unread(),
            tag::SYNC | tag::FUNCTION_CALL => m.tracker().client_sync(),
            _ => {}
        },
        _ => {}
    }
}

/// Feeds the tracker a server answer.
fn track_server(m: &Mobility, t: u8, body: &[u8]) {
    match t {
        tag::COMMAND_COMPLETE => {
            if let Some(done) = messages::c_str(body) {
                m.tracker().server_command_complete(done);
            }
        }
        tag::ERROR_RESPONSE => m.tracker().server_error(),
        tag::READY_FOR_QUERY => {
            if let Some(status) = TxStatus::from_ready_for_query(body) {
                let mut tracker = m.tracker();
                tracker.server_ready(status);
                m.recount(&mut tracker);
            }
        }
        _ => {}
    }
}

/// A server's goodbye to every session: 57P01 (a fast or immediate
/// shutdown, the postmaster gone) or 57P02 (a crash elsewhere), as a FATAL
/// or as the WARNING an immediate shutdown sends. Not 57P05 (this session's
/// idle timeout) or other single-session ends.
fn is_goodbye(t: u8, body: &[u8]) -> bool {
    // The type byte first: every ReadyForQuery and CommandComplete passes
    // here, and only the rare error or notice is worth reading further.
    let said = t == tag::NOTICE_RESPONSE || (t == tag::ERROR_RESPONSE && is_fatal(body));
    said && matches!(messages::sqlstate(body), Some(b"57P01" | b"57P02"))
}

/// Whether an ErrorResponse body has severity FATAL or PANIC.
fn is_fatal(body: &[u8]) -> bool {
    body.split(|&b| b == 0).any(|field| {
        field == b"VFATAL" || field == b"VPANIC" || field == b"SFATAL" || field == b"SPANIC"
    })
}

mod read_buffer;
#[cfg(test)]
mod tests;

pub use read_buffer::ReadBuffer;

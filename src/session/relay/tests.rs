//! The relay in memory: TLS to the client over a small `duplex` pipe (so
//! writes really do block), a scripted backend on another pipe, and virtual
//! time, so that a response that stalls shows up as a timeout at once rather
//! than as a hung test.

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::MoveCause;
use super::{relay, RelayContext, RelayEnd};
use crate::credentials::Credential;
use crate::metrics::{Gauge, Metrics};
use crate::monitor::MonitorHandle;
use crate::pause::Pause;
use crate::pause::PauseScope;
use crate::protocol::messages::{self, TxStatus};
use crate::routing::Target;
use crate::session::control::{Signal, Signals};
use crate::session::ending::EndReason;
use crate::session::mobility::Mobility;
use crate::session::test_support::{tls_configs, Lookahead};
use crate::topology::NodeStats;

/// Everything a relay borrows, owned by the test.
#[derive(Default)]
struct Fixture {
    monitor: MonitorHandle,
    metrics: Metrics,
    signals: Signals,
    stats: NodeStats,
    pause: Pause,
    busy: Gauge,
    /// Set for a movable session.
    mobility: Option<Mobility>,
}

impl Fixture {
    /// A session that may move (trust: its credential is "nothing").
    fn movable() -> Fixture {
        let mobility = Mobility::default();
        let _ = mobility.credential_slot().set(Some(Credential::Trust));
        Fixture {
            mobility: Some(mobility),
            ..Fixture::default()
        }
    }
}

impl Fixture {
    fn ctx(&self) -> RelayContext<'_> {
        RelayContext {
            node: 0,
            target: Target::ReadWrite,
            status: TxStatus::Idle,
            monitor: &self.monitor,
            max_message_bytes: 1 << 30,
            metrics: &self.metrics,
            signals: &self.signals,
            stats: &self.stats,
            pause: &self.pause,
            busy_gauge: &self.busy,
            mobility: self.mobility.as_ref(),
        }
    }
}

/// A TLS client and the proxy's end of it, over a pipe of `capacity` bytes.
async fn tls_pair(
    capacity: usize,
) -> (
    tokio_rustls::client::TlsStream<DuplexStream>,
    tokio_rustls::server::TlsStream<DuplexStream>,
) {
    let (server, client) = tls_configs();
    let (c, s) = tokio::io::duplex(capacity);
    let name = ServerName::try_from("localhost").unwrap();
    let connecting = TlsConnector::from(client).connect(name, c);
    let accepting = TlsAcceptor::from(server).accept(s);
    let (c, s) = tokio::join!(connecting, accepting);
    (c.unwrap(), s.unwrap())
}

/// `count` DataRow-shaped messages of uneven sizes, then ReadyForQuery.
fn response(count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..count {
        let body = 1 + (i * 7919) % 20_011;
        out.push(b'D');
        out.extend_from_slice(&(body as u32 + 4).to_be_bytes());
        out.extend((0..body).map(|k| (i + k) as u8));
    }
    out.extend_from_slice(b"Z\0\0\0\x05I");
    out
}

/// Reads exactly `len` bytes in small pieces, pausing between them.
async fn read_slowly<R: AsyncRead + Unpin>(r: &mut R, len: usize, piece: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let end = (at + piece).min(len);
        let n = r.read(&mut got[at..end]).await.unwrap();
        assert!(n > 0, "stream ended after {at} of {len} bytes");
        at += n;
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    got
}

/// Runs the relay between a TLS client and a backend pipe while `client`
/// drives the client side and `backend` the server side.
async fn with_tls_relay<C, B>(capacity: usize, client: C, backend: B) -> RelayEnd
where
    C: AsyncFnOnce(&mut tokio_rustls::client::TlsStream<DuplexStream>),
    B: AsyncFnOnce(&mut DuplexStream),
{
    let fixture = Fixture::default();
    let (mut tls_client, tls_server) = tls_pair(capacity).await;
    let (mut backend_end, proxy_end) = tokio::io::duplex(capacity);
    let (mut cr, mut cw) = tokio::io::split(tls_server);
    let (mut br, mut bw) = tokio::io::split(proxy_end);
    let ctx = fixture.ctx();
    let mut held = super::ReadBuffer::new();
    let relaying = relay(&mut cr, &mut cw, &mut br, &mut bw, &ctx, &mut held);
    let peers = async {
        tokio::join!(client(&mut tls_client), backend(&mut backend_end));
        // Goodbye as a client says it, so the relay ends.
        tls_client.write_all(b"X\0\0\0\x04").await.unwrap();
        tls_client.flush().await.unwrap();
    };
    let (end, ()) = tokio::join!(relaying, peers);
    end
}

#[tokio::test(start_paused = true)]
async fn a_large_response_reaches_a_slow_tls_reader_whole() {
    let expected = response(400);
    let len = expected.len();
    let sent = expected.clone();
    let end = with_tls_relay(
        4096,
        async move |c| {
            // Virtual time: a stalled relay makes this time out at once.
            let got = tokio::time::timeout(Duration::from_secs(60), read_slowly(c, len, 1000))
                .await
                .expect("the whole response arrives (no stall)");
            assert!(got == expected, "the client got the bytes the backend sent");
        },
        async move |b| {
            // The backend stays open after its answer, as a server does.
            b.write_all(&sent).await.unwrap();
        },
    )
    .await;
    assert!(matches!(end, RelayEnd::ClientGone), "{end:?}");
}

/// Runs the relay over plain pipes while `script` plays both peers; the
/// fixture is the caller's, so the script can raise signals or pause.
async fn with_plain_relay<S>(fixture: &Fixture, script: S) -> RelayEnd
where
    S: AsyncFnOnce(DuplexStream, DuplexStream),
{
    with_plain_relay_holding(fixture, script).await.0
}

/// [`with_plain_relay`], also returning the client bytes the relay held.
async fn with_plain_relay_holding<S>(fixture: &Fixture, script: S) -> (RelayEnd, Vec<u8>)
where
    S: AsyncFnOnce(DuplexStream, DuplexStream),
{
    let (client, proxy_client) = tokio::io::duplex(64 * 1024);
    let (backend, proxy_backend) = tokio::io::duplex(64 * 1024);
    let (cr, mut cw) = tokio::io::split(proxy_client);
    let (br, mut bw) = tokio::io::split(proxy_backend);
    // Readable without a buffer, as sockets are: the session parks between
    // transactions.
    let (mut cr, mut br) = (Lookahead::new(cr), Lookahead::new(br));
    let ctx = fixture.ctx();
    let mut held = super::ReadBuffer::new();
    let (end, ()) = tokio::join!(
        relay(&mut cr, &mut cw, &mut br, &mut bw, &ctx, &mut held),
        script(client, backend)
    );
    (end, held.pending().to_vec())
}

fn lost() -> Signal {
    Signal::EndNow(EndReason::NodeLost { node: "pg1".into() })
}

#[tokio::test(start_paused = true)]
async fn a_session_ended_mid_message_is_ended_after_that_message() {
    let fixture = Fixture::default();
    let row = message(b'D', &[7u8; 10_000]);
    let (head, tail) = row.split_at(row.len() / 2);
    let end = with_plain_relay(&fixture, async |mut c, mut b| {
        b.write_all(head).await.unwrap();
        let mut got = vec![0u8; head.len()];
        c.read_exact(&mut got).await.unwrap();
        fixture.signals.raise(lost());
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.write_all(tail).await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.starts_with(tail), "the message was finished first");
        let error = &rest[tail.len()..];
        assert_eq!(error.first(), Some(&b'E'), "then pgpivot's error");
        assert!(String::from_utf8_lossy(error).contains("08006"));
    })
    .await;
    assert!(
        matches!(end, RelayEnd::Ended(EndReason::NodeLost { .. })),
        "{end:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_hung_mid_message_is_given_up_after_the_grace() {
    let fixture = Fixture::default();
    let row = message(b'D', &[7u8; 10_000]);
    let head = &row[..row.len() / 2];
    let started = tokio::time::Instant::now();
    let end = with_plain_relay(&fixture, async |mut c, mut b| {
        b.write_all(head).await.unwrap();
        let mut got = vec![0u8; head.len()];
        c.read_exact(&mut got).await.unwrap();
        fixture.signals.raise(lost());
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        // Half a message cannot be followed by an error: the client only
        // sees the connection close.
        assert!(rest.is_empty(), "{} more bytes", rest.len());
        drop(b);
    })
    .await;
    assert!(matches!(end, RelayEnd::Ended(_)), "{end:?}");
    let waited = started.elapsed();
    assert!(
        waited >= super::END_GRACE && waited < super::END_GRACE * 2,
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_the_next_unit_of_work_until_resume() {
    let fixture = Fixture::default();
    fixture.pause.set(PauseScope::Writes);
    let query = message(b'Q', b"select 1\0");
    let end = with_plain_relay(&fixture, async |mut c, mut b| {
        c.write_all(&query).await.unwrap();
        let mut got = [0u8; 1];
        let held = tokio::time::timeout(Duration::from_secs(30), b.read(&mut got)).await;
        assert!(held.is_err(), "nothing reaches the backend while paused");
        fixture.pause.set(PauseScope::None);
        let mut got = vec![0u8; query.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, query, "the held query goes through on resume");
        c.write_all(b"X\0\0\0\x04").await.unwrap();
        // The goodbye reaches the backend before the script lets go of it.
        let mut goodbye = [0u8; 5];
        b.read_exact(&mut goodbye).await.unwrap();
        assert_eq!(goodbye[0], b'X');
    })
    .await;
    assert!(matches!(end, RelayEnd::ClientGone), "{end:?}");
}

fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A backend answering one simple Query: CommandComplete `done`, then
/// ReadyForQuery `status`.
fn answer(done: &str, status: u8) -> Vec<u8> {
    let mut out = message(b'C', format!("{done}\0").as_bytes());
    out.extend(message(b'Z', &[status]));
    out
}

/// Relays `query` and its answer, checking both arrive whole.
async fn round_trip(c: &mut DuplexStream, b: &mut DuplexStream, query: &[u8], reply: &[u8]) {
    c.write_all(query).await.unwrap();
    let mut got = vec![0u8; query.len()];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(got, query);
    b.write_all(reply).await.unwrap();
    let mut got = vec![0u8; reply.len()];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(got, reply);
}

#[tokio::test(start_paused = true)]
async fn a_movable_session_stops_at_a_quiet_point_and_keeps_what_the_client_sent() {
    let fixture = Fixture::movable();
    let set = message(b'Q', b"SET search_path TO app\0");
    let next = message(b'Q', b"select 1\0");
    let (end, held) = with_plain_relay_holding(&fixture, async |mut c, mut b| {
        round_trip(&mut c, &mut b, &set, &answer("SET", b'I')).await;
        // A switchover: the pause holds the next query, then the node goes.
        fixture.pause.set(PauseScope::Writes);
        c.write_all(&next).await.unwrap();
        let mut got = [0u8; 1];
        let forwarded = tokio::time::timeout(Duration::from_secs(1), b.read(&mut got)).await;
        assert!(forwarded.is_err(), "held by the pause");
        fixture.signals.raise(lost());
        // The client's stream stays open: nothing (no error) reaches it.
        let said = tokio::time::timeout(Duration::from_secs(1), c.read(&mut got)).await;
        assert!(said.is_err(), "the client is told nothing");
        std::mem::forget(c); // kept open past the relay's end
    })
    .await;
    let RelayEnd::Move(point) = end else {
        panic!("{end:?}")
    };
    assert!(matches!(
        point.cause,
        MoveCause::Ineligible(EndReason::NodeLost { .. })
    ));
    assert_eq!((point.status, point.in_flight), (TxStatus::Idle, 0));
    assert_eq!(
        held, next,
        "the next query is kept whole for the new backend"
    );
    let mobility = fixture.mobility.as_ref().unwrap();
    let replay = mobility.tracker().replay();
    assert_eq!(
        replay,
        [crate::session::state::Replay::Sql(
            "SET search_path TO app".into()
        )]
    );
}

#[tokio::test(start_paused = true)]
async fn a_servers_goodbye_at_an_idle_point_is_kept_from_the_client() {
    let fixture = Fixture::movable();
    let fatal = messages::error_bytes(
        messages::Severity::Fatal,
        "57P01",
        "terminating connection due to administrator command",
    )
    .to_vec();
    let (end, _) = with_plain_relay_holding(&fixture, async |mut c, mut b| {
        round_trip(
            &mut c,
            &mut b,
            &message(b'Q', b"select 1\0"),
            &answer("SELECT 1", b'I'),
        )
        .await;
        b.write_all(&fatal).await.unwrap();
        drop(b);
        let mut got = [0u8; 1];
        let said = tokio::time::timeout(Duration::from_secs(1), c.read(&mut got)).await;
        assert!(said.is_err(), "the goodbye is not relayed");
        std::mem::forget(c);
    })
    .await;
    let RelayEnd::Move(point) = end else {
        panic!("{end:?}")
    };
    let MoveCause::Goodbye { said } = point.cause else {
        panic!("{:?}", point.cause)
    };
    assert_eq!(said, fatal, "kept for the move stage");
}

#[tokio::test(start_paused = true)]
async fn a_backend_lost_with_a_query_in_flight_stops_with_it_counted() {
    let fixture = Fixture::movable();
    let (end, _) = with_plain_relay_holding(&fixture, async |mut c, mut b| {
        round_trip(
            &mut c,
            &mut b,
            &message(b'Q', b"BEGIN\0"),
            &answer("BEGIN", b'T'),
        )
        .await;
        let update = message(b'Q', b"UPDATE t SET x = 1\0");
        c.write_all(&update).await.unwrap();
        let mut got = vec![0u8; update.len()];
        b.read_exact(&mut got).await.unwrap();
        drop(b); // the server dies with the UPDATE running
        std::mem::forget(c);
    })
    .await;
    let RelayEnd::Move(point) = end else {
        panic!("{end:?}")
    };
    assert_eq!(
        (point.status, point.in_flight),
        (TxStatus::InTransaction, 1)
    );
    let mobility = fixture.mobility.as_ref().unwrap();
    assert!(
        !mobility.tracker().commit_in_flight(),
        "an UPDATE, not a COMMIT"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pinned_session_is_ended_as_before() {
    let fixture = Fixture::movable();
    let end = with_plain_relay(&fixture, async |mut c, mut b| {
        let temp = message(b'Q', b"create temp table t (x int)\0");
        round_trip(&mut c, &mut b, &temp, &answer("CREATE TABLE", b'I')).await;
        fixture.signals.raise(lost());
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(
            String::from_utf8_lossy(&rest).contains("08006"),
            "told at once"
        );
    })
    .await;
    assert!(
        matches!(end, RelayEnd::Ended(EndReason::NodeLost { .. })),
        "{end:?}"
    );
}

/// A buffer that has relayed everything gives its allocation back while it
/// waits, on a socket and on a stream that cannot wait for readiness alike
/// (the read with nothing pending goes to the stack); a read that fills the
/// first chunk makes the next one larger.
#[tokio::test]
async fn an_idle_read_buffer_holds_no_allocation_while_it_waits() {
    use super::ReadBuffer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    let (mut piped, mut pipe_end) = tokio::io::duplex(64 * 1024);

    let mut on_socket = ReadBuffer::new();
    let mut on_pipe = ReadBuffer::new();
    client.write_all(b"hello").await.unwrap();
    pipe_end.write_all(b"hello").await.unwrap();
    assert_eq!(on_socket.read_from(&mut server).await.unwrap(), 5);
    assert_eq!(on_pipe.read_from(&mut piped).await.unwrap(), 5);
    for buffer in [&mut on_socket, &mut on_pipe] {
        assert_eq!(buffer.pending(), b"hello");
        buffer.consume(5);
    }

    // Nothing more was sent: both reads wait, holding no buffer.
    let wait = Duration::from_millis(20);
    let read = tokio::time::timeout(wait, on_socket.read_from(&mut server)).await;
    assert!(read.is_err(), "nothing was sent: {read:?}");
    assert_eq!(
        on_socket.bytes.capacity(),
        0,
        "the socket wait held a buffer"
    );
    let read = tokio::time::timeout(wait, on_pipe.read_from(&mut piped)).await;
    assert!(read.is_err(), "nothing was sent: {read:?}");
    assert_eq!(on_pipe.bytes.capacity(), 0, "the pipe wait held a buffer");

    // The next bytes are read once they arrive; 5 KiB at once fill the
    // first chunk, so the reads after it take more at a time.
    client.write_all(b"again").await.unwrap();
    assert_eq!(on_socket.read_from(&mut server).await.unwrap(), 5);
    assert_eq!(on_socket.pending(), b"again");
    pipe_end.write_all(&[7; 5 * 1024]).await.unwrap();
    let mut reads = Vec::new();
    while reads.iter().sum::<usize>() < 5 * 1024 {
        let n = on_pipe.read_from(&mut piped).await.unwrap();
        on_pipe.consume(n);
        reads.push(n);
    }
    assert_eq!(reads[0], 1024, "{reads:?}");
    assert!(reads.iter().any(|&n| n > 1024), "{reads:?}");
}

/// Between transactions the session parks (no relay run, see `relay`):
/// what the server sends unprompted still reaches the client, the next
/// query is relayed, and a signal raised while parked is acted on.
#[tokio::test(start_paused = true)]
async fn a_parked_session_hears_both_peers_and_its_signals() {
    let fixture = Fixture::default();
    let query = message(b'Q', b"select 1\0");
    let end = with_plain_relay(&fixture, async |mut c, mut b| {
        round_trip(&mut c, &mut b, &query, &answer("SELECT 1", b'I')).await;
        // A NOTIFY delivered while the session is idle.
        let notification = message(b'A', b"\0\0\0\x07chan\0payload\0");
        b.write_all(&notification).await.unwrap();
        let mut got = vec![0u8; notification.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(got, notification);
        round_trip(&mut c, &mut b, &query, &answer("SELECT 1", b'I')).await;
        // Shutdown: ended at once, since the session is idle.
        fixture
            .signals
            .raise(Signal::EndAtIdle(EndReason::Shutdown));
        let mut said = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut said)).await;
        ended
            .expect("the parked session never took its signal")
            .unwrap();
        assert_eq!(said[0], b'E', "{said:?}");
        assert_eq!(
            messages::sqlstate(&said[5..]),
            Some(crate::protocol::sqlstate::ADMIN_SHUTDOWN.as_bytes())
        );
    })
    .await;
    assert!(
        matches!(end, RelayEnd::Ended(EndReason::Shutdown)),
        "{end:?}"
    );
}

/// A backend that always has the next DataRow ready: a read never waits.
struct EndlessRows {
    /// Bytes of the current row already handed out.
    at: usize,
}

impl EndlessRows {
    const ROW: &'static [u8] = b"D\0\0\0\x0a\0\x01\0\0\0\0";
}

impl AsyncRead for EndlessRows {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while buf.remaining() > 0 {
            let row = &Self::ROW[self.at..];
            let n = row.len().min(buf.remaining());
            buf.put_slice(&row[..n]);
            self.at = (self.at + n) % Self::ROW.len();
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl crate::readable::WaitReadable for EndlessRows {}

/// A backend that never pauses cannot keep a signal from the relay: the
/// session is ended at a message boundary while rows still pour in.
#[tokio::test]
async fn a_signal_reaches_a_session_whose_backend_never_pauses() {
    let fixture = Fixture::default();
    let (mut client, proxy_client) = tokio::io::duplex(64 * 1024);
    let (mut cr, mut cw) = tokio::io::split(proxy_client);
    let mut br = EndlessRows { at: 0 };
    let mut bw = tokio::io::sink();
    let ctx = fixture.ctx();
    let mut held = super::ReadBuffer::new();
    let relaying = relay(&mut cr, &mut cw, &mut br, &mut bw, &ctx, &mut held);
    let peer = async {
        let mut got = vec![0u8; 256 * 1024];
        client.read_exact(&mut got).await.unwrap();
        fixture.signals.raise(lost());
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        rest
    };
    let (end, rest) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(relaying, peer)
    })
    .await
    .expect("the signal was not acted on while the backend kept sending");
    assert!(
        matches!(end, RelayEnd::Ended(EndReason::NodeLost { .. })),
        "{end:?}"
    );
    let error = String::from_utf8_lossy(&rest);
    assert!(error.contains("08006"), "ended with pgpivot's error");
}

/// A run is allocated anew for every transaction, so it must stay within
/// the largest size glibc serves from its per-thread cache (1,032 bytes):
/// past it, every transaction takes malloc's slow path (about 350
/// user-space instructions more, by callgrind).
#[tokio::test]
async fn a_run_over_sockets_fits_the_allocators_thread_cache() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (mut client, (mut backend, _)) = (client.unwrap(), accepted.unwrap());
    let (mut cr, mut cw) = client.split();
    let (mut br, mut bw) = backend.split();
    let fixture = Fixture::movable();
    let ctx = fixture.ctx();
    let mut held = super::ReadBuffer::new();
    let mut run = super::Run::new(&ctx, true);
    let one_run = super::relay_once(
        &mut cr, &mut cw, &mut br, &mut bw, &ctx, &mut held, &mut run,
    );
    let size = std::mem::size_of_val(&one_run);
    assert!(size <= 1032, "a run's future is {size} bytes");
}

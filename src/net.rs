//! Socket options for the data path.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Sets TCP_NODELAY (the relay writes whole messages; waiting to coalesce
/// them only adds latency) and, when `keepalive` is set, TCP keepalive with
/// probes every `keepalive / 4` after `keepalive` of silence, so a peer that
/// vanished without a FIN is noticed.
///
/// Keepalive probes only run while nothing sent is unacknowledged: a peer
/// that vanished while data to it was in flight (a query's answer, a
/// CloseComplete) would be retried for tcp_retries2, about 15 minutes. So
/// TCP_USER_TIMEOUT is set to the same total (idle + 4 probes), as
/// PostgreSQL's `tcp_user_timeout` does; a live peer that merely stops
/// reading still acknowledges window probes and is not cut.
pub fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let interval = (idle / 4).max(Duration::from_secs(1));
        let params = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(PROBES);
        let sock = SockRef::from(stream);
        if let Err(e) = sock.set_tcp_keepalive(&params) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = sock.set_tcp_user_timeout(Some(idle + interval * PROBES)) {
            tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
        }
    }
}

/// Makes the close of `stream` discard whatever is still queued for the
/// peer (SO_LINGER 0: the close sends an RST). For a backend whose session
/// pgpivot ended because the node was lost or demoted: a statement the
/// client sent before that, stuck behind a partition, must not reach the
/// node when the link heals, after the client was told to reconnect (its
/// retry would run it twice). A plain close would leave the kernel
/// retransmitting it, and the server would run it.
pub fn discard_on_close(stream: &TcpStream) {
    if let Err(e) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER");
    }
}

/// Unanswered keepalive probes before the connection counts as dead.
const PROBES: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tune_sets_nodelay_and_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&stream, Some(Duration::from_secs(60)));
        let sock = SockRef::from(&stream);
        assert!(stream.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(15)
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(120))
        );
        tune(&stream, None);
        assert!(
            sock.keepalive().unwrap(),
            "None leaves the socket as it was"
        );
    }
}

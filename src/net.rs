//! Socket options for the data path.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Sets TCP_NODELAY (the relay writes whole messages; waiting to coalesce
/// them only adds latency) and, when `keepalive` is set, TCP keepalive with
/// probes every `keepalive / 4` after `keepalive` of silence, so a peer that
/// vanished without a FIN is noticed.
pub fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let params = TcpKeepalive::new()
            .with_time(idle)
            .with_interval((idle / 4).max(Duration::from_secs(1)))
            .with_retries(4);
        if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&params) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

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
        tune(&stream, None);
        assert!(
            sock.keepalive().unwrap(),
            "None leaves the socket as it was"
        );
    }
}

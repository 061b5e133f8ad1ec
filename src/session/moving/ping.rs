//! Whether a node's postmaster accepts new connections, asked the way
//! `pg_isready` asks: send a startup packet and read the first answer.
//!
//! This tells a shutdown from `pg_terminate_backend`, which end a session
//! with the same FATAL 57P01 "terminating connection due to administrator
//! command". A postmaster told to shut down stops accepting connections
//! before it signals its backends, so any connection that starts after a
//! backend's goodbye arrived is answered 57P03 ("the database system is
//! shutting down"), or refused once the postmaster is gone. After
//! `pg_terminate_backend` the postmaster answers as always: with an
//! authentication request, or an error of its own (pg_hba, unknown
//! database, too many connections), all of which come after the check for
//! shutdown. No login is attempted: the connection is dropped after the
//! first answer, which PostgreSQL does not log (an EOF during
//! authentication ends the backend quietly).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::address::BackendAddress;
use crate::protocol::frame::read_message;
use crate::protocol::messages::{self, tag};
use crate::protocol::sqlstate;

/// The first answer to a startup packet is small; an ErrorResponse is read
/// up to this size.
const ANSWER_LIMIT: usize = 8192;

/// Whether the postmaster at `address` accepts a connection started now,
/// sending `startup` (the session's own startup packet); `false` when it
/// says it cannot now (57P03), refuses or drops the connection, or does
/// not answer within `timeout`.
pub async fn accepts_connections(
    address: &BackendAddress,
    startup: &[u8],
    timeout: Duration,
) -> bool {
    let ask = async {
        let mut socket = address.connect().await.ok()?;
        socket.write_all(startup).await.ok()?;
        let mut buf = BytesMut::new();
        let (t, body) = read_message(&mut socket, &mut buf, ANSWER_LIMIT)
            .await
            .ok()??;
        Some(accepts(t, &body))
    };
    crate::timers::timeout(timeout, ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Reads the postmaster's first answer.
fn accepts(t: u8, body: &[u8]) -> bool {
    t != tag::ERROR_RESPONSE
        || messages::sqlstate(body) != Some(sqlstate::CANNOT_CONNECT_NOW.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cannot_connect_now_means_not_accepting() {
        let error = |code: &str| messages::error_bytes(messages::Severity::Fatal, code, "x");
        let body = |m: &[u8]| m[5..].to_vec();
        assert!(!accepts(b'E', &body(&error("57P03"))));
        // pg_hba, an unknown database, too many connections: the postmaster
        // is up and answering.
        for code in ["28000", "3D000", "53300", "28P01"] {
            assert!(accepts(b'E', &body(&error(code))), "{code}");
        }
        // An authentication request (MD5, here).
        assert!(accepts(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]));
    }
}

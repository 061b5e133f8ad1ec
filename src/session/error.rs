//! Session errors, one variant per way a session can fail, each knowing what
//! (if anything) the client should be told.

use crate::protocol::frame::{FrameError, ReadError};
use crate::protocol::messages::Severity;
use crate::protocol::sqlstate;
use crate::protocol::startup::StartupError;
use crate::routing::NoRoute;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("startup: {0}")]
    Startup(#[from] StartupError),
    #[error("timeout waiting for the startup packet")]
    StartupTimeout,
    #[error("sorry, too many clients already")]
    TooManyConnections,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client did not use TLS, which is required")]
    TlsRequired,
    #[error("invalid value for parameter \"{name}\": \"{value}\"")]
    BadParameter { name: String, value: String },
    #[error("{reason} (waited {waited_ms} ms)")]
    NoRoute { reason: NoRoute, waited_ms: u128 },
    #[error("cannot connect to {node}: {detail} (waited {waited_ms} ms)")]
    BackendUnavailable {
        node: String,
        detail: String,
        waited_ms: u128,
    },
    #[error("{node} is no longer a primary")]
    NotPrimaryAnymore { node: String },
    #[error("pgpivot is paused and was not resumed within the hold timeout")]
    Paused,
    /// Shutdown began while the session waited for a node or at a pause.
    #[error("pgpivot is shutting down")]
    ShuttingDown,
    #[error("backend closed the connection during authentication")]
    BackendClosedDuringAuth,
    #[error("backend sent an invalid message during authentication: {0}")]
    BackendProtocol(String),
    #[error("client protocol error: {0}")]
    ClientProtocol(#[from] FrameError),
    #[error("client i/o: {0}")]
    ClientIo(#[from] std::io::Error),
    #[error("client closed the connection")]
    ClientClosed,
    #[error("authentication failed at the backend")]
    AuthRejected,
}

impl SessionError {
    /// The ErrorResponse the client gets, if any (none when the client is
    /// gone, or the backend already told it).
    pub fn client_error(&self) -> Option<(Severity, &'static str, String)> {
        use SessionError::*;
        let fatal = |code, msg: String| Some((Severity::Fatal, code, msg));
        match self {
            Startup(StartupError::Closed | StartupError::Io(_)) => None,
            Startup(e) => fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
            StartupTimeout => fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
            TooManyConnections => fatal(sqlstate::TOO_MANY_CONNECTIONS, self.to_string()),
            TlsRequired => fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "this server requires TLS: connect with sslmode=require".into(),
            ),
            BadParameter { .. } => fatal(sqlstate::INVALID_PARAMETER_VALUE, self.to_string()),
            Paused => fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string()),
            ShuttingDown => fatal(sqlstate::ADMIN_SHUTDOWN, self.to_string()),
            NoRoute { .. } | BackendUnavailable { .. } | NotPrimaryAnymore { .. } => {
                fatal(sqlstate::CANNOT_CONNECT_NOW, format!("pgpivot: {self}"))
            }
            BackendClosedDuringAuth | BackendProtocol(_) => {
                fatal(sqlstate::CONNECTION_FAILURE, format!("pgpivot: {self}"))
            }
            ClientProtocol(_) => fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
            Tls(_) | ClientIo(_) | ClientClosed | AuthRejected => None,
        }
    }

    /// Label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        use SessionError::*;
        match self {
            Startup(StartupError::Closed) | ClientClosed | ClientIo(_) => "client_closed",
            Startup(_) | ClientProtocol(_) => "protocol_violation",
            StartupTimeout => "startup_timeout",
            TooManyConnections => "too_many_connections",
            Tls(_) | TlsRequired => "tls",
            BadParameter { .. } => "bad_parameter",
            NoRoute { .. } | Paused => "no_route",
            ShuttingDown => "shutdown",
            BackendUnavailable { .. } | NotPrimaryAnymore { .. } => "backend_unavailable",
            BackendClosedDuringAuth | BackendProtocol(_) => "backend_lost",
            AuthRejected => "auth_failed",
        }
    }
}

impl From<ReadError> for SessionError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Frame(f) => SessionError::ClientProtocol(f),
            ReadError::Truncated => SessionError::ClientClosed,
            ReadError::Io(io) => SessionError::ClientIo(io),
        }
    }
}

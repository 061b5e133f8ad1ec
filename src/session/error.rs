//! Session errors, one enum per stage, joined in [`SessionError`].
//!
//! Each stage's error says three things through methods, never through its
//! text: what the client is told ([`ClientError`], kept apart from the
//! internal detail that `Display` gives logs), a label for logs and metrics
//! (`as_label`), and whether the client is simply gone
//! (`is_client_gone`, logged at debug only).

use crate::protocol::frame::{FrameError, ReadError};
use crate::protocol::messages::Severity;
use crate::protocol::sqlstate;
use crate::protocol::startup::StartupError;
use crate::routing::NoRoute;

/// What the client is told: one ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
}

impl ClientError {
    fn fatal(code: &'static str, message: impl Into<String>) -> Option<ClientError> {
        Some(ClientError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
        })
    }
}

/// Stage 1, [`handshake`](super::handshake): encryption negotiation and the
/// startup packet.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("startup: {0}")]
    Startup(#[from] StartupError),
    #[error("timeout waiting for the startup packet")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    pub fn client_error(&self) -> Option<ClientError> {
        match self {
            HandshakeError::Startup(StartupError::Closed | StartupError::Io(_)) => None,
            HandshakeError::Startup(e) => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())
            }
            HandshakeError::Timeout => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string())
            }
            HandshakeError::Tls(_) | HandshakeError::Io(_) => None,
        }
    }

    pub fn as_label(&self) -> &'static str {
        match self {
            HandshakeError::Startup(StartupError::Closed) | HandshakeError::Io(_) => {
                "client_closed"
            }
            HandshakeError::Startup(_) => "protocol_violation",
            HandshakeError::Timeout => "startup_timeout",
            HandshakeError::Tls(_) => "tls",
        }
    }

    fn is_client_gone(&self) -> bool {
        matches!(
            self,
            HandshakeError::Startup(StartupError::Closed) | HandshakeError::Io(_)
        )
    }
}

/// Admission, after the startup packet: limits, the TLS requirement and the
/// session's own `pgpivot.*` settings ([`params`](super::params)).
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("sorry, too many clients already")]
    TooManyConnections,
    #[error("client did not use TLS, which is required")]
    TlsRequired,
    #[error("invalid value for parameter \"{name}\": \"{value}\"")]
    BadParameter { name: String, value: String },
}

impl AdmitError {
    pub fn client_error(&self) -> Option<ClientError> {
        match self {
            AdmitError::TooManyConnections => {
                ClientError::fatal(sqlstate::TOO_MANY_CONNECTIONS, self.to_string())
            }
            AdmitError::TlsRequired => ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "this server requires TLS: connect with sslmode=require",
            ),
            AdmitError::BadParameter { .. } => {
                ClientError::fatal(sqlstate::INVALID_PARAMETER_VALUE, self.to_string())
            }
        }
    }

    pub fn as_label(&self) -> &'static str {
        match self {
            AdmitError::TooManyConnections => "too_many_connections",
            AdmitError::TlsRequired => "tls",
            AdmitError::BadParameter { .. } => "bad_parameter",
        }
    }
}

/// Stages 2 and 3, [`connect`](super::connect): the pause gate, routing,
/// holding and opening the backend connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{reason} (waited {waited_ms} ms)")]
    NoRoute { reason: NoRoute, waited_ms: u128 },
    #[error("cannot connect to {node}: {detail} (waited {waited_ms} ms)")]
    Unavailable {
        node: String,
        detail: String,
        waited_ms: u128,
    },
    #[error("pgpivot is paused and was not resumed within the hold timeout")]
    Paused,
    /// Shutdown began while the session waited for a node or at a pause.
    #[error("pgpivot is shutting down")]
    ShuttingDown,
}

impl ConnectError {
    pub fn client_error(&self) -> Option<ClientError> {
        match self {
            ConnectError::Paused => {
                ClientError::fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string())
            }
            ConnectError::ShuttingDown => {
                ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, self.to_string())
            }
            ConnectError::NoRoute { .. } | ConnectError::Unavailable { .. } => {
                ClientError::fatal(sqlstate::CANNOT_CONNECT_NOW, format!("pgpivot: {self}"))
            }
        }
    }

    pub fn as_label(&self) -> &'static str {
        match self {
            ConnectError::NoRoute { .. } | ConnectError::Paused => "no_route",
            ConnectError::ShuttingDown => "shutdown",
            ConnectError::Unavailable { .. } => "backend_unavailable",
        }
    }
}

/// Stage 4, [`auth`](super::auth): the pass-through authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The server refused the client (its own ErrorResponse was relayed).
    #[error("authentication failed at the backend")]
    Rejected,
    /// A read-write session's server turned out to be in hot standby.
    #[error("{node} is no longer a primary")]
    NotPrimary { node: String },
    /// The node became ineligible, or authentication took too long.
    #[error("cannot connect to {node}: {detail}")]
    Abandoned { node: String, detail: String },
    #[error("backend closed the connection during authentication")]
    BackendClosed,
    #[error("backend sent an invalid message during authentication: {0}")]
    BackendProtocol(String),
    #[error("client protocol error: {0}")]
    ClientProtocol(#[from] FrameError),
    #[error("client i/o: {0}")]
    ClientIo(#[from] std::io::Error),
    #[error("client closed the connection")]
    ClientClosed,
}

impl AuthError {
    pub fn client_error(&self) -> Option<ClientError> {
        match self {
            AuthError::NotPrimary { .. } | AuthError::Abandoned { .. } => {
                ClientError::fatal(sqlstate::CANNOT_CONNECT_NOW, format!("pgpivot: {self}"))
            }
            AuthError::BackendClosed | AuthError::BackendProtocol(_) => {
                ClientError::fatal(sqlstate::CONNECTION_FAILURE, format!("pgpivot: {self}"))
            }
            AuthError::ClientProtocol(_) => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string())
            }
            AuthError::Rejected | AuthError::ClientIo(_) | AuthError::ClientClosed => None,
        }
    }

    pub fn as_label(&self) -> &'static str {
        match self {
            AuthError::Rejected => "auth_failed",
            AuthError::NotPrimary { .. } | AuthError::Abandoned { .. } => "backend_unavailable",
            AuthError::BackendClosed | AuthError::BackendProtocol(_) => "backend_lost",
            AuthError::ClientProtocol(_) => "protocol_violation",
            AuthError::ClientIo(_) | AuthError::ClientClosed => "client_closed",
        }
    }

    fn is_client_gone(&self) -> bool {
        matches!(self, AuthError::ClientIo(_) | AuthError::ClientClosed)
    }

    /// A client-side read error, as this stage reports it.
    pub fn from_client(e: ReadError) -> AuthError {
        match e {
            ReadError::Frame(f) => AuthError::ClientProtocol(f),
            ReadError::Truncated => AuthError::ClientClosed,
            ReadError::Io(io) => AuthError::ClientIo(io),
        }
    }

    /// A backend-side read error, as this stage reports it.
    pub fn from_backend(e: ReadError) -> AuthError {
        match e {
            ReadError::Frame(f) => AuthError::BackendProtocol(f.to_string()),
            ReadError::Truncated | ReadError::Io(_) => AuthError::BackendClosed,
        }
    }
}

/// How a session failed before its relay started, by stage.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl SessionError {
    /// The ErrorResponse the client gets, if any (none when the client is
    /// gone, or the backend already told it).
    pub fn client_error(&self) -> Option<ClientError> {
        match self {
            SessionError::Handshake(e) => e.client_error(),
            SessionError::Admit(e) => e.client_error(),
            SessionError::Connect(e) => e.client_error(),
            SessionError::Auth(e) => e.client_error(),
        }
    }

    /// Label for logs and metrics.
    pub fn as_label(&self) -> &'static str {
        match self {
            SessionError::Handshake(e) => e.as_label(),
            SessionError::Admit(e) => e.as_label(),
            SessionError::Connect(e) => e.as_label(),
            SessionError::Auth(e) => e.as_label(),
        }
    }

    /// The client went away (nothing to tell, nothing worth an info log).
    pub fn is_client_gone(&self) -> bool {
        match self {
            SessionError::Handshake(e) => e.is_client_gone(),
            SessionError::Auth(e) => e.is_client_gone(),
            SessionError::Admit(_) | SessionError::Connect(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_the_proxy_writes_names_it_once_at_most() {
        let errors: Vec<SessionError> = vec![
            ConnectError::Unavailable {
                node: "pg1".into(),
                detail: "connection refused".into(),
                waited_ms: 3,
            }
            .into(),
            ConnectError::NoRoute {
                reason: NoRoute::NoPrimary,
                waited_ms: 5,
            }
            .into(),
            AuthError::Abandoned {
                node: "pg1".into(),
                detail: "pg1 is no longer the primary".into(),
            }
            .into(),
            AuthError::BackendClosed.into(),
            AdmitError::TooManyConnections.into(),
            HandshakeError::Timeout.into(),
        ];
        for e in errors {
            let shown = e.client_error().expect("the client is told");
            assert!(shown.message.matches("pgpivot").count() <= 1, "{shown:?}");
            assert!(!e.as_label().is_empty());
            assert!(!e.is_client_gone());
        }
        let gone: SessionError = AuthError::ClientClosed.into();
        assert!(gone.is_client_gone() && gone.client_error().is_none());
    }
}

//! The PostgreSQL wire protocol, as far as the proxy needs it.
//!
//! pgpivot relays almost every byte without looking at it. This module holds
//! the few places where it must look or speak:
//!
//! - [`startup`]: the untyped startup-phase packets (SSLRequest, GSSENCRequest,
//!   CancelRequest, StartupMessage) and the startup parameters.
//! - [`frame`]: a header-only framer that finds message boundaries in a byte
//!   stream without copying, so the relay can pass large messages through in
//!   pieces and still stop at the few messages it must read.
//! - [`messages`]: the messages the proxy reads (ReadyForQuery,
//!   BackendKeyData, Authentication, ErrorResponse fields, ParameterStatus) or
//!   writes itself (its own ErrorResponses), built on pgwire's types.

pub mod frame;
pub mod messages;
pub mod startup;

/// SQLSTATE codes the proxy itself sends (see README, "Errors").
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
}

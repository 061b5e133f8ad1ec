//! Where a node is: `host:port` over TCP, or a Unix-domain socket for a
//! proxy on the database host. Parsed once from `[[nodes]] address` (and
//! `port`) in [`config`](crate::config), then used by every connection to the
//! node: sessions ([`session::connect`](crate::session::connect)), cancels,
//! the monitor and the auth query.
//!
//! The socket forms are libpq's: a path starting with `/` is a socket, either
//! the socket file itself (`/var/run/postgresql/.s.PGSQL.5432`) or its
//! directory, with `port` (default 5432) naming `<dir>/.s.PGSQL.<port>`.
//! Which one is decided by the name, not the file system (the socket may not
//! exist yet when the config is read).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

/// PostgreSQL's socket file name is this prefix and the port.
const SOCKET_PREFIX: &str = ".s.PGSQL.";

/// The port of a socket directory without a `port` key, as libpq.
pub const DEFAULT_PORT: u16 = 5432;

/// A node's address, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddress {
    /// `host:port`; a host name is resolved at each connect.
    Tcp(String),
    /// The socket `<dir>/.s.PGSQL.<port>`: tokio-postgres takes the two
    /// apart, so they are kept apart.
    Unix { dir: PathBuf, port: u16 },
}

/// Which key a bad address is reported against.
#[derive(Debug, PartialEq, Eq)]
pub enum AddressError {
    Address(String),
    Port(String),
}

impl BackendAddress {
    /// Parses a node's `address` and optional `port`.
    pub fn parse(address: &str, port: Option<u64>) -> Result<BackendAddress, AddressError> {
        if !address.starts_with('/') {
            if port.is_some() {
                return Err(AddressError::Port(
                    "only for a socket directory address (a host:port carries its port)".into(),
                ));
            }
            return crate::config::split_host_port(address)
                .map(|_| BackendAddress::Tcp(address.to_string()))
                .ok_or_else(|| {
                    AddressError::Address(format!(
                        "{address:?} is not a host:port address or a socket path"
                    ))
                });
        }
        let path = Path::new(address);
        let file = path.file_name().and_then(|f| f.to_str());
        if let Some(number) = file.and_then(|f| f.strip_prefix(SOCKET_PREFIX)) {
            if port.is_some() {
                return Err(AddressError::Port(
                    "not with a socket file address (its name carries the port)".into(),
                ));
            }
            let port = number.parse().ok().filter(|&p| p != 0).ok_or_else(|| {
                AddressError::Address(format!("{address:?}: {number:?} is not a port"))
            })?;
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            return Ok(BackendAddress::Unix { dir, port });
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| AddressError::Port(format!("{p} is not a port (1-65535)")))?,
        };
        let dir = address.trim_end_matches('/');
        let dir = PathBuf::from(if dir.is_empty() { "/" } else { dir });
        Ok(BackendAddress::Unix { dir, port })
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, BackendAddress::Unix { .. })
    }

    /// The host a certificate must name (`verify-full`); `None` on a socket.
    pub fn tcp_host(&self) -> Option<&str> {
        match self {
            BackendAddress::Tcp(a) => {
                Some(crate::config::split_host_port(a).map_or(a.as_str(), |(host, _)| host))
            }
            BackendAddress::Unix { .. } => None,
        }
    }

    /// Opens a plain connection (no TLS, no socket options).
    pub async fn connect(&self) -> io::Result<BackendSocket> {
        match self {
            BackendAddress::Tcp(a) => TcpStream::connect(a.as_str()).await.map(Either::Left),
            BackendAddress::Unix { dir, port } => UnixStream::connect(socket_path(dir, *port))
                .await
                .map(Either::Right),
        }
    }
}

/// `<dir>/.s.PGSQL.<port>`.
pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("{SOCKET_PREFIX}{port}"))
}

/// `host:port`, or the socket file's path (for the directory form too, so
/// the port shows).
impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddress::Tcp(a) => f.write_str(a),
            BackendAddress::Unix { dir, port } => {
                write!(f, "{}", socket_path(dir, *port).display())
            }
        }
    }
}

/// A plain connection to a node: `Left` over TCP, `Right` over a Unix
/// socket. tokio-util's `Either` passes every read and write to the stream
/// it holds.
pub type BackendSocket = Either<TcpStream, UnixStream>;

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(dir: &str, port: u16) -> BackendAddress {
        BackendAddress::Unix {
            dir: dir.into(),
            port,
        }
    }

    #[test]
    fn tcp_addresses_stay_host_port() {
        let a = BackendAddress::parse("db1:5432", None).unwrap();
        assert_eq!(a, BackendAddress::Tcp("db1:5432".into()));
        assert_eq!(a.tcp_host(), Some("db1"));
        assert_eq!(
            BackendAddress::parse("[::1]:5433", None)
                .unwrap()
                .tcp_host(),
            Some("::1")
        );
        assert!(matches!(
            BackendAddress::parse("db1", None),
            Err(AddressError::Address(_))
        ));
        assert!(matches!(
            BackendAddress::parse("db1:5432", Some(5432)),
            Err(AddressError::Port(_))
        ));
    }

    #[test]
    fn a_socket_file_carries_its_port() {
        let a = BackendAddress::parse("/var/run/postgresql/.s.PGSQL.5433", None).unwrap();
        assert_eq!(a, unix("/var/run/postgresql", 5433));
        assert_eq!(a.to_string(), "/var/run/postgresql/.s.PGSQL.5433");
        assert_eq!(a.tcp_host(), None);
        assert!(matches!(
            BackendAddress::parse("/tmp/.s.PGSQL.x", None),
            Err(AddressError::Address(_))
        ));
        assert!(matches!(
            BackendAddress::parse("/tmp/.s.PGSQL.0", None),
            Err(AddressError::Address(_))
        ));
        assert!(matches!(
            BackendAddress::parse("/tmp/.s.PGSQL.5432", Some(5432)),
            Err(AddressError::Port(_))
        ));
    }

    #[test]
    fn a_socket_directory_takes_the_port_key() {
        assert_eq!(
            BackendAddress::parse("/var/run/postgresql", None).unwrap(),
            unix("/var/run/postgresql", DEFAULT_PORT)
        );
        let a = BackendAddress::parse("/tmp/pg/", Some(6000)).unwrap();
        assert_eq!(a, unix("/tmp/pg", 6000));
        assert_eq!(a.to_string(), "/tmp/pg/.s.PGSQL.6000");
        for bad in [0, 65536, 1 << 40] {
            assert!(
                matches!(
                    BackendAddress::parse("/tmp", Some(bad)),
                    Err(AddressError::Port(_))
                ),
                "{bad}"
            );
        }
    }
}

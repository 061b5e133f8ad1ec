//! TLS from pgpivot to the PostgreSQL nodes, with libpq's `sslmode`
//! meanings, for session connections and the monitor alike.
//!
//! | sslmode | asks for TLS | refuses plaintext | checks the chain | checks the name |
//! | --- | --- | --- | --- | --- |
//! | `disable` | no | no | | |
//! | `prefer` (default) | yes | no | no | no |
//! | `require` | yes | yes | only with `sslrootcert`, as libpq | no |
//! | `verify-ca` | yes | yes | yes | no |
//! | `verify-full` | yes | yes | yes | yes (the node's host) |
//!
//! Negotiation is PostgreSQL's: an SSLRequest, one byte of answer (`S` or
//! `N`), then the TLS handshake on the same socket. rustls only; no OpenSSL.
//! A node on a Unix socket has no TLS (PostgreSQL offers none there; the
//! config refuses the modes that need it, and `prefer` means plaintext):
//! nothing is negotiated on it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::address::{BackendAddress, BackendSocket};
use crate::maybe_tls::MaybeTls;
use tokio_util::either::Either;

/// libpq's `sslmode`, as far as a proxy's backend side needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server that answers `N` must be refused.
    pub fn needs_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendTlsError {
    #[error("the server does not accept TLS, which sslmode={0} requires")]
    Refused(SslMode),
    #[error("TLS handshake failed (sslmode={mode}): {source}")]
    Handshake {
        mode: SslMode,
        source: std::io::Error,
    },
    #[error("unexpected answer {0:#04x} to the SSLRequest")]
    BadAnswer(u8),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why a backend TLS setting cannot be used (reported against its config key).
#[derive(Debug, thiserror::Error)]
pub enum BackendTlsConfigError {
    #[error("sslmode={0} needs sslrootcert (a CA file to check the server against)")]
    MissingRootCert(SslMode),
    #[error("cannot read CA file {path}: {reason}")]
    RootCert { path: PathBuf, reason: String },
}

/// One node's backend TLS: its mode and, unless disabled, the rustls client
/// config that carries its verification rules.
#[derive(Clone)]
pub struct BackendTls {
    pub mode: SslMode,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("mode", &self.mode)
            .finish()
    }
}

impl BackendTls {
    /// Plaintext only.
    pub fn disabled() -> BackendTls {
        BackendTls {
            mode: SslMode::Disable,
            config: None,
        }
    }

    /// Builds the settings for `mode`, reading `root_cert` (PEM) if given.
    pub fn new(
        mode: SslMode,
        root_cert: Option<&Path>,
    ) -> Result<BackendTls, BackendTlsConfigError> {
        if mode == SslMode::Disable {
            return Ok(BackendTls::disabled());
        }
        let roots = root_cert.map(read_roots).transpose()?;
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => webpki(roots),
            // libpq: require with a root certificate behaves as verify-ca.
            (SslMode::VerifyCa | SslMode::Require, Some(roots)) => {
                Arc::new(NameUnchecked(Some(webpki(roots))))
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(BackendTlsConfigError::MissingRootCert(mode))
            }
            (_, _) => Arc::new(NameUnchecked(None)),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(BackendTls {
            mode,
            config: Some(Arc::new(config)),
        })
    }

    /// Negotiates encryption on a fresh TCP connection to `host` (the
    /// node's configured host name or address: what `verify-full` checks).
    pub async fn negotiate(
        &self,
        mut tcp: TcpStream,
        host: &str,
    ) -> Result<BackendStream, BackendTlsError> {
        let Some(config) = &self.config else {
            return Ok(BackendStream::Plain(Either::Left(tcp)));
        };
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if !self.mode.needs_tls() => return Ok(BackendStream::Plain(Either::Left(tcp))),
            b'N' => return Err(BackendTlsError::Refused(self.mode)),
            other => return Err(BackendTlsError::BadAnswer(other)),
        }
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let tls = connector
            .connect(server_name(host), tcp)
            .await
            .map_err(|source| BackendTlsError::Handshake {
                mode: self.mode,
                source,
            })?;
        Ok(BackendStream::Tls(Box::new(tls)))
    }

    /// The same rules for the monitor's tokio-postgres connections.
    pub fn for_monitor(&self, host: &str) -> (tokio_postgres::config::SslMode, MonitorTls) {
        use tokio_postgres::config::SslMode as Pg;
        let mode = match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            _ => Pg::Require,
        };
        let tls = MonitorTls {
            config: self.config.clone(),
            name: server_name(host),
        };
        (mode, tls)
    }
}

/// Who a control-path connection (monitor, auth query) logs in as.
pub struct ControlLogin<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
    pub application_name: &'static str,
    /// Bounds the TCP connect.
    pub timeout: std::time::Duration,
}

impl BackendTls {
    /// A tokio-postgres client to the node at `address`, with this node's
    /// TLS rules (none on a Unix socket: tokio-postgres is given the
    /// socket's directory and port and builds `.s.PGSQL.<port>` itself). The
    /// connection runs in a task of its own until the client is dropped. The
    /// error is the reason, causes included.
    pub async fn control_client(
        &self,
        address: &BackendAddress,
        login: &ControlLogin<'_>,
    ) -> Result<tokio_postgres::Client, String> {
        let mut config = tokio_postgres::Config::new();
        let host = match address {
            BackendAddress::Tcp(a) => {
                let (host, port) = crate::config::split_host_port(a)
                    .ok_or_else(|| format!("bad address {a:?}"))?;
                config.host(host).port(port);
                host
            }
            BackendAddress::Unix { dir, port } => {
                config.host_path(dir).port(*port);
                "localhost"
            }
        };
        config
            .user(login.user)
            .password(login.password)
            .dbname(login.database)
            .application_name(login.application_name)
            .connect_timeout(login.timeout);
        let (ssl_mode, tls) = self.for_monitor(host);
        config.ssl_mode(ssl_mode);
        let (client, connection) = config.connect(tls).await.map_err(|e| with_causes(&e))?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server goes away.
            let _ = connection.await;
        });
        Ok(client)
    }
}

/// An error with its causes: tokio-postgres says "error performing TLS
/// handshake" and keeps the reason (a certificate for another name, say) in
/// its source.
fn with_causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The name the certificate must carry: an IP address or a DNS name.
fn server_name(host: &str) -> ServerName<'static> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("invalid.host").expect("a valid DNS name"))
}

fn read_roots(path: &Path) -> Result<rustls::RootCertStore, BackendTlsConfigError> {
    let problem = |reason: String| BackendTlsConfigError::RootCert {
        path: path.into(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| problem(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(problem("no usable certificate in the file".into()));
    }
    Ok(roots)
}

fn webpki(roots: rustls::RootCertStore) -> Arc<dyn ServerCertVerifier> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .expect("a non-empty root store")
}

/// The certificate check of `prefer`, `require` and `verify-ca`: with a
/// chain verifier, the chain must lead to the CA but the name is not checked
/// (`verify-ca`, and `require` with a CA, as in libpq); without one, any
/// certificate is taken (encryption without authentication of the server).
/// Handshake signatures are checked either way, so the handshake is a real
/// one with the certificate the server presented.
#[derive(Debug)]
struct NameUnchecked(Option<Arc<dyn ServerCertVerifier>>);

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.0 else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A backend connection after encryption negotiation: plain TCP or Unix,
/// or TLS over TCP.
pub type BackendStream = MaybeTls<BackendSocket, tokio_rustls::client::TlsStream<TcpStream>>;

impl BackendStream {
    /// The TCP socket under any TLS; `None` on a Unix socket.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            MaybeTls::Plain(Either::Left(s)) => Some(s),
            MaybeTls::Plain(Either::Right(_)) => None,
            MaybeTls::Tls(s) => Some(s.get_ref().0),
        }
    }
}

/// The monitor's TLS connector for tokio-postgres: the node's rules, with
/// tokio-postgres doing the SSLRequest negotiation itself.
#[derive(Clone)]
pub struct MonitorTls {
    config: Option<Arc<rustls::ClientConfig>>,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MonitorTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = MonitorTlsStream<S>;
    type TlsConnect = MonitorTls;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> std::io::Result<MonitorTls> {
        Ok(self.clone())
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for MonitorTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = MonitorTlsStream<S>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<MonitorTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| {
                std::io::Error::other("TLS is disabled for this node (sslmode=disable)")
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(self.name, stream)
                .await?;
            Ok(MonitorTlsStream(Box::new(tls)))
        })
    }
}

/// A monitor connection over TLS. Channel binding is not offered: the
/// monitor authenticates with plain SCRAM, as libpq's default
/// `channel_binding=prefer` would with a server that does not require it.
pub struct MonitorTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for MonitorTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MonitorTlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MonitorTlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

//! TLS for client connections, terminated at the proxy with rustls.
//!
//! Certificates and keys are read with rustls' own PEM parser. ALPN offers
//! `postgresql`, which PostgreSQL 17 clients require for direct TLS
//! (`sslnegotiation=direct`) and others ignore.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate and key do not form a usable TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// The ALPN protocol name PostgreSQL uses.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Builds the server config from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.into(),
            reason: "no certificate in the file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.into(),
        reason: e.to_string(),
    })?;
    server_config_from(certs, key_der)
}

/// PostgreSQL writes TLS records of at most 8 KiB of plaintext (its send
/// buffer is 8 KiB); rustls would otherwise write up to 16 KiB. Clients are
/// tuned to the server's size: libpq asks OpenSSL for as little as 8 KiB at
/// a time, and OpenSSL hands out one record per read, keeping the rest of a
/// larger record in its own buffer, where a client that waits on the socket
/// never sees it (the socket is empty, the bytes are already decrypted). A
/// proxy whose records are larger than the server's can leave the end of a
/// response stuck there. So the proxy writes the server's record size.
pub const MAX_RECORD_PLAINTEXT: usize = 8192;

/// Builds the server config from parsed certificates and key.
pub fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // rustls counts the 5-byte record header in this limit.
    config.max_fragment_size = Some(MAX_RECORD_PLAINTEXT + RECORD_HEADER_LEN);
    Ok(Arc::new(config))
}

/// The TLS record header: content type, version, length.
const RECORD_HEADER_LEN: usize = 5;

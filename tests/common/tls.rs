//! TLS helpers: a self-signed certificate, a proxy with `[tls]`, a raw TLS
//! client that speaks SSLRequest first, a tap that measures the TLS records
//! pgpivot writes, and the libpq ≥ 17 client (psycopg 3) where installed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pgpivot::config::{FileConfig, TlsConfig, TlsMode};
use pgpivot::proxy::Proxy;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{config_for, shared_cluster, start_proxy};

/// A self-signed certificate and its key, as PEM files in a temporary
/// directory that lives as long as this value.
pub struct TlsFiles {
    _dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TlsFiles {
    pub fn self_signed() -> TlsFiles {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certified =
            rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        TlsFiles {
            _dir: dir,
            cert,
            key,
            der: certified.cert.der().clone(),
        }
    }
}

/// A proxy in front of the shared cluster with `[tls]` in `mode`, and
/// `tweak` applied to the rest of its config.
pub async fn tls_proxy(mode: TlsMode, tweak: impl FnOnce(&mut FileConfig)) -> (Proxy, TlsFiles) {
    let files = TlsFiles::self_signed();
    let mut config = config_for(shared_cluster());
    config.tls = Some(TlsConfig {
        cert: files.cert.clone(),
        key: files.key.clone(),
        mode,
    });
    tweak(&mut config);
    (start_proxy(config).await, files)
}

/// Connects to `addr`, sends an SSLRequest, expects `S` and completes a TLS
/// handshake that trusts `files`' certificate.
pub async fn tls_connect(
    addr: SocketAddr,
    files: &TlsFiles,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S", "pgpivot accepts the SSLRequest");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(files.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with pgpivot")
}

/// Reads until the peer closes; `Ok` only for a clean TLS close (a
/// close_notify before the TCP FIN), with the bytes read before it.
pub async fn read_to_clean_close(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await?;
    Ok(got)
}

/// TLS record sizes seen by a [`RecordTap`], server to client.
#[derive(Debug, Default, Clone)]
pub struct RecordStats {
    /// Application-data records (content type 23).
    pub records: usize,
    /// The longest one's length field (ciphertext, header excluded).
    pub max_len: usize,
}

/// A TCP relay between a client and pgpivot that parses the TLS records
/// pgpivot sends (after its one-byte `S` answer to the SSLRequest).
pub struct RecordTap {
    pub address: SocketAddr,
    pub stats: Arc<Mutex<RecordStats>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordTap {
    pub async fn start(upstream: SocketAddr) -> RecordTap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stats = Arc::new(Mutex::new(RecordStats::default()));
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream).await.unwrap();
                tokio::spawn(tap_one(client, server, shared.clone()));
            }
        });
        RecordTap {
            address,
            stats,
            task,
        }
    }

    pub fn stats(&self) -> RecordStats {
        self.stats.lock().unwrap().clone()
    }
}

async fn tap_one(client: TcpStream, server: TcpStream, stats: Arc<Mutex<RecordStats>>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let down = async {
        let mut parser = RecordParser::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            parser.feed(&buf[..n], &stats);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Walks TLS record headers across reads.
#[derive(Default)]
struct RecordParser {
    /// The one-byte answer to the SSLRequest was skipped.
    past_answer: bool,
    header: Vec<u8>,
    /// Body bytes of the current record still to skip.
    skip: usize,
}

impl RecordParser {
    fn feed(&mut self, mut bytes: &[u8], stats: &Mutex<RecordStats>) {
        if !self.past_answer && !bytes.is_empty() {
            self.past_answer = true;
            bytes = &bytes[1..];
        }
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let need = 5 - self.header.len();
            let n = need.min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                let len = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                if self.header[0] == 23 {
                    let mut s = stats.lock().unwrap();
                    s.records += 1;
                    s.max_len = s.max_len.max(len);
                }
                self.skip = len;
                self.header.clear();
            }
        }
    }
}

/// A Python interpreter with psycopg 3 on a libpq of version 17 or later,
/// the client whose TLS behaviour (encrypted cancels, waiting on the socket
/// between reads) the TLS tests need. `None` where the machine has none;
/// under CI (`CI` set), `.ci/run` installs it, so its absence fails.
pub fn psycopg_python() -> Option<&'static str> {
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import psycopg, sys; sys.exit(0 if psycopg.pq.version() >= 170000 else 1)",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have psycopg 3 with libpq >= 17 (pip install 'psycopg[binary]')"
        );
        eprintln!("skipped: no psycopg 3 with libpq >= 17 on this machine");
        return None;
    }
    Some("python3")
}

/// Runs one of tests/clients/*.py with `args`, with a deadline.
pub async fn run_python(script: &str, args: &[&str]) -> std::process::Output {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/");
    let child = tokio::process::Command::new("python3")
        .arg(format!("{path}{script}"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(300), child)
        .await
        .expect("the python client finishes within 300 s")
        .expect("run python3")
}

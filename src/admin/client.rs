//! A minimal HTTP/1.1 client for `pgpivot status`: one GET on the admin
//! endpoint, over a plain TCP socket (no HTTP client crate for one request).

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::status::StatusReport;

/// Fetches and parses `/status`.
pub async fn get_status(address: &str, token: Option<&str>) -> anyhow::Result<StatusReport> {
    let body = get(address, "/status", token).await?;
    serde_json::from_str(&body).context("parse /status")
}

/// GET `path`; returns the body of a 200 answer.
pub async fn get(address: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let (status, body) = call(address, "GET", path, token).await?;
    if status != 200 {
        bail!("{path}: HTTP {status}: {}", body.trim());
    }
    Ok(body)
}

/// Sends `method path` and returns the status code and body.
pub async fn call(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)
        .await
        .with_context(|| format!("connect to the admin endpoint {address}"))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Joins a chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

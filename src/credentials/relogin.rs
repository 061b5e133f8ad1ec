//! Logging in to a node as a session's role with a kept [`Credential`]:
//! the client side of PostgreSQL's startup and authentication, up to the
//! first ReadyForQuery.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::scram::{ScramClient, ScramError};
use super::{md5_answer, Credential};
use crate::maybe_tls::send;
use crate::protocol::frame::{read_message, ReadError};
use crate::protocol::messages::{self, tag, TxStatus};
use crate::protocol::startup::StartupMessage;

const MESSAGE_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReloginError {
    /// The server said no (a changed password, pg_hba.conf): its SQLSTATE and
    /// message, which never contain the credential.
    #[error("the server refused the login (SQLSTATE {code}): {message}")]
    Refused { code: String, message: String },
    #[error("the server asks for {0}, and no credential for it was kept")]
    NoCredential(&'static str),
    #[error("SCRAM: {0}")]
    Scram(#[from] ScramError),
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    #[error("connection lost during the login: {0}")]
    Io(#[from] std::io::Error),
}

/// What the server said during the login.
#[derive(Debug)]
pub struct LoggedIn {
    /// ParameterStatus values, in the order sent.
    pub parameters: Vec<(String, String)>,
    /// BackendKeyData: the new backend's pid and secret.
    pub key: Option<(i32, Vec<u8>)>,
    pub status: TxStatus,
}

/// Sends `startup` and answers the server's challenges with `credential`.
pub async fn login<S>(
    backend: &mut S,
    startup: &StartupMessage,
    credential: &Credential,
) -> Result<LoggedIn, ReloginError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(backend, &startup.encode()).await?;
    answer_challenges(backend, BytesMut::with_capacity(1024), credential).await
}

/// The rest of a login whose startup packet was sent already: `buf` holds
/// what the server answered so far (the connect stage reads its first
/// message to see whether it takes sessions at all).
pub async fn answer_challenges<S>(
    backend: &mut S,
    mut buf: BytesMut,
    credential: &Credential,
) -> Result<LoggedIn, ReloginError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut scram: Option<ScramClient<'_>> = None;
    let mut parameters = Vec::new();
    let mut key = None;
    loop {
        let (t, body) = read_message(backend, &mut buf, MESSAGE_LIMIT)
            .await
            .map_err(|e| match e {
                ReadError::Io(io) => ReloginError::Io(io),
                other => ReloginError::Protocol(other.to_string()),
            })?
            .ok_or_else(|| ReloginError::Protocol("closed during the login".into()))?;
        match t {
            tag::AUTHENTICATION => {
                let code = messages::auth_code(&body)
                    .ok_or_else(|| ReloginError::Protocol("short authentication message".into()))?;
                if let Some(reply) = answer(code, &body[4..], credential, &mut scram)? {
                    send(backend, &reply).await?;
                }
            }
            tag::PARAMETER_STATUS => {
                if let Some((name, value)) = messages::parameter_status(&body) {
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    parameters.push((text(name), text(value)));
                }
            }
            tag::BACKEND_KEY_DATA => {
                key = messages::backend_key(&body).map(|(pid, secret)| (pid, secret.to_vec()));
            }
            tag::ERROR_RESPONSE => return Err(refused(&body)),
            tag::READY_FOR_QUERY => {
                let status = TxStatus::from_ready_for_query(&body)
                    .ok_or_else(|| ReloginError::Protocol("bad ReadyForQuery".into()))?;
                return Ok(LoggedIn {
                    parameters,
                    key,
                    status,
                });
            }
            _ => {} // NoticeResponse, NegotiateProtocolVersion
        }
    }
}

/// The message answering authentication request `code`, if it wants one.
fn answer<'a>(
    code: u32,
    data: &[u8],
    credential: &'a Credential,
    scram: &mut Option<ScramClient<'a>>,
) -> Result<Option<BytesMut>, ReloginError> {
    Ok(match (code, credential) {
        (0, _) => None,
        (3, Credential::Cleartext(password)) => Some(password_message(password.as_bytes())),
        (5, Credential::Md5(stored)) => {
            let salt: [u8; 4] = data
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| ReloginError::Protocol("short md5 salt".into()))?;
            Some(password_message(md5_answer(stored, &salt).as_bytes()))
        }
        (10, Credential::Scram(keys)) => {
            let offered = data.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
            if !offered {
                return Err(ReloginError::Protocol("SCRAM-SHA-256 not offered".into()));
            }
            let client = scram.insert(ScramClient::new(keys));
            let first = client.client_first();
            let mut m = BytesMut::new();
            m.put_u8(b'p');
            m.put_u32((4 + 14 + 4 + first.len()) as u32);
            m.put_slice(b"SCRAM-SHA-256\0");
            m.put_u32(first.len() as u32);
            m.put_slice(&first);
            Some(m)
        }
        (11, Credential::Scram(_)) => {
            let client = scram
                .as_mut()
                .ok_or_else(|| ReloginError::Protocol("SASL continue before SASL".into()))?;
            let fin = client.client_final(data)?;
            let mut m = BytesMut::new();
            m.put_u8(b'p');
            m.put_u32((4 + fin.len()) as u32);
            m.put_slice(&fin);
            Some(m)
        }
        (12, Credential::Scram(_)) => {
            let client = scram
                .as_ref()
                .ok_or_else(|| ReloginError::Protocol("SASL final before SASL".into()))?;
            client.verify_server_final(data)?;
            None
        }
        (3, _) => return Err(ReloginError::NoCredential("a cleartext password")),
        (5, _) => return Err(ReloginError::NoCredential("an md5 password")),
        (10..=12, _) => return Err(ReloginError::NoCredential("SCRAM-SHA-256")),
        (other, _) => {
            return Err(ReloginError::Protocol(format!(
                "authentication method {other} cannot be replayed"
            )))
        }
    })
}

/// A PasswordMessage (`p`) carrying `secret`. The buffer lives only until it
/// is written.
fn password_message(secret: &[u8]) -> BytesMut {
    let mut m = BytesMut::with_capacity(6 + secret.len());
    m.put_u8(b'p');
    m.put_u32((4 + secret.len() + 1) as u32);
    m.put_slice(secret);
    m.put_u8(0);
    m
}

fn refused(body: &[u8]) -> ReloginError {
    let field = |wanted: u8| {
        body.split(|&b| b == 0)
            .find(|f| f.first() == Some(&wanted))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    };
    ReloginError::Refused {
        code: field(b'C'),
        message: field(b'M'),
    }
}

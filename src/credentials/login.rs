//! What the proxy notes of a relayed login (the authentication stage feeds
//! it the server's requests and the client's answers), to log in again as
//! the same role later.

use zeroize::Zeroizing;

use super::scram::Transcript;

/// How the relayed login went, kept to log in again elsewhere (see
/// [`credential_for`](super::credential_for)).
#[derive(Debug, Default, Clone)]
pub enum Login {
    /// The server asked for nothing.
    #[default]
    Trust,
    /// Method `password`: what the client sent.
    Cleartext(Zeroizing<String>),
    /// Method md5: answered again from the role's stored hash.
    Md5,
    /// SCRAM-SHA-256: the exchange, from which the ClientKey is derived.
    Scram(Transcript),
    /// GSSAPI, SSPI or anything else that cannot be replayed.
    Other,
}

impl Login {
    /// Notes the server's request `code` (with its data).
    pub(crate) fn saw_request(&mut self, code: u32, data: &[u8]) {
        match (code, &mut *self) {
            (0, _) => {}
            (3, _) => *self = Login::Cleartext(Zeroizing::default()),
            (5, _) => *self = Login::Md5,
            (10, _) => *self = Login::Scram(Transcript::default()),
            (11, Login::Scram(t)) => t.server_first = data.to_vec(),
            (12, Login::Scram(_)) => {}
            _ => *self = Login::Other,
        }
    }

    /// Notes the client's answer (a `p` message body).
    pub(crate) fn saw_answer(&mut self, body: &[u8]) {
        match self {
            Login::Cleartext(password) => {
                let text = body.strip_suffix(&[0]).unwrap_or(body);
                **password = String::from_utf8_lossy(text).into_owned();
            }
            Login::Scram(t) if t.client_first.is_empty() => {
                // SASLInitialResponse: mechanism, NUL, Int32 length, data.
                let data = body
                    .iter()
                    .position(|&b| b == 0)
                    .and_then(|nul| body.get(nul + 5..));
                t.client_first = data.unwrap_or_default().to_vec();
            }
            Login::Scram(t) => t.client_final = body.to_vec(),
            _ => {}
        }
    }
}

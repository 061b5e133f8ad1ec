//! SCRAM-SHA-256 without the password (RFC 5802, RFC 7677), as PostgreSQL
//! speaks it.
//!
//! From a relayed exchange the proxy sees client-first-bare, server-first
//! and client-final with its proof. With the role's StoredKey (from its
//! verifier): ClientSignature = HMAC(StoredKey, AuthMessage) and
//! ClientKey = ClientProof XOR ClientSignature, accepted only if
//! SHA-256(ClientKey) = StoredKey. ClientKey then answers any later
//! challenge: ClientProof' = ClientKey XOR HMAC(StoredKey, AuthMessage'),
//! and the server's final message is checked against ServerKey. This is how
//! PgBouncer, Odyssey and Supavisor log in again on a client's behalf.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, hmac, rand::SecureRandom};
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("the server's signature does not match: it does not know this role's key")]
    ServerSignature,
    #[error("the server reported a SCRAM error: {0}")]
    Server(String),
}

/// The parts of one relayed exchange that the derivation needs.
#[derive(Debug, Default, Clone)]
pub struct Transcript {
    /// The client's first message with its GS2 header (`n,,n=,r=...`).
    pub client_first: Vec<u8>,
    pub server_first: Vec<u8>,
    /// The client's final message, proof included (`c=...,r=...,p=...`).
    pub client_final: Vec<u8>,
}

/// What re-logs in as a role: its ClientKey (secret) and ServerKey (to check
/// the server).
#[derive(Clone)]
pub struct ScramKeys {
    pub client_key: Zeroizing<[u8; KEY_LEN]>,
    pub server_key: [u8; KEY_LEN],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// The ClientKey a relayed exchange proves, if it proves one for
/// `stored_key` (a wrong verifier, a failed login or a forged proof give
/// `None`).
pub fn client_key_from(
    t: &Transcript,
    stored_key: &[u8; KEY_LEN],
) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let first_bare = bare(&t.client_first)?;
    let (without_proof, proof) = split_proof(&t.client_final)?;
    let proof = B64.decode(proof).ok()?;
    if proof.len() != KEY_LEN {
        return None;
    }
    let auth_message = [first_bare, &t.server_first, without_proof].join(&b","[..]);
    let signature = hmac_sha256(stored_key, &auth_message);
    let mut client_key = Zeroizing::new([0u8; KEY_LEN]);
    for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
        *k = p ^ s;
    }
    let stored = sha256(&client_key[..]);
    same(&stored, stored_key).then_some(client_key)
}

/// The client side of one SCRAM exchange, answering with a ClientKey.
pub struct ScramClient<'a> {
    keys: &'a ScramKeys,
    nonce: String,
    auth_message: Vec<u8>,
}

impl<'a> ScramClient<'a> {
    pub fn new(keys: &'a ScramKeys) -> ScramClient<'a> {
        let mut raw = [0u8; 18];
        ring::rand::SystemRandom::new()
            .fill(&mut raw)
            .expect("the system random source works");
        ScramClient {
            keys,
            nonce: B64.encode(raw),
            auth_message: Vec::new(),
        }
    }

    /// The SASLInitialResponse data: no channel binding, an empty user name
    /// (PostgreSQL takes the role from the startup packet).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,n=,r={}", self.nonce).into_bytes()
    }

    /// The answer to the server's first message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let text = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let nonce = attribute(text, 'r').ok_or(ScramError::Malformed)?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let first_bare = format!("n=,r={}", self.nonce);
        self.auth_message = [
            first_bare.as_bytes(),
            server_first,
            without_proof.as_bytes(),
        ]
        .join(&b","[..]);
        let stored_key = sha256(&self.keys.client_key[..]);
        let signature = hmac_sha256(&stored_key, &self.auth_message);
        let proof: Vec<u8> = self
            .keys
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server's final message: only a server that knows the
    /// role's ServerKey can sign the exchange.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed)?;
        if let Some(e) = attribute(text, 'e') {
            return Err(ScramError::Server(e.to_string()));
        }
        let given = attribute(text, 'v').ok_or(ScramError::Malformed)?;
        let given = B64.decode(given).map_err(|_| ScramError::Malformed)?;
        let expected = hmac_sha256(&self.keys.server_key, &self.auth_message);
        if same(&given, &expected) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

/// client-first-bare: the client's first message without its GS2 header
/// (`n,,` or `y,,`; `p=...` channel binding never passes the proxy).
fn bare(client_first: &[u8]) -> Option<&[u8]> {
    let rest = client_first
        .strip_prefix(b"n,")
        .or_else(|| client_first.strip_prefix(b"y,"))?;
    let comma = rest.iter().position(|&b| b == b',')?;
    Some(&rest[comma + 1..])
}

/// Splits client-final into the part without the proof and the proof.
fn split_proof(client_final: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = client_final.windows(3).rposition(|w| w == b",p=")?;
    Some((&client_final[..at], &client_final[at + 3..]))
}

/// The value of attribute `name` (`name=value`) in a SCRAM message.
fn attribute(message: &str, name: char) -> Option<&str> {
    message
        .split(',')
        .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

/// Equality that looks at every byte (no early exit on the first mismatch).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; KEY_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, message);
    tag.as_ref().try_into().expect("HMAC-SHA-256 is 32 bytes")
}

pub fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example: user "user", password "pencil".
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    /// StoredKey and ServerKey as a server derives them from the password.
    fn verifier_keys() -> ([u8; KEY_LEN], [u8; KEY_LEN]) {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let mut salted = [0u8; KEY_LEN];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(4096).unwrap(),
            &salt,
            b"pencil",
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        (sha256(&client_key), hmac_sha256(&salted, b"Server Key"))
    }

    fn transcript() -> Transcript {
        Transcript {
            client_first: CLIENT_FIRST.into(),
            server_first: SERVER_FIRST.into(),
            client_final: CLIENT_FINAL.into(),
        }
    }

    #[test]
    fn the_client_key_of_rfc_7677s_exchange_is_derived_and_checked() {
        let (stored, server) = verifier_keys();
        let key = client_key_from(&transcript(), &stored).expect("a valid proof");
        assert_eq!(sha256(&key[..]), stored);
        // The server's signature of that exchange checks with ServerKey.
        let auth_message = format!("n=user,r=rOprNGfwEbeRWgbNEkqO,{SERVER_FIRST},c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        let v = B64.encode(hmac_sha256(&server, auth_message.as_bytes()));
        assert_eq!(format!("v={v}"), SERVER_FINAL);
    }

    #[test]
    fn a_wrong_verifier_or_a_forged_proof_gives_no_key() {
        let (mut stored, _) = verifier_keys();
        let mut forged = transcript();
        forged.client_final = CLIENT_FINAL.replace("p=dH", "p=eH").into();
        assert!(client_key_from(&forged, &stored).is_none());
        stored[0] ^= 1;
        assert!(client_key_from(&transcript(), &stored).is_none());
        let mut truncated = transcript();
        truncated.client_final = b"c=biws,r=abc".to_vec();
        assert!(client_key_from(&truncated, &stored).is_none());
    }

    #[test]
    fn a_kept_client_key_answers_a_new_challenge_and_checks_the_server() {
        let (stored, server_key) = verifier_keys();
        let client_key = client_key_from(&transcript(), &stored).unwrap();
        let keys = ScramKeys {
            client_key,
            server_key,
        };
        let mut client = ScramClient::new(&keys);
        let first = String::from_utf8(client.client_first()).unwrap();
        let nonce = first.strip_prefix("n,,n=,r=").unwrap().to_string();
        let server_first = format!("r={nonce}SERVER,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096");
        let fin = client.client_final(server_first.as_bytes()).unwrap();
        // The server checks the proof as PostgreSQL does.
        let t = Transcript {
            client_first: first.clone().into_bytes(),
            server_first: server_first.clone().into_bytes(),
            client_final: fin,
        };
        assert!(
            client_key_from(&t, &stored).is_some(),
            "the server accepts the proof"
        );
        let auth_message = format!("n=,r={nonce},{server_first},c=biws,r={nonce}SERVER");
        let v = B64.encode(hmac_sha256(&server_key, auth_message.as_bytes()));
        assert_eq!(
            client.verify_server_final(format!("v={v}").as_bytes()),
            Ok(())
        );
        assert_eq!(
            client.verify_server_final(b"v=AAAA"),
            Err(ScramError::ServerSignature)
        );
        assert_eq!(
            client.client_final(b"r=someoneelse,s=x,i=1"),
            Err(ScramError::Nonce)
        );
    }
}

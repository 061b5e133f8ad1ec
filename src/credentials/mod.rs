//! Credentials to log in again as a client's role on another node, without
//! knowing its password, for moving sessions at a failover.
//!
//! The login itself stays pass-through (the server checks `pg_hba.conf`, the
//! password and its expiry). What the proxy keeps from it:
//! - SCRAM-SHA-256: the ClientKey the relayed exchange proves, checked
//!   against the role's verifier ([`scram`]);
//! - md5: the role's stored hash, which answers any salt;
//! - cleartext `password`: what the client sent, in memory only;
//! - trust: nothing.
//!
//! Secrets come from a [`store::SecretStore`]: an auth query run on the
//! primary, or a PgBouncer-style auth file. Every secret is zeroized on drop
//! and never shown by `Debug`.

mod login;
pub mod relogin;
pub mod scram;
pub mod store;

use md5::{Digest, Md5};
use zeroize::Zeroizing;

pub use login::Login;
use scram::{ScramKeys, KEY_LEN};

/// A role's stored secret, as `pg_authid.rolpassword` holds it.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    Scram {
        stored_key: [u8; KEY_LEN],
        server_key: [u8; KEY_LEN],
    },
    /// `md5` + hex(md5(password + role name)).
    Md5(Zeroizing<String>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Scram { .. } => "Secret::Scram(..)",
            Secret::Md5(_) => "Secret::Md5(..)",
        })
    }
}

impl Secret {
    /// Parses a stored secret; `None` for anything else (a plain-text
    /// password, an unknown format).
    pub fn parse(stored: &str) -> Option<Secret> {
        if let Some(rest) = stored.strip_prefix("SCRAM-SHA-256$") {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD;
            let (_iterations_salt, keys) = rest.split_once('$')?;
            let (stored_key, server_key) = keys.split_once(':')?;
            let stored_key = b64.decode(stored_key).ok()?.try_into().ok()?;
            let server_key = b64.decode(server_key).ok()?.try_into().ok()?;
            return Some(Secret::Scram {
                stored_key,
                server_key,
            });
        }
        let hex = stored.strip_prefix("md5")?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Secret::Md5(Zeroizing::new(stored.to_string())))
    }
}

/// What answers a server's challenge for one session's role.
#[derive(Clone)]
pub enum Credential {
    /// The server asked for nothing (trust).
    Trust,
    Scram(ScramKeys),
    /// The stored `md5…` hash.
    Md5(Zeroizing<String>),
    /// The password the client sent (method `password`).
    Cleartext(Zeroizing<String>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Trust => "Credential::Trust",
            Credential::Scram(_) => "Credential::Scram(..)",
            Credential::Md5(_) => "Credential::Md5(..)",
            Credential::Cleartext(_) => "Credential::Cleartext(..)",
        })
    }
}

/// The credential that logs in again as the role of a relayed `login`,
/// given the role's stored `secret`; `None` when there is none (no secret
/// for an md5 or SCRAM login, a verifier the exchange does not match, a
/// method that cannot be replayed).
pub fn credential_for(login: &Login, secret: Option<&Secret>) -> Option<Credential> {
    match (login, secret) {
        (Login::Trust, _) => Some(Credential::Trust),
        (Login::Cleartext(password), _) => Some(Credential::Cleartext(password.clone())),
        (Login::Md5, Some(Secret::Md5(stored))) => Some(Credential::Md5(stored.clone())),
        (
            Login::Scram(transcript),
            Some(Secret::Scram {
                stored_key,
                server_key,
            }),
        ) => {
            let client_key = scram::client_key_from(transcript, stored_key)?;
            Some(Credential::Scram(ScramKeys {
                client_key,
                server_key: *server_key,
            }))
        }
        _ => None,
    }
}

/// The answer to AuthenticationMD5Password with `salt`, from the stored hash
/// (`md5` + hex(md5(password + user))): `md5` + hex(md5(hex + salt)).
pub fn md5_answer(stored: &str, salt: &[u8; 4]) -> Zeroizing<String> {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    let mut hasher = Md5::new();
    hasher.update(inner.as_bytes());
    hasher.update(salt);
    let mut answer = Zeroizing::new(String::with_capacity(35));
    answer.push_str("md5");
    push_hex(&mut answer, &hasher.finalize());
    answer
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    use std::fmt::Write;
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_parse_and_other_secrets_do_not() {
        let scram = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
        assert!(matches!(Secret::parse(scram), Some(Secret::Scram { .. })));
        let md5 = "md5a3556571e93b0d20722ba62be61e8c2d";
        assert!(matches!(Secret::parse(md5), Some(Secret::Md5(_))));
        for other in ["pencil", "md5short", "SCRAM-SHA-256$4096:salt$bad", ""] {
            assert_eq!(Secret::parse(other), None, "{other}");
        }
        assert_eq!(
            format!("{:?}", Secret::parse(md5).unwrap()),
            "Secret::Md5(..)"
        );
    }

    #[test]
    fn the_md5_answer_is_libpqs() {
        // libpq: "md5" + md5(md5(password + user) + salt).
        let md5_hex = |parts: &[&[u8]]| {
            let mut h = Md5::new();
            parts.iter().for_each(|p| h.update(p));
            let mut out = "md5".to_string();
            push_hex(&mut out, &h.finalize());
            out
        };
        let user_hash = md5_hex(&[b"secretalice"]);
        let salt = [1, 2, 3, 4];
        let expected = md5_hex(&[&user_hash.as_bytes()[3..], &salt]);
        assert_eq!(*md5_answer(&user_hash, &salt), expected);
    }
}

//! Where role secrets come from: an auth query run on the primary (cached
//! per role, dropped when a re-login with it is refused) or a PgBouncer-style
//! auth file (`"role" "SCRAM-SHA-256$…"` or `"role" "md5…"`, one per line).

use crate::address::BackendAddress;
use std::collections::HashMap;
use std::sync::Mutex;

use super::Secret;
use crate::backend_tls::{BackendTls, ControlLogin};

/// The default auth query; the README shows the safer SECURITY DEFINER
/// function to use instead.
pub const DEFAULT_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("auth_file line {line}: {problem}")]
    File { line: usize, problem: &'static str },
    #[error("auth query on {node} failed: {reason}")]
    Query { node: String, reason: String },
    /// The query failed less than [`RETRY_AFTER`] ago: not run again yet
    /// (every new session of a role would otherwise open a connection to
    /// the primary and log the same failure).
    #[error("auth query failed {seconds} s ago, not retried yet: {reason}")]
    RecentlyFailed { seconds: u64, reason: String },
}

impl StoreError {
    /// Whether this failure was reported already (log it quietly).
    pub fn is_repeat(&self) -> bool {
        matches!(self, StoreError::RecentlyFailed { .. })
    }
}

/// How long a failed auth query is not run again.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// How the auth query connects.
#[derive(Debug, Clone)]
pub struct QuerySettings {
    pub query: String,
    pub user: String,
    pub password: String,
    pub database: String,
}

/// Secrets by role, from a file or an auth query.
pub struct SecretStore {
    source: Source,
    /// Looked-up secrets (`None`: the role has none usable). A std Mutex:
    /// held only to read or insert, never across the query.
    cache: Mutex<HashMap<String, Option<Secret>>>,
    /// The last failed query: when, and why.
    failed: Mutex<Option<(std::time::Instant, String)>>,
}

enum Source {
    File,
    Query(QuerySettings),
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match self.source {
            Source::File => "file",
            Source::Query(_) => "query",
        };
        f.debug_struct("SecretStore")
            .field("source", &source)
            .finish_non_exhaustive()
    }
}

impl SecretStore {
    /// Secrets read once from an auth file's contents.
    pub fn from_file_contents(contents: &str) -> Result<SecretStore, StoreError> {
        let mut cache = HashMap::new();
        for (i, line) in contents.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let problem = |problem| StoreError::File {
                line: i + 1,
                problem,
            };
            let mut fields =
                quoted_fields(line).ok_or_else(|| problem("expected \"role\" \"secret\""))?;
            let (Some(role), Some(secret)) = (fields.next(), fields.next()) else {
                return Err(problem("expected \"role\" \"secret\""));
            };
            let secret = Secret::parse(&secret)
                .ok_or_else(|| problem("the secret is neither SCRAM-SHA-256$… nor md5…"))?;
            cache.insert(role, Some(secret));
        }
        Ok(SecretStore {
            source: Source::File,
            cache: Mutex::new(cache),
            failed: Mutex::default(),
        })
    }

    /// Secrets looked up with an auth query, on demand.
    pub fn from_query(settings: QuerySettings) -> SecretStore {
        SecretStore {
            source: Source::Query(settings),
            cache: Mutex::default(),
            failed: Mutex::default(),
        }
    }

    /// The secret of `role`: cached, else (auth query) asked of the node at
    /// `address` (the primary), reached with `tls`.
    pub async fn lookup(
        &self,
        role: &str,
        node: &str,
        address: &BackendAddress,
        tls: &BackendTls,
    ) -> Result<Option<Secret>, StoreError> {
        if let Some(known) = self.cached(role) {
            return Ok(known);
        }
        let Source::Query(settings) = &self.source else {
            return Ok(None);
        };
        if let Some(e) = self.recent_failure() {
            return Err(e);
        }
        match query(settings, role, address, tls).await {
            Ok(found) => {
                self.lock().insert(role.to_string(), found.clone());
                Ok(found)
            }
            Err(reason) => {
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                *failed = Some((std::time::Instant::now(), reason.clone()));
                let node = node.to_string();
                Err(StoreError::Query { node, reason })
            }
        }
    }

    /// Drops a cached secret (a re-login with it was refused: the password
    /// may have changed). File secrets stay until the next reload.
    pub fn forget(&self, role: &str) {
        if matches!(self.source, Source::Query(_)) {
            self.lock().remove(role);
        }
    }

    /// The last failure, while it is recent enough not to query again.
    fn recent_failure(&self) -> Option<StoreError> {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let (at, reason) = failed.as_ref()?;
        let age = at.elapsed();
        (age < RETRY_AFTER).then(|| StoreError::RecentlyFailed {
            seconds: age.as_secs(),
            reason: reason.clone(),
        })
    }

    /// The secret of `role` if it is known without asking a node: cached,
    /// or (secrets from a file) known to be absent.
    pub fn cached(&self, role: &str) -> Option<Option<Secret>> {
        let cache = self.lock();
        match (&self.source, cache.get(role)) {
            (_, Some(known)) => Some(known.clone()),
            (Source::File, None) => Some(None),
            (Source::Query(_), None) => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Secret>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `"a" "b"` → a, b (PgBouncer's format: `""` inside a field is a quote).
fn quoted_fields(line: &str) -> Option<impl Iterator<Item = String>> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some('"') => {}
            Some(_) => return None,
        }
        let mut field = String::new();
        loop {
            match chars.next()? {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => break,
                c => field.push(c),
            }
        }
        fields.push(field);
    }
    Some(fields.into_iter())
}

/// Runs the auth query for `role` on the node at `address`.
async fn query(
    settings: &QuerySettings,
    role: &str,
    address: &BackendAddress,
    tls: &BackendTls,
) -> Result<Option<Secret>, String> {
    let login = ControlLogin {
        user: &settings.user,
        password: &settings.password,
        database: &settings.database,
        application_name: "pgpivot-auth",
        timeout: std::time::Duration::from_secs(5),
    };
    let client = tls.control_client(address, &login).await?;
    let row = client
        .query_opt(settings.query.as_str(), &[&role])
        .await
        .map_err(|e| match e.as_db_error() {
            // The server's own words ("permission denied for view pg_shadow").
            Some(db) => format!("SQLSTATE {}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        })?;
    let secret: Option<String> = row.and_then(|r| r.get(1));
    Ok(secret.as_deref().and_then(Secret::parse))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_files_parse_as_pgbouncer_writes_them() {
        let contents = "; comment\n\"alice\" \"md5a3556571e93b0d20722ba62be61e8c2d\"\n\n\"bo\"\"b\" \"SCRAM-SHA-256$4096:c2FsdA==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=\"\n";
        let store = SecretStore::from_file_contents(contents).unwrap();
        assert!(matches!(store.cached("alice"), Some(Some(Secret::Md5(_)))));
        assert!(matches!(
            store.cached("bo\"b"),
            Some(Some(Secret::Scram { .. }))
        ));
        assert!(matches!(store.cached("carol"), Some(None)));
        for bad in [
            "alice md5x",
            "\"alice\"",
            "\"alice\" \"plaintext\"",
            "\"unterminated",
        ] {
            let err = SecretStore::from_file_contents(bad).expect_err(bad);
            assert!(err.to_string().starts_with("auth_file line 1:"), "{err}");
        }
    }
}

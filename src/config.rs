//! Configuration: the file format, its layering and its validation.
//!
//! figment layers built-in defaults < a TOML file < environment variables
//! (`PGPIVOT_` prefix, `__` between nesting levels, e.g.
//! `PGPIVOT_MONITOR__PASSWORD`). The result deserializes into [`FileConfig`]
//! (the format, every key documented in `config/pgpivot.toml`) and is then
//! validated into [`Settings`] (typed runtime values: `SocketAddr`,
//! `Duration`, a loaded TLS config). A bad config becomes one [`ConfigError`]
//! that names the key and the problem.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::address::{AddressError, BackendAddress};
use crate::backend_tls::{BackendTls, SslMode};
use crate::credentials::store::{QuerySettings, SecretStore, DEFAULT_QUERY};
use crate::routing::{LagBudget, Target};

/// A configuration problem: the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("config error: {key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.to_string(),
        }
    }
}

/// The configuration as written: every field optional where a default exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Client-facing listeners; each has a default target.
    pub listeners: Vec<ListenerConfig>,
    /// The PostgreSQL servers pgpivot may route to. Required.
    pub nodes: Vec<NodeConfig>,
    pub monitor: MonitorConfig,
    pub failover: FailoverConfig,
    /// Where the secrets come from that let pgpivot log a moved session in
    /// again as its role (`[failover] move_sessions`).
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    /// TLS for client connections; absent means plaintext only.
    pub tls: Option<TlsConfig>,
    /// TLS to the nodes (sessions and monitor): the default for every node,
    /// which `[[nodes]]` may override key by key.
    pub backend_tls: BackendTlsConfig,
    /// The admin HTTP endpoint; absent means off.
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub runtime: RuntimeConfig,
    /// On SIGTERM/SIGINT, how long sessions get to reach an idle point
    /// before the process exits anyway, in milliseconds.
    pub shutdown_timeout_ms: u64,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listeners: vec![ListenerConfig::new("127.0.0.1:6432", Target::ReadWrite)],
            nodes: Vec::new(),
            monitor: MonitorConfig::default(),
            failover: FailoverConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            tls: None,
            backend_tls: BackendTlsConfig::default(),
            admin: None,
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            runtime: RuntimeConfig::default(),
            shutdown_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port` to accept clients on.
    pub address: String,
    /// Default `target_session_attrs` for sessions on this listener.
    #[serde(default)]
    pub target: Target,
    /// Standbys further behind the primary than this many bytes of WAL get
    /// no new sessions from this listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_bytes: Option<u64>,
    /// Standbys further behind than this (milliseconds, on pgpivot's clock)
    /// get no new sessions from this listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_ms: Option<u64>,
    /// Cap on concurrent client sessions on this listener (default: the
    /// global `limits.max_client_connections`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// The loosest byte budget a session may ask for with
    /// `-c pgpivot.max_lag_bytes=...` (default: no ceiling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_max_lag_bytes: Option<u64>,
    /// The loosest time budget (ms) a session may ask for with
    /// `-c pgpivot.max_lag_ms=...` (default: no ceiling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_max_lag_ms: Option<u64>,
    /// What happens to sessions on a standby that falls behind the budget:
    /// `stay` (default: no new sessions go there, running ones continue) or
    /// `disconnect` (they end at their next idle point with 57P01).
    #[serde(default)]
    pub on_lag: OnLag,
}

impl ListenerConfig {
    /// A listener on `address` with default target `target` and no budgets.
    pub fn new(address: impl Into<String>, target: Target) -> Self {
        ListenerConfig {
            address: address.into(),
            target,
            max_lag_bytes: None,
            max_lag_ms: None,
            max_connections: None,
            session_max_lag_bytes: None,
            session_max_lag_ms: None,
            on_lag: OnLag::Stay,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLag {
    #[default]
    Stay,
    Disconnect,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// A short unique name used in logs, metrics and errors.
    pub name: String,
    /// `host:port` of the server, or a Unix socket as libpq takes it: the
    /// socket file (`/var/run/postgresql/.s.PGSQL.5432`) or its directory
    /// (`/var/run/postgresql`, with `port`). Anything starting with `/` is a
    /// socket.
    pub address: String,
    /// The port of a socket directory address (default 5432): the socket is
    /// `<address>/.s.PGSQL.<port>`. Not for `host:port` or a socket file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u64>,
    /// Relative share of read sessions (0 = never chosen for reads unless it
    /// is the primary).
    #[serde(default = "one")]
    pub weight: u32,
    /// This node's `sslmode`, when not `[backend_tls] sslmode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// This node's CA file, when not `[backend_tls] sslrootcert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
}

impl NodeConfig {
    /// A node at `address` with the defaults for everything else.
    pub fn new(name: &str, address: &str) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            address: address.into(),
            port: None,
            weight: 1,
            sslmode: None,
            sslrootcert: None,
        }
    }
}

/// TLS to the nodes, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTlsConfig {
    /// disable | prefer | require | verify-ca | verify-full (default prefer).
    pub sslmode: SslMode,
    /// PEM file with the CA certificate(s) that sign the servers'
    /// certificates; needed by verify-ca and verify-full, and makes
    /// `require` check the chain, as in libpq.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Role the monitor logs in as (needs `pg_monitor` or superuser).
    pub user: String,
    /// Its password; prefer `PGPIVOT_MONITOR__PASSWORD` to writing it here.
    pub password: String,
    pub database: String,
    /// Time between polls of each node, in milliseconds.
    pub interval_ms: u64,
    /// Connect and statement timeout of a poll, in milliseconds.
    pub timeout_ms: u64,
    /// Consecutive failed polls before a node counts as down.
    pub failures: u32,
    /// Consecutive good polls before a down node counts as up again.
    pub successes: u32,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            user: "postgres".into(),
            password: String::new(),
            database: "postgres".into(),
            interval_ms: 250,
            timeout_ms: 1000,
            failures: 2,
            successes: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// How long a new session waits for an eligible node before 57P03, in
    /// milliseconds.
    pub hold_timeout_ms: u64,
    /// Move open sessions to the new node at a failover or switchover
    /// (with their settings, prepared statements and LISTENs) instead of
    /// ending them. Needs secrets from `[auth]`.
    pub move_sessions: bool,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            hold_timeout_ms: 30_000,
            move_sessions: true,
        }
    }
}

/// The role secrets a moved session logs in again with: an auth query run
/// on the primary, or a PgBouncer-style auth file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Returns `(usename, passwd)` for the role in `$1`. Default:
    /// `SELECT usename, passwd FROM pg_shadow WHERE usename = $1`.
    pub query: Option<String>,
    /// Who runs the query; each defaults to the `[monitor]` one.
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: Option<String>,
    /// A PgBouncer-style auth file (`"role" "SCRAM-SHA-256$…"` or
    /// `"role" "md5…"`), used instead of the query.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent client sessions over all listeners; more get 53300.
    pub max_client_connections: usize,
    /// A client must finish its startup packet(s) within this many ms.
    pub startup_timeout_ms: u64,
    /// Timeout for the connect to a backend (TCP or its Unix socket), in
    /// milliseconds.
    pub connect_timeout_ms: u64,
    /// Largest message a client may send, in bytes (PostgreSQL's own limit
    /// is 1 GiB).
    pub max_message_bytes: usize,
    /// TCP keepalive on client and backend TCP sockets: seconds of silence
    /// before the first probe (0 = off). Frees sessions whose peer vanished
    /// behind a network partition; TCP_USER_TIMEOUT is set to the same
    /// total (idle + 4 probes), for a peer that vanished with data in flight.
    pub tcp_keepalive_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_client_connections: 10_000,
            startup_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            max_message_bytes: 0x3fff_ffff,
            tcp_keepalive_s: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// `disable`, `prefer` (TLS when the client asks) or `require`.
    #[serde(default)]
    pub mode: TlsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` of the admin HTTP endpoint (/metrics, /status, /health,
    /// /ready, POST /pause, /resume, /reload).
    pub address: String,
    /// Bearer token required on every request; mandatory when `address` is
    /// not a loopback address. Prefer `PGPIVOT_ADMIN__TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Time every round trip (client request → ReadyForQuery) per node and
    /// count relayed bytes. Costs a clock read and a histogram update per
    /// round trip; `false` leaves only session-level counters.
    pub relay_timing: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { relay_timing: true }
    }
}

/// How the proxy lays out its threads (`[runtime]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// `per-core`: `workers` threads, each running its own single-threaded
    /// runtime; every session lives on one of them for its whole life (both
    /// relay directions on one thread), and the control
    /// path (monitors, decider, admin, reloads, accept loops) has a thread
    /// of its own. `multi-thread`: one work-stealing tokio runtime of
    /// `workers` threads runs everything.
    pub flavor: RuntimeFlavor,
    /// Worker threads; 0 (the default) = the cores available to the process.
    pub workers: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            flavor: RuntimeFlavor::PerCore,
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeFlavor {
    PerCore,
    MultiThread,
}

/// `[runtime]`, validated: the worker count resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeSettings {
    pub flavor: RuntimeFlavor,
    /// At least 1.
    pub workers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A RUST_LOG-style filter; the RUST_LOG variable overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated runtime settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listeners: Vec<ListenerSettings>,
    pub nodes: Vec<NodeSettings>,
    pub monitor: MonitorSettings,
    pub hold_timeout: Duration,
    /// Where moved sessions get their credentials; `None` when
    /// `move_sessions = false` (sessions are ended at a failover).
    pub secrets: Option<Arc<SecretStore>>,
    pub max_client_connections: usize,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
    /// `None`: keepalive off.
    pub tcp_keepalive: Option<Duration>,
    pub tls: Option<TlsSettings>,
    pub admin: Option<AdminSettings>,
    pub log: LogConfig,
    pub relay_timing: bool,
    pub runtime: RuntimeSettings,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub address: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub address: SocketAddr,
    pub target: Target,
    pub budget: LagBudget,
    /// The loosest budget a session may ask for.
    pub ceiling: LagBudget,
    pub max_connections: usize,
    pub on_lag: OnLag,
}

/// The settings in force, swapped whole by a reload. A session loads one
/// snapshot and uses it throughout, so it never mixes two configs.
#[derive(Clone)]
pub struct SettingsHandle(Arc<arc_swap::ArcSwap<Settings>>);

impl SettingsHandle {
    pub fn new(settings: Settings) -> SettingsHandle {
        SettingsHandle(Arc::new(arc_swap::ArcSwap::from_pointee(settings)))
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Settings> {
        self.0.load_full()
    }

    pub fn store(&self, settings: Settings) {
        self.0.store(Arc::new(settings));
    }
}

impl Settings {
    /// The configured node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSettings> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    /// `host:port` (a host name is resolved at each connect) or a socket.
    pub address: BackendAddress,
    pub weight: u32,
    /// How sessions and the monitor reach this node.
    pub tls: Arc<BackendTls>,
}

#[derive(Debug, Clone)]
pub struct MonitorSettings {
    pub user: String,
    pub password: String,
    pub database: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub failures: u32,
    pub successes: u32,
}

#[derive(Clone)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mode", &self.mode)
            .finish()
    }
}

/// Loads defaults < `path` < environment into a [`FileConfig`].
pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(FileConfig::default()));
    if let Some(path) = path {
        if !path.exists() {
            return Err(ConfigError::new(
                "--config",
                format!("{} not found", path.display()),
            ));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment
        .merge(Env::prefixed("PGPIVOT_").split("__"))
        .extract()
        .map_err(figment_error)
}

fn figment_error(e: figment::Error) -> ConfigError {
    let key = if e.path.is_empty() {
        "config".to_string()
    } else {
        e.path
            .iter()
            .map(|p| key_part(p))
            .collect::<Vec<_>>()
            .join(".")
    };
    ConfigError::new(key, e.kind)
}

/// A key as TOML would write it: bare when it can be, quoted otherwise (an
/// empty key, or one with dots or spaces, would make the name unreadable).
fn key_part(part: &str) -> std::borrow::Cow<'_, str> {
    let bare = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !part.is_empty() && part.chars().all(bare) {
        part.into()
    } else {
        format!("{part:?}").into()
    }
}

impl FileConfig {
    /// Parses TOML text (no environment), for tests and `--check-config`.
    pub fn from_toml(text: &str) -> Result<FileConfig, ConfigError> {
        Figment::from(Serialized::defaults(FileConfig::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(figment_error)
    }

    /// The effective config as TOML, with the monitor password masked.
    pub fn to_toml_masked(&self) -> String {
        let mut shown = self.clone();
        if !shown.monitor.password.is_empty() {
            shown.monitor.password = "********".into();
        }
        if shown.auth.password.is_some() {
            shown.auth.password = Some("********".into());
        }
        if let Some(admin) = shown.admin.as_mut() {
            if admin.token.is_some() {
                admin.token = Some("********".into());
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print: {e}"))
    }

    /// Checks every key and builds the runtime settings.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let limits = &self.limits;
        Ok(Settings {
            listeners: self.validate_listeners()?,
            nodes: self.validate_nodes()?,
            monitor: self.validate_monitor()?,
            hold_timeout: Duration::from_millis(self.failover.hold_timeout_ms),
            secrets: self.validate_auth()?,
            max_client_connections: positive(
                "limits.max_client_connections",
                limits.max_client_connections,
            )?,
            startup_timeout: millis("limits.startup_timeout_ms", limits.startup_timeout_ms)?,
            connect_timeout: millis("limits.connect_timeout_ms", limits.connect_timeout_ms)?,
            max_message_bytes: positive("limits.max_message_bytes", limits.max_message_bytes)?,
            tcp_keepalive: (limits.tcp_keepalive_s > 0)
                .then(|| Duration::from_secs(limits.tcp_keepalive_s)),
            tls: self.tls.as_ref().map(validate_tls).transpose()?,
            admin: self.admin.as_ref().map(validate_admin).transpose()?,
            log: self.validate_log()?,
            relay_timing: self.metrics.relay_timing,
            runtime: self.validate_runtime()?,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
        })
    }

    fn validate_listeners(&self) -> Result<Vec<ListenerSettings>, ConfigError> {
        if self.listeners.is_empty() {
            return Err(ConfigError::new(
                "listeners",
                "at least one listener is required",
            ));
        }
        let mut seen = Vec::new();
        self.listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let key = format!("listeners[{i}]");
                let address = socket_addr(&format!("{key}.address"), &l.address)?;
                if address.port() != 0 && seen.contains(&address) {
                    return Err(ConfigError::new(
                        format!("{key}.address"),
                        "used by two listeners",
                    ));
                }
                seen.push(address);
                Ok(ListenerSettings {
                    address,
                    target: l.target,
                    budget: LagBudget {
                        max_bytes: l.max_lag_bytes,
                        max_lag: l.max_lag_ms.map(Duration::from_millis),
                    },
                    ceiling: LagBudget {
                        max_bytes: l.session_max_lag_bytes,
                        max_lag: l.session_max_lag_ms.map(Duration::from_millis),
                    },
                    max_connections: l
                        .max_connections
                        .unwrap_or(self.limits.max_client_connections),
                    on_lag: l.on_lag,
                })
            })
            .collect()
    }

    fn validate_nodes(&self) -> Result<Vec<NodeSettings>, ConfigError> {
        if self.nodes.is_empty() {
            return Err(ConfigError::new("nodes", "at least one node is required"));
        }
        let mut names: Vec<&str> = Vec::new();
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let key = format!("nodes[{i}]");
                if n.name.is_empty() || names.contains(&n.name.as_str()) {
                    return Err(ConfigError::new(
                        format!("{key}.name"),
                        "must be non-empty and unique",
                    ));
                }
                names.push(&n.name);
                let address = BackendAddress::parse(&n.address, n.port).map_err(|e| match e {
                    AddressError::Address(problem) => {
                        ConfigError::new(format!("{key}.address"), problem)
                    }
                    AddressError::Port(problem) => ConfigError::new(format!("{key}.port"), problem),
                })?;
                let mode = n.sslmode.unwrap_or(self.backend_tls.sslmode);
                if address.is_unix() {
                    // PostgreSQL has no TLS on local sockets.
                    if mode.needs_tls() {
                        return Err(ConfigError::new(
                            format!("{key}.sslmode"),
                            format!("{mode} on a Unix socket: PostgreSQL has no TLS there (use disable or prefer)"),
                        ));
                    }
                    return Ok(NodeSettings {
                        name: n.name.clone(),
                        address,
                        weight: n.weight,
                        tls: Arc::new(BackendTls::disabled()),
                    });
                }
                let (root, root_key) = match &n.sslrootcert {
                    Some(path) => (Some(path), format!("{key}.sslrootcert")),
                    None => (
                        self.backend_tls.sslrootcert.as_ref(),
                        "backend_tls.sslrootcert".to_string(),
                    ),
                };
                let tls = BackendTls::new(mode, root.map(PathBuf::as_path))
                    .map_err(|e| ConfigError::new(root_key, e.to_string()))?;
                Ok(NodeSettings {
                    name: n.name.clone(),
                    address,
                    weight: n.weight,
                    tls: Arc::new(tls),
                })
            })
            .collect()
    }

    fn validate_monitor(&self) -> Result<MonitorSettings, ConfigError> {
        let m = &self.monitor;
        if m.user.is_empty() {
            return Err(ConfigError::new("monitor.user", "must not be empty"));
        }
        let interval = millis("monitor.interval_ms", m.interval_ms)?;
        let timeout = millis("monitor.timeout_ms", m.timeout_ms)?;
        Ok(MonitorSettings {
            user: m.user.clone(),
            password: m.password.clone(),
            database: m.database.clone(),
            interval,
            timeout,
            failures: positive("monitor.failures", m.failures as usize)? as u32,
            successes: positive("monitor.successes", m.successes as usize)? as u32,
        })
    }

    fn validate_auth(&self) -> Result<Option<Arc<SecretStore>>, ConfigError> {
        let a = &self.auth;
        if !self.failover.move_sessions {
            return Ok(None);
        }
        if let Some(path) = &a.file {
            let contents = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new("auth.file", format!("{}: {e}", path.display())))?;
            let store = SecretStore::from_file_contents(&contents)
                .map_err(|e| ConfigError::new("auth.file", e))?;
            return Ok(Some(Arc::new(store)));
        }
        let m = &self.monitor;
        let query = a.query.clone().unwrap_or_else(|| DEFAULT_QUERY.to_string());
        if !query.contains("$1") {
            return Err(ConfigError::new(
                "auth.query",
                "must take the role name as $1",
            ));
        }
        Ok(Some(Arc::new(SecretStore::from_query(QuerySettings {
            query,
            user: a.user.clone().unwrap_or_else(|| m.user.clone()),
            password: a.password.clone().unwrap_or_else(|| m.password.clone()),
            database: a.database.clone().unwrap_or_else(|| m.database.clone()),
        }))))
    }

    fn validate_runtime(&self) -> Result<RuntimeSettings, ConfigError> {
        let workers = match self.runtime.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n if n > MAX_WORKERS => {
                return Err(ConfigError::new(
                    "runtime.workers",
                    format!("at most {MAX_WORKERS}"),
                ))
            }
            n => n,
        };
        Ok(RuntimeSettings {
            flavor: self.runtime.flavor,
            workers,
        })
    }

    fn validate_log(&self) -> Result<LogConfig, ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| ConfigError::new("log.filter", e))?;
        Ok(self.log.clone())
    }
}

/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

fn validate_tls(tls: &TlsConfig) -> Result<TlsSettings, ConfigError> {
    let server = crate::tls::server_config(&tls.cert, &tls.key).map_err(|e| {
        let key = match e {
            crate::tls::TlsError::Key { .. } => "tls.key",
            _ => "tls.cert",
        };
        ConfigError::new(key, e)
    })?;
    Ok(TlsSettings {
        mode: tls.mode,
        server,
    })
}

fn validate_admin(admin: &AdminConfig) -> Result<AdminSettings, ConfigError> {
    let address = socket_addr("admin.address", &admin.address)?;
    let token = admin.token.clone().filter(|t| !t.is_empty());
    if !address.ip().is_loopback() && token.is_none() {
        return Err(ConfigError::new(
            "admin.token",
            format!("required when admin.address ({address}) is not a loopback address"),
        ));
    }
    Ok(AdminSettings { address, token })
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::new(key, format!("{value:?} is not an ip:port address")))
}

/// Splits `host:port` (IPv6 hosts in brackets). Host names are not
/// resolved here: that happens at each connect, so a name that does not
/// resolve at start-up (or at a reload) neither blocks nor stops the proxy.
pub fn split_host_port(value: &str) -> Option<(&str, u16)> {
    let (host, port) = value.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some((host, port.parse().ok()?))
}

fn millis(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    positive(key, ms as usize).map(|_| Duration::from_millis(ms))
}

fn positive(key: &str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[nodes]]
        name = "pg1"
        address = "127.0.0.1:5432"
    "#;

    fn check(text: &str) -> Result<Settings, ConfigError> {
        FileConfig::from_toml(text)?.validate()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let s = check(MINIMAL).unwrap();
        assert_eq!(s.listeners.len(), 1);
        assert_eq!(s.listeners[0].target, Target::ReadWrite);
        assert_eq!(s.monitor.interval, Duration::from_millis(250));
        assert_eq!(s.hold_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_design_contract_parses() {
        let text = include_str!("../config/pgpivot.toml");
        let file = FileConfig::from_toml(text).unwrap();
        assert_eq!(file.listeners.len(), 2);
        assert_eq!(file.nodes.len(), 3);
        assert_eq!(file.listeners[1].target, Target::PreferStandby);
    }

    #[test]
    fn unix_socket_nodes() {
        let s = check(
            "[[nodes]]\nname='a'\naddress='/run/pg/.s.PGSQL.5433'\n\
             [[nodes]]\nname='b'\naddress='/run/pg'\nport=6000\n\
             [[nodes]]\nname='c'\naddress='/run/pg'\nsslmode='prefer'\n\
             [[nodes]]\nname='d'\naddress='127.0.0.1:5432'",
        )
        .unwrap();
        let unix = |dir: &str, port| BackendAddress::Unix {
            dir: dir.into(),
            port,
        };
        assert_eq!(s.nodes[0].address, unix("/run/pg", 5433));
        assert_eq!(s.nodes[1].address, unix("/run/pg", 6000));
        assert_eq!(s.nodes[2].address, unix("/run/pg", 5432));
        // prefer means plaintext on a socket: no SSLRequest is sent.
        assert_eq!(s.nodes[2].tls.mode, SslMode::Disable);
        assert_eq!(
            s.nodes[3].address,
            BackendAddress::Tcp("127.0.0.1:5432".into())
        );
        assert_eq!(s.nodes[3].tls.mode, SslMode::Prefer);
    }

    #[test]
    fn unix_socket_errors_name_the_key() {
        let node = "[[nodes]]\nname='a'\n";
        for (extra, key) in [
            ("address='/run/pg'\nsslmode='require'", "nodes[0].sslmode"),
            (
                "address='/run/pg'\nsslmode='verify-full'",
                "nodes[0].sslmode",
            ),
            ("address='/run/pg'\nport=0", "nodes[0].port"),
            ("address='/run/pg'\nport=70000", "nodes[0].port"),
            (
                "address='/run/pg/.s.PGSQL.5432'\nport=5432",
                "nodes[0].port",
            ),
            ("address='127.0.0.1:5432'\nport=5432", "nodes[0].port"),
            ("address='/run/pg/.s.PGSQL.abc'", "nodes[0].address"),
        ] {
            let e = check(&format!("{node}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
        }
        let e = check(&format!(
            "[backend_tls]\nsslmode='verify-ca'\nsslrootcert='/x.pem'\n{node}address='/run/pg'"
        ))
        .unwrap_err();
        assert_eq!(e.key, "nodes[0].sslmode", "the default applies too: {e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = check(&format!("{MINIMAL}\n[monitor]\nintervall_ms = 5")).unwrap_err();
        assert_eq!(e.key, "monitor.intervall_ms", "{e}");
        assert!(e.problem.contains("intervall_ms"), "{e}");
        let e = check("[[nodes]]\nname='a'\naddress='nope'").unwrap_err();
        assert_eq!(e.key, "nodes[0].address", "{e}");
        let e = check("").unwrap_err();
        assert_eq!(e.key, "nodes");
        let e = check(&format!("{MINIMAL}\n[[listeners]]\naddress='1.2.3.4'")).unwrap_err();
        assert_eq!(e.key, "listeners[0].address", "{e}");
        let e = check(&format!(
            "{MINIMAL}\n[[listeners]]\naddress='127.0.0.1:1'\ntarget='leader'"
        ))
        .unwrap_err();
        assert!(e.key.starts_with("listeners"), "{e}");
        let e = check(&format!("{MINIMAL}\n[admin]\naddress='0.0.0.0:9187'")).unwrap_err();
        assert_eq!(e.key, "admin.token", "{e}");
        let e = check(&format!(
            "{MINIMAL}\n[tls]\ncert='/nonexistent.crt'\nkey='/x.key'"
        ))
        .unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn runtime_workers_default_to_the_cores() {
        let s = check(MINIMAL).unwrap();
        assert_eq!(s.runtime.flavor, RuntimeFlavor::PerCore);
        assert!(s.runtime.workers >= 1);
        let s = check(&format!(
            "{MINIMAL}\n[runtime]\nflavor = 'multi-thread'\nworkers = 3"
        ))
        .unwrap();
        assert_eq!(s.runtime.flavor, RuntimeFlavor::MultiThread);
        assert_eq!(s.runtime.workers, 3);
        let e = check(&format!("{MINIMAL}\n[runtime]\nworkers = 100000")).unwrap_err();
        assert_eq!(e.key, "runtime.workers", "{e}");
        let e = check(&format!("{MINIMAL}\n[runtime]\nflavor = 'one'")).unwrap_err();
        assert_eq!(e.key, "runtime.flavor", "{e}");
    }

    #[test]
    fn odd_unknown_keys_are_quoted() {
        // Found by fuzzing: `''=''` gave an error naming the key "".
        let e = check("''=''").unwrap_err();
        assert_eq!(e.key, r#""""#, "{e}");
        let e = check(&format!("{MINIMAL}\n[monitor]\n'a.b c' = 1")).unwrap_err();
        assert_eq!(e.key, r#"monitor."a.b c""#, "{e}");
    }
}

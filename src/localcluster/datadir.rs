//! Building and configuring the nodes' data directories: `initdb` and the
//! test roles for the first primary, `pg_basebackup` clones, `pg_rewind`
//! (and re-cloning when it fails), and the files that make a node itself —
//! `postgresql.conf` (shared settings plus a per-node tail), `pg_hba.conf`,
//! `standby.signal` and `primary_conninfo`.

use std::fs;

use super::error::{io_err, read_file};
use super::exec::run;
use super::{
    ClusterError, LocalCluster, LocalNode, ServerCert, APP_USER, CLEARTEXT_USER, MD5_USER,
    PASSWORD, SUPERUSER,
};

/// Everything above this line of `postgresql.conf` is shared by all nodes;
/// everything below it belongs to one node. Clones (`pg_basebackup`, `pg_rewind`)
/// copy the source's file, so the part below is rewritten after each clone.
const NODE_CONF_MARKER: &str = "# --- pgpivot localcluster: per-node settings ---";

/// Settings shared by every node; written to the primary before any standby
/// is cloned from it. `wal_log_hints` is what makes `pg_rewind` possible.
const COMMON_CONF: &str = "
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_log_hints = on
full_page_writes = on
fsync = off
max_connections = 200
shared_buffers = 64MB
logging_collector = off
log_min_messages = warning
";

/// Replaces the `pg_hba.conf` written by initdb. Over the Unix socket the
/// roles log in as over TCP (with a password), so a proxy on a socket is
/// tested with real authentication.
const PG_HBA_CONF: &str = "\
local all md5user md5
local all pwuser password
local all all scram-sha-256
host all md5user 127.0.0.1/32 md5
host all pwuser 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
";

impl LocalCluster {
    /// initdb + configuration + start + roles for node 0.
    pub(super) fn init_primary(
        &mut self,
        extra_conf: &[String],
        tls: Option<&ServerCert>,
    ) -> Result<(), ClusterError> {
        let i = self.push_node();
        let data_dir = self.nodes[i].data_dir.clone();
        let pwfile = self.root.join("pwfile");
        self.write_owned(&pwfile, PASSWORD)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--no-locale"])
            // Small WAL segments keep clones and the directory small (about
            // 25 MB a node instead of 80); --no-sync because nothing here
            // needs to survive a power cut, and fsyncs dominate start time
            // on a busy disk.
            .args(["--wal-segsize=1", "--no-sync"]);
        run(&mut initdb)?;
        fs::remove_file(&pwfile).map_err(io_err("cannot remove the password file"))?;

        let mut conf = read_file(&data_dir.join("postgresql.conf"))?;
        conf.push_str(COMMON_CONF);
        // One socket directory for the whole cluster: each node's socket is
        // named after its port.
        let sockets = self.socket_dir();
        fs::create_dir(&sockets).map_err(io_err("cannot create the socket directory"))?;
        self.give_to_owner(&sockets)?;
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            sockets.display()
        ));
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        if let Some(tls) = tls {
            // In the data directory, so the standbys' base backups copy it.
            self.write_owned(&data_dir.join("server.crt"), &tls.cert_pem)?;
            let key = data_dir.join("server.key");
            self.write_owned(&key, &tls.key_pem)?;
            // PostgreSQL refuses a key that others may read.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
                .map_err(io_err("cannot restrict server.key"))?;
            conf.push_str("ssl = on\n");
        }
        self.write_owned(&data_dir.join("postgresql.conf"), &conf)?;
        self.write_owned(&data_dir.join("pg_hba.conf"), PG_HBA_CONF)?;
        self.configure_node(i, None)?;
        self.start_node(i)?;
        self.create_roles(i)
    }

    /// Creates the roles [`MD5_USER`], [`CLEARTEXT_USER`] and [`APP_USER`]
    /// (password [`PASSWORD`]) on node `i`, the new primary.
    fn create_roles(&self, i: usize) -> Result<(), ClusterError> {
        let sql = format!(
            "SET password_encryption = 'md5';
             CREATE ROLE {MD5_USER} LOGIN PASSWORD '{PASSWORD}';
             RESET password_encryption;
             CREATE ROLE {CLEARTEXT_USER} LOGIN PASSWORD '{PASSWORD}';
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{PASSWORD}';
             GRANT ALL ON SCHEMA public TO PUBLIC;"
        );
        self.psql(i, &sql).map(drop)
    }

    /// Clones node `source` into node `i`'s (absent) data directory.
    pub(super) fn base_backup(&self, i: usize, source: usize) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_basebackup");
        cmd.args(["-h", "127.0.0.1", "-p", &self.node(source).port.to_string()])
            .args(["-U", SUPERUSER, "-w", "-D"])
            .arg(&self.node(i).data_dir)
            .args(["-R", "-X", "stream", "-c", "fast"])
            // Throwaway clones: skip fsyncs and the checksummed manifest.
            .args(["--no-sync", "--no-manifest"])
            .env("PGPASSWORD", PASSWORD);
        run(&mut cmd).map(drop)
    }

    /// Rewinds stopped node `i` onto node `source`'s timeline. `pg_rewind`
    /// crash-recovers a target that was not shut down cleanly by itself.
    pub(super) fn rewind(&self, i: usize, source: usize) -> Result<(), ClusterError> {
        // A just-promoted source finishes its end-of-recovery checkpoint in
        // the background; until then its pg_control still names the old
        // timeline and pg_rewind (before PG 16) wrongly concludes "no rewind
        // required", leaving a target that can never follow the source.
        self.psql(source, "CHECKPOINT")?;
        let mut cmd = self.command("pg_rewind");
        cmd.arg("--no-sync")
            .arg("--target-pgdata")
            .arg(&self.node(i).data_dir)
            .arg(format!(
                "--source-server=host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
                self.node(source).port
            ))
            .env("PGPASSWORD", PASSWORD);
        run(&mut cmd).map(drop)
    }

    /// Throws node `i`'s data away and clones it again from `source`.
    pub(super) fn reclone(&self, i: usize, source: usize) -> Result<(), ClusterError> {
        let data_dir = &self.node(i).data_dir;
        if data_dir.exists() {
            fs::remove_dir_all(data_dir)
                .map_err(io_err(format!("cannot remove {}", data_dir.display())))?;
        }
        self.base_backup(i, source)
    }

    /// Writes node `i`'s own settings after its data directory was created
    /// or cloned (clones carry the source's port and `primary_conninfo`):
    /// its port and name, and either "standby of `upstream`" or "primary".
    pub(super) fn configure_node(
        &self,
        i: usize,
        upstream: Option<usize>,
    ) -> Result<(), ClusterError> {
        let node = self.node(i);
        let conf_path = node.data_dir.join("postgresql.conf");
        let conf = read_file(&conf_path)?;
        let shared = conf.split(NODE_CONF_MARKER).next().unwrap_or_default();
        let conf = format!(
            "{}\n{NODE_CONF_MARKER}\nport = {}\ncluster_name = '{}'\n",
            shared.trim_end(),
            node.port,
            node.name
        );
        self.write_owned(&conf_path, &conf)?;
        self.write_recovery_settings(node, upstream)
    }

    /// Sets (or, for a primary, removes) `standby.signal` and our own
    /// `primary_conninfo`, which names the standby so `pg_stat_replication`
    /// on the upstream can be matched to it. It lives in
    /// `postgresql.auto.conf`, where `pg_basebackup -R` puts it too.
    fn write_recovery_settings(
        &self,
        node: &LocalNode,
        upstream: Option<usize>,
    ) -> Result<(), ClusterError> {
        let auto_path = node.data_dir.join("postgresql.auto.conf");
        let mut lines: Vec<String> = read_file(&auto_path)?
            .lines()
            .filter(|line| !line.trim_start().starts_with("primary_conninfo"))
            .map(str::to_owned)
            .collect();
        let signal = node.data_dir.join("standby.signal");
        match upstream {
            Some(p) => {
                lines.push(format!(
                    "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} \
                     password={PASSWORD} application_name={}'",
                    self.node(p).port,
                    node.name
                ));
                self.write_owned(&signal, "")?;
            }
            None if signal.exists() => {
                fs::remove_file(&signal).map_err(io_err("cannot remove standby.signal"))?;
            }
            None => {}
        }
        let auto = lines.join("\n") + "\n";
        self.write_owned(&auto_path, &auto)
    }
}

//! Logging in again as a client's role on another node, without its
//! password: the first login is a real one (tokio-postgres against the
//! primary, relayed by pgpivot's authentication stage), the role's secret
//! comes from the documented SECURITY DEFINER auth query, and the kept
//! credential must log in to a standby as that role. This is the first step
//! of moving sessions at a failover; sessions do not move yet.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use pgpivot::backend_tls::BackendTls;
use pgpivot::cancel::CancelRegistry;
use pgpivot::credentials::relogin::{login, ReloginError};
use pgpivot::credentials::store::{QuerySettings, SecretStore};
use pgpivot::credentials::{credential_for, Credential, Login, Secret};
use pgpivot::localcluster::{LocalCluster, CLEARTEXT_USER, MD5_USER, PASSWORD, SUPERUSER};
use pgpivot::protocol::frame::fill_message;
use pgpivot::protocol::messages::TxStatus;
use pgpivot::protocol::startup::{read_packet, StartupMessage, StartupPacket};
use pgpivot::session::auth::{authenticate, AuthContext};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::*;

/// The cluster, with the auth-query role and function the README documents.
fn cluster() -> &'static LocalCluster {
    static READY: OnceLock<()> = OnceLock::new();
    let cluster = shared_cluster();
    READY.get_or_init(|| {
        let setup = format!(
            "CREATE ROLE pgpivot_auth LOGIN PASSWORD '{PASSWORD}';
             CREATE SCHEMA pgpivot;
             CREATE FUNCTION pgpivot.lookup(u text, OUT usename text, OUT passwd text) RETURNS record
               LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
               $$ SELECT rolname::text, rolpassword::text FROM pg_authid WHERE rolname = u AND rolcanlogin $$;
             REVOKE ALL ON FUNCTION pgpivot.lookup(text) FROM public;
             GRANT USAGE ON SCHEMA pgpivot TO pgpivot_auth;
             GRANT EXECUTE ON FUNCTION pgpivot.lookup(text) TO pgpivot_auth;"
        );
        cluster.psql(0, &setup).expect("auth query setup");
        wait_replayed(cluster);
    });
    cluster
}

/// Waits until the standby has the setup (replication is asynchronous).
fn wait_replayed(cluster: &LocalCluster) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster
        .psql(
            1,
            "SELECT count(*) FROM pg_roles WHERE rolname = 'pgpivot_auth'",
        )
        .ok()
        .as_deref()
        != Some("1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby never replayed the setup"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn store() -> SecretStore {
    SecretStore::from_query(QuerySettings {
        query: "SELECT usename, passwd FROM pgpivot.lookup($1)".into(),
        user: "pgpivot_auth".into(),
        password: PASSWORD.into(),
        database: "postgres".into(),
    })
}

/// A real login of `user` to node 0, relayed by pgpivot's authentication
/// stage, and the credential pgpivot keeps from it.
async fn first_login(cluster: &LocalCluster, user: &str) -> Option<Credential> {
    let login = relayed_login(cluster, user).await;
    credential_for(&login, secret_of(cluster, user).await.as_ref())
}

/// The role's secret, as the auth query returns it now.
async fn secret_of(cluster: &LocalCluster, user: &str) -> Option<Secret> {
    let node = pgpivot::address::BackendAddress::Tcp(cluster.node(0).address().to_string());
    store()
        .lookup(user, "pg1", &node, &BackendTls::disabled())
        .await
        .expect("the auth query runs")
}

/// What pgpivot notes of a real login of `user` to node 0.
async fn relayed_login(cluster: &LocalCluster, user: &str) -> Login {
    let node = pgpivot::address::BackendAddress::Tcp(cluster.node(0).address().to_string());
    let mut backend = TcpStream::connect(node.to_string()).await.unwrap();
    let (client_end, mut proxy_end) = tokio::io::duplex(64 * 1024);
    let conninfo = cluster.node(0).conn_string_as(user);
    let config: tokio_postgres::Config = conninfo.parse().unwrap();
    let client = async move {
        let (client, connection) = config
            .connect_raw(client_end, tokio_postgres::NoTls)
            .await
            .expect("the client logs in through the relayed exchange");
        tokio::spawn(connection);
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
        client
    };
    let cancels = Arc::new(CancelRegistry::default());
    let proxy = async {
        let StartupPacket::Startup(startup) = read_packet(&mut proxy_end).await.unwrap() else {
            panic!("a startup packet");
        };
        backend.write_all(&startup.encode()).await.unwrap();
        let mut first = BytesMut::new();
        fill_message(&mut backend, &mut first, 64 * 1024)
            .await
            .unwrap();
        let ctx = AuthContext {
            node: "pg1",
            backend_address: &node,
            cancels: &cancels,
            needs_primary: true,
            received: first,
        };
        let done = authenticate(&mut proxy_end, &mut backend, ctx)
            .await
            .unwrap();
        // Relay the rest as bytes, so the client can run its check.
        let (mut pr, mut pw) = tokio::io::split(proxy_end);
        let (mut br, mut bw) = backend.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut pr, &mut bw).await });
        tokio::spawn(async move { tokio::io::copy(&mut br, &mut pw).await });
        done.login
    };
    let (login, _client) = tokio::join!(proxy, client);
    login
}

/// Logs in to node `i` as `user` with `credential` and asks who it is.
async fn relogin_as(
    cluster: &LocalCluster,
    i: usize,
    user: &str,
    credential: &Credential,
) -> Result<String, ReloginError> {
    let mut tcp = TcpStream::connect(cluster.node(i).address()).await.unwrap();
    let mut startup = StartupMessage::new(196_608);
    startup.set_param("user", Some(user));
    startup.set_param("database", Some("postgres"));
    let logged_in = login(&mut tcp, &startup, credential).await?;
    assert_eq!(logged_in.status, TxStatus::Idle);
    assert!(logged_in.key.is_some(), "BackendKeyData");
    assert!(logged_in
        .parameters
        .iter()
        .any(|(k, _)| k == "server_version"));
    // One simple query on the new backend: its answer names the role.
    let sql = b"select current_user::text\0";
    let mut query = vec![b'Q'];
    query.extend_from_slice(&(sql.len() as u32 + 4).to_be_bytes());
    query.extend_from_slice(sql);
    tcp.write_all(&query).await.unwrap();
    let mut buf = BytesMut::new();
    let mut answer = String::new();
    loop {
        let (tag, total) = fill_message(&mut tcp, &mut buf, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        let message = buf.split_to(total);
        match tag {
            b'D' => answer = String::from_utf8_lossy(&message[11..]).into_owned(),
            b'Z' => return Ok(answer),
            b'E' => panic!("query failed: {:?}", String::from_utf8_lossy(&message)),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scram_login_yields_a_client_key_that_logs_in_to_a_standby() {
    let cluster = cluster();
    let credential = first_login(cluster, SUPERUSER).await.expect("a credential");
    assert!(matches!(credential, Credential::Scram(_)), "{credential:?}");
    assert_eq!(
        format!("{credential:?}"),
        "Credential::Scram(..)",
        "Debug shows no key"
    );
    assert_eq!(
        relogin_as(cluster, 1, SUPERUSER, &credential)
            .await
            .unwrap(),
        SUPERUSER
    );
    // And again on the primary: a kept key answers any number of challenges.
    assert_eq!(
        relogin_as(cluster, 0, SUPERUSER, &credential)
            .await
            .unwrap(),
        SUPERUSER
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_cleartext_logins_log_in_again() {
    let cluster = cluster();
    for user in [MD5_USER, CLEARTEXT_USER] {
        let credential = first_login(cluster, user).await.expect("a credential");
        assert_eq!(
            relogin_as(cluster, 1, user, &credential).await.unwrap(),
            user
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_is_refused_and_a_wrong_verifier_gives_no_key() {
    let cluster = cluster();
    cluster
        .psql(0, &format!("CREATE ROLE mover LOGIN PASSWORD '{PASSWORD}'"))
        .unwrap();
    let relayed = relayed_login(cluster, "mover").await;
    let before = secret_of(cluster, "mover").await;
    let credential = credential_for(&relayed, before.as_ref()).expect("a credential");
    cluster
        .psql(0, "ALTER ROLE mover PASSWORD 'changed meanwhile'")
        .unwrap();
    let refused = relogin_as(cluster, 0, "mover", &credential)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ReloginError::Refused { code, .. } if code == "28P01"),
        "{refused}"
    );
    // The verifier now belongs to another password: the old exchange proves
    // nothing against it.
    let after = secret_of(cluster, "mover").await;
    assert!(after.is_some() && after != before);
    assert!(credential_for(&relayed, after.as_ref()).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_auth_query_is_not_rerun_for_every_session() {
    let cluster = cluster();
    let node = pgpivot::address::BackendAddress::Tcp(cluster.node(0).address().to_string());
    // pg_shadow is for superusers only: the documented non-superuser role
    // gets "permission denied".
    let store = SecretStore::from_query(QuerySettings {
        query: pgpivot::credentials::store::DEFAULT_QUERY.into(),
        user: "pgpivot_auth".into(),
        password: PASSWORD.into(),
        database: "postgres".into(),
    });
    let tls = BackendTls::disabled();
    let first = store.lookup(SUPERUSER, "pg1", &node, &tls).await;
    let e = first.expect_err("pg_shadow is refused to pgpivot_auth");
    assert!(
        !e.is_repeat() && e.to_string().contains("permission denied"),
        "{e}"
    );
    // The next sessions get the same answer at once, without a connection.
    let connections = || {
        cluster
            .psql(
                0,
                "select count(*) from pg_stat_activity where usename = 'pgpivot_auth'",
            )
            .unwrap()
    };
    let before = tokio::task::block_in_place(connections);
    for _ in 0..5 {
        let again = store.lookup(SUPERUSER, "pg1", &node, &tls).await;
        assert!(again.expect_err("still failing").is_repeat());
    }
    assert_eq!(tokio::task::block_in_place(connections), before);
}

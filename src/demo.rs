//! `pgpivot demo`: a local primary with two hot standbys, and pgpivot in
//! front of them, with no configuration at all.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{FileConfig, ListenerConfig, NodeConfig, Settings};
use crate::localcluster::{ClusterOptions, LocalCluster, PASSWORD, SUPERUSER};
use crate::routing::Target;

/// The demo's listeners: read-write and prefer-standby, on the usual ports
/// when free.
fn listener(port: u16, target: Target) -> ListenerConfig {
    let free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let mut l = ListenerConfig::new(format!("127.0.0.1:{}", if free { port } else { 0 }), target);
    l.max_lag_ms = (target != Target::ReadWrite).then_some(1000);
    l
}

/// A config for a proxy in front of `cluster`: its nodes, the superuser as
/// monitor role, and `listeners`; everything else at defaults.
pub fn file_config(cluster: &LocalCluster, listeners: Vec<ListenerConfig>) -> FileConfig {
    let mut file = FileConfig {
        listeners,
        ..FileConfig::default()
    };
    file.nodes = cluster
        .nodes()
        .iter()
        .map(|n| NodeConfig::new(&n.name, &n.address().to_string()))
        .collect();
    file.monitor.user = SUPERUSER.into();
    file.monitor.password = PASSWORD.into();
    file
}

/// Validated settings for a proxy in front of `cluster`.
pub fn settings_for(cluster: &LocalCluster, listeners: Vec<ListenerConfig>) -> Settings {
    file_config(cluster, listeners)
        .validate()
        .expect("a local cluster's config is valid")
}

/// Starts the cluster and the proxy, prints how to connect, runs until
/// Ctrl-C, then cleans everything up.
pub async fn run(standbys: usize) -> anyhow::Result<()> {
    println!("starting a local PostgreSQL cluster (1 primary, {standbys} standbys)...");
    let opts = ClusterOptions {
        standbys,
        ..ClusterOptions::default()
    };
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(opts)).await??;
    let listeners = vec![
        listener(6432, Target::ReadWrite),
        listener(6433, Target::PreferStandby),
    ];
    let mut settings = settings_for(&cluster, listeners);
    let admin_port = if std::net::TcpListener::bind(("127.0.0.1", 9187)).is_ok() {
        9187
    } else {
        0
    };
    settings.admin = Some(crate::config::AdminSettings {
        address: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        token: None,
    });
    let proxy = crate::proxy::Proxy::start(settings).await?;
    if !proxy.wait_for_primary(Duration::from_secs(10)).await {
        anyhow::bail!("pgpivot found no primary in the demo cluster");
    }
    print_banner(&cluster, &proxy.addresses, proxy.admin_address);
    crate::proxy::shutdown_signal().await?;
    println!("\nstopping...");
    proxy.shutdown(Duration::from_secs(5)).await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    println!("cluster stopped and removed");
    Ok(())
}

fn print_banner(cluster: &LocalCluster, addresses: &[SocketAddr], admin: Option<SocketAddr>) {
    let url = |a: &SocketAddr| {
        format!(
            "postgresql://{SUPERUSER}:{PASSWORD}@{}:{}/postgres",
            a.ip(),
            a.port()
        )
    };
    println!();
    println!("pgpivot is running in front of:");
    for n in cluster.nodes() {
        println!("  {:<5} {}", n.name, n.address());
    }
    println!();
    println!("read-write (primary):        psql '{}'", url(&addresses[0]));
    println!("prefer-standby (standbys):   psql '{}'", url(&addresses[1]));
    println!();
    println!(
        "try:  psql '{}' -c 'select inet_server_port(), pg_is_in_recovery()'",
        url(&addresses[1])
    );
    if let Some(admin) = admin {
        println!("admin:  curl http://{admin}/status   |   pgpivot status --admin {admin}");
    }
    println!("data dir: {}   (removed on exit)", cluster.dir().display());
    println!("Ctrl-C stops pgpivot and the cluster.");
}

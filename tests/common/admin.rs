//! Helpers for tests that drive pgpivot's admin endpoint or start it from
//! a config file.

use pgpivot::admin::client::call;
use pgpivot::config::{AdminConfig, FileConfig};
use pgpivot::localcluster::LocalCluster;
use pgpivot::proxy::Proxy;
use pgpivot::topology::Status;

use super::*;

pub fn with_admin(mut config: FileConfig, token: Option<&str>) -> FileConfig {
    config.admin = Some(AdminConfig {
        address: "127.0.0.1:0".into(),
        token: token.map(str::to_string),
    });
    config
}

pub fn admin(proxy: &Proxy) -> String {
    proxy.admin_address.expect("admin endpoint on").to_string()
}

pub async fn get(proxy: &Proxy, path: &str) -> String {
    let (status, body) = call(&admin(proxy), "GET", path, None).await.unwrap();
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

pub async fn post(proxy: &Proxy, path: &str) -> (u16, String) {
    call(&admin(proxy), "POST", path, None).await.unwrap()
}

/// Writes a config file for `cluster` (all its nodes) with the admin
/// endpoint on, and returns its path.
pub fn write_config(
    dir: &std::path::Path,
    cluster: &LocalCluster,
    extra: &str,
) -> std::path::PathBuf {
    let mut text =
        String::from("[[listeners]]\naddress = \"127.0.0.1:0\"\ntarget = \"read-write\"\n");
    text.push_str("[[listeners]]\naddress = \"127.0.0.1:0\"\ntarget = \"standby\"\n");
    for n in cluster.nodes() {
        text.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\naddress = \"{}\"\n",
            n.name,
            n.address()
        ));
    }
    text.push_str("[monitor]\nuser = \"postgres\"\npassword = \"postgres\"\ninterval_ms = 100\n");
    text.push_str("[admin]\naddress = \"127.0.0.1:0\"\n");
    text.push_str(extra);
    let path = dir.join("pgpivot.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn start_from_file(path: &std::path::Path) -> Proxy {
    let file = pgpivot::config::load(Some(path)).unwrap();
    let proxy = Proxy::start_with_path(file.validate().unwrap(), Some(path.into()))
        .await
        .unwrap();
    assert!(proxy.wait_for_primary(Duration::from_secs(20)).await);
    let all_polled = eventually(Duration::from_secs(20), || async {
        let t = proxy.shared.topology.load();
        t.nodes.iter().all(|n| n.status != Status::Down)
    })
    .await;
    assert!(all_polled, "not every node answered its first poll");
    proxy
}

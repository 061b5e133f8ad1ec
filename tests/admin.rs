//! The admin endpoint: metrics, status, health, ready, the bearer token and
//! `pgpivot status`, against a real cluster.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use pgpivot::admin::client::call;
use pgpivot::admin::status::StatusReport;

use common::admin::*;
use common::*;

/// Parses Prometheus text strictly: every sample belongs to a family
/// declared once with HELP and TYPE, names and labels are well formed and
/// values are numbers. Returns samples keyed by `name{labels}`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "bad metric name {name}");
            assert!(
                ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "TYPE twice: {name}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "bad sample name: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .expect("{labels}");
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(
                    valid_name(k) && v.starts_with('"') && v.ends_with('"'),
                    "bad label: {line}"
                );
            }
        }
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "summary"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample without TYPE: {line}");
        if types[family] == "counter" {
            assert!(name.ends_with("_total"), "counter without _total: {name}");
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_sessions() {
    let proxy = start_proxy(with_admin(config_for(shared_cluster()), None)).await;
    let before = parse_prometheus(&get(&proxy, "/metrics").await);
    let accepted = |m: &HashMap<String, f64>| m["pgpivot_client_sessions_accepted_total"];
    let trips = |m: &HashMap<String, f64>| m["pgpivot_round_trip_seconds_count{node=\"pg1\"}"];
    for _ in 0..3 {
        let c = connect(proxy.addresses[0]).await;
        for _ in 0..5 {
            c.simple_query("select 1").await.unwrap();
        }
    }
    let ok = eventually(Duration::from_secs(5), || async {
        let m = parse_prometheus(&get(&proxy, "/metrics").await);
        m["pgpivot_node_client_sessions{node=\"pg1\"}"] == 0.0
            && m["pgpivot_client_sessions_active"] == 0.0
    })
    .await;
    assert!(ok, "session gauges did not return to zero");
    let after = parse_prometheus(&get(&proxy, "/metrics").await);
    assert_eq!(accepted(&after) - accepted(&before), 3.0);
    assert!(
        trips(&after) - trips(&before) >= 15.0,
        "round trips not counted"
    );
    assert!(after["pgpivot_relayed_bytes_total{direction=\"server_to_client\"}"] > 0.0);
    assert_eq!(after["pgpivot_node_up{node=\"pg2\"}"], 1.0);
    assert_eq!(
        after["pgpivot_node_status{node=\"pg1\",status=\"primary\"}"],
        1.0
    );
    assert_eq!(after["pgpivot_primary_known"], 1.0);
    assert!(after["pgpivot_backend_connects_total{node=\"pg1\"}"] >= 3.0);
    let listener_series = after
        .keys()
        .filter(|k| k.starts_with("pgpivot_listener_client_sessions{"))
        .count();
    assert_eq!(listener_series, 2, "one series per listener");
    // Each series is labelled with its listener's bound address and counts
    // that listener's sessions only.
    let series = |i: usize| {
        let target = ["read-write", "prefer-standby"][i];
        format!(
            "pgpivot_listener_client_sessions{{listener=\"{}\",target=\"{target}\"}}",
            proxy.addresses[i]
        )
    };
    let open = connect(proxy.addresses[1]).await;
    open.simple_query("select 1").await.unwrap();
    let m = parse_prometheus(&get(&proxy, "/metrics").await);
    let listener_keys: Vec<&String> = m
        .keys()
        .filter(|k| k.starts_with("pgpivot_listener_"))
        .collect();
    assert_eq!(m.get(&series(0)), Some(&0.0), "{listener_keys:?}");
    assert_eq!(m.get(&series(1)), Some(&1.0), "{listener_keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_health_and_ready_match_the_cluster() {
    let cluster = shared_cluster();
    let proxy = start_proxy(with_admin(config_for(cluster), None)).await;
    let report: StatusReport = serde_json::from_str(&get(&proxy, "/status").await).unwrap();
    assert_eq!(report.primary.as_deref(), Some("pg1"));
    for (i, node) in report.nodes.iter().enumerate() {
        let in_recovery =
            tokio::task::block_in_place(|| cluster.psql(i, "select pg_is_in_recovery()")).unwrap();
        let expected = if in_recovery == "t" {
            "standby"
        } else {
            "primary"
        };
        assert_eq!(node.status, expected, "{}", node.name);
        assert!(node.up);
    }
    let listeners: Vec<String> = report.listeners.iter().map(|l| l.address.clone()).collect();
    let bound: Vec<String> = proxy.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(listeners, bound, "/status shows the bound addresses");
    assert_eq!(get(&proxy, "/health").await.trim(), "ok");
    assert!(get(&proxy, "/ready").await.contains("pg1"));
    // The CLI's table shows the same.
    let table = pgpivot::admin::status::render_table(&report);
    assert!(table.contains("pg1") && table.contains("primary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_admin_endpoint() {
    let proxy = start_proxy(with_admin(config_for(shared_cluster()), Some("s3cret"))).await;
    let address = admin(&proxy);
    let (status, _) = call(&address, "GET", "/status", None).await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = call(&address, "GET", "/status", Some("wrong"))
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _) = call(&address, "GET", "/status", Some("s3cret"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgpivot_status_says_what_is_paused() {
    let proxy = start_proxy(with_admin(config_for(shared_cluster()), None)).await;
    let table = || async {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpivot"))
            .args(["status", "--admin", &admin(&proxy)])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = table().await;
    assert!(
        shown.lines().next().unwrap().ends_with("paused no"),
        "{shown}"
    );
    let (status, body) = post(&proxy, "/pause?scope=writes&timeout_ms=0").await;
    assert_eq!(status, 200, "{body}");
    let shown = table().await;
    assert!(
        shown.lines().next().unwrap().ends_with("paused writes"),
        "{shown}"
    );
    let (status, body) = post(&proxy, "/resume").await;
    assert_eq!(status, 200, "{body}");
}

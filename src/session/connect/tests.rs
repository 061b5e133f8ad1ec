//! The connect stage against scripted backends: loopback listeners that
//! refuse, answer 57P03 or accept, behind a topology the test sets. It checks
//! the hold and retry rules without a PostgreSQL server; the real-cluster
//! tests (`tests/failover.rs`, `tests/read_routing.rs`) check them with one.

use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{connect, Routes};
use crate::config::{FileConfig, ListenerConfig, NodeConfig, Settings};
use crate::decider::TopologyHandle;
use crate::metrics::Metrics;
use crate::monitor::MonitorHandle;
use crate::protocol::startup::StartupMessage;
use crate::routing::{LagBudget, Target};
use crate::session::error::ConnectError;
use crate::session::params::SessionRequest;
use crate::topology::{decide, LsnHistory, NodeInput, NodeSpec, Observation, Role, Topology};

/// How a scripted backend answers each connection, in turn (the last one
/// repeats).
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// AuthenticationOk: the session may go on.
    Ok,
    /// `FATAL 57P03 the database system is starting up`.
    StartingUp,
}

/// A listener playing a backend; returns its address.
async fn backend(script: Vec<Answer>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut turn = 0;
        while let Ok((mut tcp, _)) = listener.accept().await {
            let answer = script[turn.min(script.len() - 1)];
            turn += 1;
            let mut startup = [0u8; 256];
            let _ = tcp.read(&mut startup).await;
            let bytes: &[u8] = match answer {
                Answer::Ok => b"R\0\0\0\x08\0\0\0\0",
                Answer::StartingUp => b"E\0\0\0\x2aSFATAL\0C57P03\0Mthe database is starting\0\0",
            };
            let _ = tcp.write_all(bytes).await;
            // Keep the connection open like a server would, a while.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(tcp);
            });
        }
    });
    address
}

/// An address nothing listens on.
async fn refused() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

/// The parts a connect borrows, owned by the test.
struct Fixture {
    topology: TopologyHandle,
    monitor: MonitorHandle,
    metrics: Metrics,
    shutdown: CancellationToken,
    tiebreak: AtomicUsize,
    settings: Settings,
}

impl Fixture {
    /// Nodes at `addresses` with the roles given (`None`: down).
    fn new(nodes: &[(&str, Option<Role>)], hold_ms: u64) -> (Fixture, impl Fn(Topology)) {
        let mut file = FileConfig {
            listeners: vec![ListenerConfig::new("127.0.0.1:0", Target::Any)],
            ..FileConfig::default()
        };
        file.nodes = nodes
            .iter()
            .enumerate()
            .map(|(i, (address, _))| NodeConfig::new(&format!("pg{}", i + 1), address))
            .collect();
        file.monitor.user = "pgpivot".into();
        file.monitor.interval_ms = 50;
        file.failover.hold_timeout_ms = hold_ms;
        file.limits.connect_timeout_ms = 1000;
        file.backend_tls.sslmode = crate::backend_tls::SslMode::Disable;
        let settings = file.validate().unwrap();
        let (topology, publish) = TopologyHandle::fixed(snapshot(&settings, nodes));
        let fixture = Fixture {
            topology,
            monitor: MonitorHandle::default(),
            metrics: Metrics::default(),
            shutdown: CancellationToken::new(),
            tiebreak: AtomicUsize::new(0),
            settings,
        };
        (fixture, publish)
    }

    fn routes(&self) -> Routes<'_> {
        Routes {
            topology: &self.topology,
            monitor: &self.monitor,
            metrics: &self.metrics,
            shutdown: &self.shutdown,
            tiebreak: &self.tiebreak,
        }
    }

    async fn connect(&self, target: Target) -> Result<super::Connected, ConnectError> {
        let request = SessionRequest {
            target,
            budget: LagBudget::default(),
        };
        let startup = StartupMessage::new(196_608);
        connect(self.routes(), &self.settings, &request, &startup).await
    }
}

/// A published snapshot of `nodes` as the decider would make it.
fn snapshot(settings: &Settings, nodes: &[(&str, Option<Role>)]) -> Topology {
    let specs: Vec<NodeSpec> = settings
        .nodes
        .iter()
        .map(|n| NodeSpec::new(&n.name, &n.address, 1))
        .collect();
    let inputs: Vec<NodeInput> = nodes
        .iter()
        .map(|(_, role)| NodeInput {
            up: role.is_some(),
            last: role.map(|role| Observation {
                role,
                timeline: 1,
                lsn: 0,
                system_id: 1,
            }),
            polled_at: Some(Instant::now()),
        })
        .collect();
    decide(
        &Topology::initial(&specs),
        &specs,
        &inputs,
        &LsnHistory::default(),
        Instant::now(),
    )
}

#[tokio::test]
async fn an_unreachable_pick_gives_way_to_another_eligible_node_at_once() {
    let dead = refused().await;
    let live = backend(vec![Answer::Ok]).await;
    let nodes = [
        (dead.as_str(), Some(Role::Standby)),
        (live.as_str(), Some(Role::Standby)),
    ];
    let (fixture, _publish) = Fixture::new(&nodes, 10_000);
    for _ in 0..4 {
        // Whichever the tie-break picks first, the session lands on pg2.
        let connected = fixture.connect(Target::Standby).await.unwrap();
        assert_eq!(connected.name, "pg2");
        assert!(
            connected.held < Duration::from_millis(500),
            "{:?}",
            connected.held
        );
    }
    assert_eq!(fixture.metrics.sessions_held.get(), 0, "nobody waited");
}

#[tokio::test]
async fn a_server_starting_up_is_held_for_and_retried() {
    let primary = backend(vec![Answer::StartingUp, Answer::StartingUp, Answer::Ok]).await;
    let (fixture, _publish) = Fixture::new(&[(primary.as_str(), Some(Role::Primary))], 10_000);
    let connected = fixture.connect(Target::ReadWrite).await.unwrap();
    assert_eq!(connected.name, "pg1");
    // Two refusals, each followed by a wait of one monitor interval (50 ms).
    assert!(
        connected.held >= Duration::from_millis(50),
        "{:?}",
        connected.held
    );
    assert_eq!(fixture.metrics.sessions_held.get(), 1);
}

#[tokio::test]
async fn a_held_session_connects_as_soon_as_a_primary_is_published() {
    let primary = backend(vec![Answer::Ok]).await;
    let nodes = [(primary.as_str(), Some(Role::Standby))];
    let (fixture, publish) = Fixture::new(&nodes, 10_000);
    let settings = fixture.settings.clone();
    let promote = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish(snapshot(
            &settings,
            &[(primary.as_str(), Some(Role::Primary))],
        ));
    };
    let (connected, ()) = tokio::join!(fixture.connect(Target::ReadWrite), promote);
    let connected = connected.unwrap();
    assert!(
        connected.held >= Duration::from_millis(200),
        "{:?}",
        connected.held
    );
    assert!(
        connected.held < Duration::from_secs(5),
        "{:?}",
        connected.held
    );
}

#[tokio::test]
async fn with_no_eligible_node_the_hold_timeout_ends_the_wait() {
    let standby = backend(vec![Answer::Ok]).await;
    let (fixture, _publish) = Fixture::new(&[(standby.as_str(), Some(Role::Standby))], 300);
    let started = Instant::now();
    let err = fixture
        .connect(Target::ReadWrite)
        .await
        .err()
        .expect("no primary");
    assert!(matches!(err, ConnectError::NoRoute { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(fixture.metrics.sessions_hold_timeout.get(), 1);
}

#[tokio::test]
async fn shutdown_reaches_a_held_session_at_once() {
    let standby = backend(vec![Answer::Ok]).await;
    let (fixture, _publish) = Fixture::new(&[(standby.as_str(), Some(Role::Standby))], 30_000);
    let started = Instant::now();
    let stop = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fixture.shutdown.cancel();
    };
    let (result, ()) = tokio::join!(fixture.connect(Target::ReadWrite), stop);
    assert!(matches!(result, Err(ConnectError::ShuttingDown)));
    assert!(started.elapsed() < Duration::from_secs(5));
}

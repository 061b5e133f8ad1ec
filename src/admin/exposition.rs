//! `GET /metrics`: everything pgpivot counts, in the Prometheus text format
//! (version 0.0.4). Names carry the `pgpivot_` prefix, counters end in
//! `_total`, durations are in seconds, latency quantiles are summaries.

use std::fmt::Write;

use crate::metrics::{Latency, Metrics};
use crate::shared::Shared;
use crate::topology::{NodeView, Status};

/// Renders the exposition text.
pub fn render(shared: &Shared) -> String {
    let mut out = Exposition::default();
    let m = &shared.metrics;
    session_metrics(&mut out, m);
    listener_metrics(&mut out, shared);
    node_metrics(&mut out, shared);
    topology_metrics(&mut out, shared);
    out.0
}

/// What `[failover] move_sessions` did.
fn move_metrics(out: &mut Exposition, m: &crate::metrics::MoveMetrics) {
    out.labelled(
        "pgpivot_sessions_moved_total",
        "counter",
        "Sessions moved to another node with their state, by cause.",
        "cause",
        &m.moved.get(),
    );
    out.labelled(
        "pgpivot_session_move_failures_total",
        "counter",
        "Moves that failed (the session was ended with 57P01), by reason.",
        "reason",
        &m.failed.get(),
    );
    out.labelled(
        "pgpivot_sessions_not_movable_total",
        "counter",
        "Sessions ended at a failover because they could not move, by reason.",
        "reason",
        &m.blocked.get(),
    );
    out.labelled(
        "pgpivot_in_flight_answered_total",
        "counter",
        "Statements in flight at a crash that pgpivot answered itself, by SQLSTATE.",
        "sqlstate",
        &m.in_flight_answered.get(),
    );
    out.single(
        "pgpivot_moved_listening_sessions_total",
        "counter",
        "Moved sessions that were LISTENing (notifications sent during the move are lost).",
        m.moved_listening.get(),
    );
    out.single(
        "pgpivot_session_state_bytes",
        "gauge",
        "Session state (SQL text, names) tracked for moves, over all open sessions.",
        m.state_bytes.get(),
    );
    out.single(
        "pgpivot_sessions_with_credential_total",
        "counter",
        "Sessions that kept a credential to log in again (and so may move).",
        m.with_credential.get(),
    );
    out.single(
        "pgpivot_sessions_without_credential_total",
        "counter",
        "Sessions whose role had no credential to log in again.",
        m.without_credential.get(),
    );
    out.family(
        "pgpivot_session_move_seconds",
        "summary",
        "From a moving session's relay stopping to it relaying on its new node.",
    );
    out.summary("pgpivot_session_move_seconds", &[], &m.move_time);
}

/// A text buffer that writes one metric family at a time.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// One family, one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// One family whose samples differ in one label.
    fn labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) {
        self.family(name, kind, help);
        for (v, n) in values {
            self.sample(name, &[(label, v)], n);
        }
    }

    /// A summary with quantiles from a latency histogram (µs → seconds).
    fn summary(&mut self, name: &str, labels: &[(&str, &str)], latency: &Latency) {
        let s = latency.snapshot();
        for (q, micros) in s.quantiles {
            let q = q.to_string();
            let mut l = labels.to_vec();
            l.push(("quantile", &q));
            self.sample(name, &l, seconds(micros));
        }
        let mut l = labels.to_vec();
        l.push(("quantile", "1"));
        self.sample(name, &l, seconds(s.max));
        self.sample(&format!("{name}_sum"), labels, seconds(s.sum));
        self.sample(&format!("{name}_count"), labels, s.count);
    }
}

fn seconds(micros: u64) -> f64 {
    micros as f64 / 1e6
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn session_metrics(out: &mut Exposition, m: &Metrics) {
    out.single(
        "pgpivot_client_sessions_accepted_total",
        "counter",
        "Client connections accepted.",
        m.sessions_accepted.get(),
    );
    out.single(
        "pgpivot_client_sessions_active",
        "gauge",
        "Client sessions open now (all stages).",
        m.sessions_active.get(),
    );
    out.labelled(
        "pgpivot_client_sessions_busy",
        "gauge",
        "Sessions in a transaction or awaiting answers, by class.",
        "class",
        &[
            ("write", m.busy_writers.get()),
            ("read", m.busy_readers.get()),
        ],
    );
    out.single(
        "pgpivot_client_sessions_rejected_total",
        "counter",
        "Sessions refused with 53300 (connection limits).",
        m.sessions_rejected_limit.get(),
    );
    out.single(
        "pgpivot_sessions_held_total",
        "counter",
        "Sessions that waited for an eligible node.",
        m.sessions_held.get(),
    );
    out.single(
        "pgpivot_sessions_waiting",
        "gauge",
        "Sessions waiting for an eligible node now.",
        m.sessions_waiting.get(),
    );
    out.single(
        "pgpivot_sessions_hold_timeouts_total",
        "counter",
        "Held sessions refused with 57P03 after the hold timeout.",
        m.sessions_hold_timeout.get(),
    );
    out.family(
        "pgpivot_session_hold_seconds",
        "summary",
        "How long released sessions were held.",
    );
    out.summary("pgpivot_session_hold_seconds", &[], &m.hold_time);
    out.labelled(
        "pgpivot_sessions_ended_total",
        "counter",
        "Sessions ended by pgpivot, by reason.",
        "reason",
        &[
            ("demoted", m.ended_demoted.get()),
            ("node_lost", m.ended_node_lost.get()),
            ("promoted", m.ended_promoted.get()),
            ("lagging", m.ended_lagging.get()),
            ("shutdown", m.ended_shutdown.get()),
        ],
    );
    move_metrics(out, &m.moves);
    out.single(
        "pgpivot_read_fallbacks_total",
        "counter",
        "Read sessions placed on the primary for want of a standby within budget.",
        m.fallbacks.get(),
    );
    out.single(
        "pgpivot_cancel_requests_total",
        "counter",
        "CancelRequests received.",
        m.cancel_requests.get(),
    );
    out.labelled(
        "pgpivot_relayed_bytes_total",
        "counter",
        "Bytes relayed after authentication.",
        "direction",
        &[
            ("client_to_server", m.bytes_from_clients.get()),
            ("server_to_client", m.bytes_to_clients.get()),
        ],
    );
}

fn listener_metrics(out: &mut Exposition, shared: &Shared) {
    let settings = shared.settings();
    out.family(
        "pgpivot_listener_client_sessions",
        "gauge",
        "Client sessions open now, by listener.",
    );
    // Labelled by bound address: two listeners configured on port 0 would
    // otherwise look alike.
    let listeners = shared
        .listener_sessions
        .iter()
        .zip(&shared.listener_addresses);
    for (i, (gauge, address)) in listeners.enumerate() {
        let address = address.to_string();
        let target = settings.listeners.get(i).map_or("", |l| l.target.as_str());
        out.sample(
            "pgpivot_listener_client_sessions",
            &[("listener", &address), ("target", target)],
            gauge.get(),
        );
    }
}

fn node_metrics(out: &mut Exposition, shared: &Shared) {
    let topology = shared.topology.load();
    let nodes: Vec<&NodeView> = topology
        .nodes
        .iter()
        .filter(|n| n.status != Status::Removed)
        .collect();
    let per_node = |out: &mut Exposition,
                    name: &str,
                    kind: &str,
                    help: &str,
                    value: &dyn Fn(&NodeView) -> Option<String>| {
        out.family(name, kind, help);
        for n in &nodes {
            if let Some(v) = value(n) {
                out.sample(name, &[("node", &n.name)], v);
            }
        }
    };
    per_node(
        out,
        "pgpivot_node_up",
        "gauge",
        "1 if the node answers its monitor.",
        &|n| Some(u8::from(n.status != Status::Down).to_string()),
    );
    out.family(
        "pgpivot_node_status",
        "gauge",
        "1 for the node's current status.",
    );
    for n in &nodes {
        out.sample(
            "pgpivot_node_status",
            &[("node", &n.name), ("status", n.status.name())],
            1,
        );
    }
    per_node(
        out,
        "pgpivot_node_timeline",
        "gauge",
        "Timeline the node reports.",
        &|n| n.timeline.map(|t| t.to_string()),
    );
    per_node(
        out,
        "pgpivot_node_lag_bytes",
        "gauge",
        "WAL bytes a standby is behind the primary.",
        &|n| n.lag_bytes.map(|b| b.to_string()),
    );
    per_node(
        out,
        "pgpivot_node_lag_seconds",
        "gauge",
        "How old a standby's replayed state is, on pgpivot's clock.",
        &|n| n.lag.map(|d| d.as_secs_f64().to_string()),
    );
    per_node(
        out,
        "pgpivot_node_client_sessions",
        "gauge",
        "Client sessions routed to the node now.",
        &|n| Some(n.stats.sessions().to_string()),
    );
    per_node(
        out,
        "pgpivot_backend_connects_total",
        "counter",
        "Backend connections opened.",
        &|n| Some(n.stats.connects.get().to_string()),
    );
    per_node(
        out,
        "pgpivot_backend_connect_failures_total",
        "counter",
        "Backend connections that failed.",
        &|n| Some(n.stats.connect_failures.get().to_string()),
    );
    out.family(
        "pgpivot_backend_connect_seconds",
        "summary",
        "Backend TCP connect and startup write time.",
    );
    for n in &nodes {
        out.summary(
            "pgpivot_backend_connect_seconds",
            &[("node", &n.name)],
            &n.stats.connect_latency,
        );
    }
    out.family(
        "pgpivot_round_trip_seconds",
        "summary",
        "Client request to the ReadyForQuery that closes it.",
    );
    for n in &nodes {
        out.summary(
            "pgpivot_round_trip_seconds",
            &[("node", &n.name)],
            &n.stats.round_trip,
        );
    }
}

fn topology_metrics(out: &mut Exposition, shared: &Shared) {
    let topology = shared.topology.load();
    out.single(
        "pgpivot_topology_generation",
        "gauge",
        "Generation of the current topology snapshot.",
        topology.generation,
    );
    out.single(
        "pgpivot_primary_known",
        "gauge",
        "1 while a primary is known.",
        u8::from(topology.primary.is_some()),
    );
    out.single(
        "pgpivot_writes_fenced",
        "gauge",
        "1 while two primaries tie and writes are refused.",
        u8::from(topology.fenced),
    );
    out.family(
        "pgpivot_topology_changes_total",
        "counter",
        "Topology changes, by kind.",
    );
    for (kind, n) in shared.metrics.topology_changes() {
        out.sample("pgpivot_topology_changes_total", &[("kind", kind)], n);
    }
    out.single(
        "pgpivot_paused",
        "gauge",
        "1 while sessions are paused.",
        u8::from(shared.pause.scope() != crate::pause::PauseScope::None),
    );
}

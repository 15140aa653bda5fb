//! nodekeeper-detector: probes nodes from outside and reports what the agents cannot say
//! themselves: `AgentDown` (the node answers, its agent does not), `KubeletDown`, and
//! `NodeUnreachable` (nothing answers), and their recovery.
//!
//! - The node list, addresses, agent status ports and heartbeat times come from the event center
//!   (`ListNodes`, every `refresh_interval`). Heartbeat arrivals feed a phi-accrual suspicion
//!   level per node; a suspected node (phi above the threshold, or a failed probe) is probed at
//!   once and then every `suspect_interval` by every replica, with the agent's gRPC health check;
//!   the others once per `sweep_interval` by the replica whose share they are, with a light probe
//!   (TCP connects only; the ICMP echo is for suspects).
//! - A verdict needs `confirmations` consecutive failed probes. The center folds the replicas'
//!   views with its quorum; a detector that finds more than `partition_share` of the nodes it
//!   probed in the last few seconds unreachable suspects itself, reports `DetectorPartitioned`,
//!   and declares no node faulty until that passes. So that the last few seconds hold evidence
//!   before any verdict, a node that stops answering makes the detector probe a few others at
//!   once (witnesses): if they answer, the fault is the node's; if not, the detector's.
//! - Views are reported when they change (and at start), and views that a node is down again every
//!   `repeat_interval`.

pub mod config;
pub mod phi;
pub mod probe;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nodekeeper_proto::v1::{
    Category, Condition, ConditionStatus, ListNodesRequest, Node, Observation, RecommendedAction, Report,
    ReportRequest, Severity, fleet_service_client::FleetServiceClient, report_service_client::ReportServiceClient,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use config::Config;
use probe::{ProbeResult, Reach, Target};

pub const VERDICTS: [&str; 3] = ["AgentDown", "KubeletDown", "NodeUnreachable"];

/// Probes of one suspected node in flight at once.
const MAX_OVERLAP: usize = 3;

/// Other nodes probed at once when a node stops answering.
const WITNESSES: usize = 5;

/// The detector's `/metrics`.
pub struct Metrics {
    registry: Registry,
    /// Probes by kind (light, full) and outcome (healthy, agent_down: the node answered but the
    /// agent did not, no_answer: nothing on the node answered).
    probes: Family<Vec<(&'static str, &'static str)>, Counter>,
    probe_seconds: Family<Vec<(&'static str, &'static str)>, Histogram>,
    reports: Counter,
    suspected: Gauge,
    partitioned: Gauge,
}

fn probe_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("nodekeeper_detector"),
            probes: Family::default(),
            probe_seconds: Family::new_with_constructor(probe_histogram),
            reports: Counter::default(),
            suspected: Gauge::default(),
            partitioned: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "probes",
            "Probes by kind (light, full) and outcome (healthy, agent_down, no_answer)",
            m.probes.clone(),
        );
        r.register_with_unit("probe", "Probe latency by kind", Unit::Seconds, m.probe_seconds.clone());
        r.register("reports", "Reports sent to the center", m.reports.clone());
        r.register("suspected_nodes", "Nodes probed as suspects", m.suspected.clone());
        r.register(
            "partitioned",
            "1 while the detector suspects itself (most probed nodes silent)",
            m.partitioned.clone(),
        );
        m
    }
}

impl Metrics {
    /// OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        nodekeeper_common::metrics::encode(&self.registry)
    }
}

struct NodeState {
    target: Target,
    phi: phi::Phi,
    last_heartbeat: Option<f64>,
    failures: u32,
    kubelet_failures: u32,
    /// When the last probe was started: a suspect is probed again `suspect_interval` later.
    last_probe: Option<Instant>,
    /// Probes in flight: a suspect gets a new probe every suspect_interval even while earlier
    /// ones wait for their timeout (up to MAX_OVERLAP), so that confirmations take about
    /// confirmations × suspect_interval rather than × probe_timeout.
    flying: usize,
    /// The node list generation that last named this node.
    seen: u64,
    /// When the sweep probes the node next (if it is this replica's share).
    next_sweep: Instant,
    /// The last probe's outcome: did anything on the node answer?
    answered: Option<(bool, Instant)>,
    evidence: String,
    /// Confirmed verdicts.
    view: BTreeSet<&'static str>,
    /// What was last reported, and when.
    reported: Option<(BTreeSet<&'static str>, Instant)>,
    mine: bool,
}

impl NodeState {
    fn suspected(&self, phi_threshold: f64, now_unix: f64) -> bool {
        self.failures > 0
            || self.kubelet_failures > 0
            || !self.view.is_empty()
            || self.phi.phi(now_unix) >= phi_threshold
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// The address a detector probes: the node's first non-loopback IPv4 address, else IPv6.
pub fn address(n: &Node) -> Option<IpAddr> {
    let mut usable = n
        .inventory
        .as_ref()?
        .interfaces
        .iter()
        .flat_map(|i| i.addresses.iter())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .filter(|a: &IpAddr| !a.is_loopback() && !a.is_unspecified());
    let first = usable.next()?;
    if first.is_ipv4() { Some(first) } else { Some(usable.find(IpAddr::is_ipv4).unwrap_or(first)) }
}

fn share_of(node: &str, replicas: usize) -> usize {
    // FNV-1a: stable across processes and versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % replicas as u64) as usize
}

pub struct Detector {
    cfg: Config,
    channel: Channel,
    nodes: HashMap<(String, String), NodeState>,
    partitioned: bool,
    pub metrics: Arc<Metrics>,
    counter: u64,
    generation: u64,
    /// A node stopped answering: witnesses are wanted.
    witnesses_wanted: bool,
    icmp: Option<probe::Icmp>,
}

impl Detector {
    pub fn new(cfg: Config, channel: Channel) -> Detector {
        let icmp = if cfg.icmp { probe::Icmp::new() } else { None };
        if cfg.icmp && icmp.is_none() {
            tracing::warn!(
                "ICMP echo is not permitted (neither a ping socket, see net.ipv4.ping_group_range, nor CAP_NET_RAW): probing with TCP and gRPC only"
            );
        }
        Detector {
            cfg,
            channel,
            nodes: HashMap::new(),
            partitioned: false,
            metrics: Arc::default(),
            counter: 0,
            generation: 0,
            witnesses_wanted: false,
            icmp,
        }
    }

    /// Reads the node list and heartbeat times.
    async fn refresh(&mut self) -> Result<(), tonic::Status> {
        let nodes = FleetServiceClient::new(self.channel.clone())
            .list_nodes(ListNodesRequest { clusters: self.cfg.clusters.clone(), brief: true, ..Default::default() })
            .await?
            .into_inner()
            .nodes;
        let now = Instant::now();
        self.generation += 1;
        let (generation, sweep) = (self.generation, self.cfg.sweep_interval);
        for n in nodes {
            let Some(addr) = address(&n) else { continue };
            let status_port = n.status_port as u16;
            let interval = nodekeeper_common::time::from_duration(n.heartbeat_interval.as_ref())
                .unwrap_or(Duration::from_secs(10));
            let mine = share_of(&n.name, self.cfg.replicas) == self.cfg.replica;
            let st = self.nodes.entry((n.cluster, n.name)).or_insert_with_key(|(cluster, node)| NodeState {
                target: Target { cluster: cluster.clone(), node: node.clone(), addr, status_port },
                phi: phi::Phi::new(interval.as_secs_f64()),
                last_heartbeat: None,
                failures: 0,
                kubelet_failures: 0,
                last_probe: None,
                flying: 0,
                seen: generation,
                // Spread the first sweep over the interval.
                next_sweep: now + sweep.mul_f64(rand::random::<f64>()),
                answered: None,
                evidence: String::new(),
                view: BTreeSet::new(),
                reported: None,
                mine,
            });
            st.seen = generation;
            st.target.addr = addr;
            st.target.status_port = status_port;
            st.mine = mine;
            if let Some(hb) = n.last_heartbeat_time.as_ref() {
                let t = hb.seconds as f64 + f64::from(hb.nanos) / 1e9;
                if st.last_heartbeat != Some(t) {
                    st.last_heartbeat = Some(t);
                    st.phi.arrival(t);
                }
            }
        }
        self.nodes.retain(|_, st| st.seen == generation);
        Ok(())
    }

    /// Applies one probe's result to a node's state.
    fn apply(&mut self, key: &(String, String), r: ProbeResult) {
        let confirmations = self.cfg.confirmations;
        let Some(st) = self.nodes.get_mut(key) else { return };
        let answered = r.agent != Reach::NoAnswer
            || r.kubelet.is_some_and(|k| k != Reach::NoAnswer)
            || r.echo == Some(true)
            || r.kubelet_healthz.as_ref().is_some_and(Result::is_ok);
        st.answered = Some((answered, Instant::now()));
        tracing::debug!(node = %key.1, answered, agent = ?r.agent, healthy = r.agent_healthy, ms = r.latency.as_millis() as u64, "probe");
        st.evidence = r.evidence();
        let agent_ok = r.agent_healthy;
        let kind = if r.full { "full" } else { "light" };
        let outcome = match (agent_ok, answered) {
            (true, _) => "healthy",
            (false, true) => "agent_down",
            (false, false) => "no_answer",
        };
        self.metrics.probes.get_or_create(&vec![("kind", kind), ("outcome", outcome)]).inc();
        self.metrics.probe_seconds.get_or_create(&vec![("kind", kind)]).observe(r.latency.as_secs_f64());
        if agent_ok {
            st.failures = 0;
            st.view.remove("AgentDown");
            st.view.remove("NodeUnreachable");
        } else {
            st.failures += 1;
            if st.failures == 1 && !answered {
                self.witnesses_wanted = true;
            }
            if st.failures >= confirmations {
                let (set, clear) =
                    if answered { ("AgentDown", "NodeUnreachable") } else { ("NodeUnreachable", "AgentDown") };
                st.view.insert(set);
                st.view.remove(clear);
            }
        }
        match r.kubelet_up() {
            Some(true) | None => {
                st.kubelet_failures = 0;
                st.view.remove("KubeletDown");
            }
            // The node and its agent answer but the kubelet does not.
            Some(false) if answered && agent_ok => {
                st.kubelet_failures += 1;
                if st.kubelet_failures >= confirmations {
                    st.view.insert("KubeletDown");
                }
            }
            Some(false) => {}
        }
        if !answered {
            st.view.remove("KubeletDown");
        }
    }

    /// True when more than `partition_share` of the nodes probed in the last few seconds (the
    /// time a verdict takes to confirm) did not answer at all.
    fn partition_check(&self, now: Instant) -> (bool, usize, usize) {
        let recent = self.cfg.suspect_interval * (self.cfg.confirmations + 2) + self.cfg.probe_timeout;
        let (mut probed, mut silent) = (0usize, 0usize);
        for st in self.nodes.values() {
            if let Some((answered, at)) = st.answered
                && now.saturating_duration_since(at) <= recent
            {
                probed += 1;
                if !answered {
                    silent += 1;
                }
            }
        }
        (probed >= 2 && silent as f64 > self.cfg.partition_share * probed as f64, probed, silent)
    }

    /// The reports due: changed views, views repeated, the partition status.
    fn due_reports(&mut self, partition_changed: bool) -> Vec<Report> {
        let mut out = Vec::new();
        let (repeat, now) = (self.cfg.repeat_interval, Instant::now());
        for ((cluster, node), st) in &mut self.nodes {
            // While partitioned, only recoveries are reported: nothing is declared faulty.
            let view: BTreeSet<&'static str> = match &st.reported {
                Some((held, _)) if self.partitioned => st.view.intersection(held).copied().collect(),
                None if self.partitioned => BTreeSet::new(),
                _ => st.view.clone(),
            };
            let previous = match &st.reported {
                None => None,
                Some((v, at)) if *v != view || (!view.is_empty() && now.saturating_duration_since(*at) >= repeat) => {
                    Some(v)
                }
                Some(_) => continue,
            };
            let evidence = format!("{} (detector {})", st.evidence, self.cfg.name);
            for verdict in VERDICTS {
                let holds = view.contains(verdict);
                // Report a verdict that holds, changed, or the first time a node is seen.
                if !holds && previous.is_some_and(|p| !p.contains(verdict)) {
                    continue;
                }
                let id = report_id(&self.cfg.name, &mut self.counter, &format!("{node}-{verdict}"));
                out.push(verdict_report(cluster, node, verdict, holds, &evidence, id));
            }
            st.reported = Some((view, now));
        }
        if partition_changed {
            let clusters: BTreeSet<String> = self.nodes.keys().map(|(c, _)| c.clone()).collect();
            for cluster in clusters {
                let (reason, message, severity) = if self.partitioned {
                    (
                        "DetectorPartitioned",
                        format!(
                            "detector {} finds more than {:.0}% of the nodes unreachable at once: it suspects itself and declares no node faulty",
                            self.cfg.name,
                            self.cfg.partition_share * 100.0
                        ),
                        Severity::Warning,
                    )
                } else {
                    ("DetectorRejoined", format!("detector {} reaches the nodes again", self.cfg.name), Severity::Info)
                };
                let o = Observation {
                    time: Some(nodekeeper_common::time::now_timestamp()),
                    r#type: reason.into(),
                    reason: reason.into(),
                    message,
                    severity: severity as i32,
                    category: Category::Network as i32,
                    source: "detector".into(),
                    ..Default::default()
                };
                let id = report_id(&self.cfg.name, &mut self.counter, reason);
                out.push(Report { report_id: id, cluster, node: self.cfg.name.clone(), observation: Some(o) });
            }
        }
        out
    }

    async fn send(&self, reports: Vec<Report>) -> Result<(), tonic::Status> {
        for chunk in reports.chunks(500) {
            ReportServiceClient::new(self.channel.clone())
                .report(ReportRequest { producer: self.cfg.name.clone(), reports: chunk.to_vec() })
                .await?;
            self.metrics.reports.inc_by(chunk.len() as u64);
        }
        Ok(())
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Suspects are due every suspect_interval: a tick of a fifth of a second keeps them close
        // to it without scanning every node ten times a second.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(self.cfg.refresh_interval);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limit = Arc::new(tokio::sync::Semaphore::new(self.cfg.concurrency));
        let mut probes: JoinSet<((String, String), ProbeResult)> = JoinSet::new();
        let mut unsent: Vec<Report> = Vec::new();
        // Views change only with probe results: reports are looked at after those, and once a
        // second for repeats, a partition that passed and reports to retry.
        let (mut dirty, mut looked) = (false, Instant::now());
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = refresh.tick() => {
                    if let Err(s) = self.refresh().await {
                        tracing::warn!(error = %s.message(), "cannot read the nodes from the center");
                    }
                }
                Some(done) = probes.join_next() => {
                    if let Ok((key, r)) = done {
                        if let Some(st) = self.nodes.get_mut(&key) {
                            st.flying = st.flying.saturating_sub(1);
                        }
                        self.apply(&key, r);
                        dirty = true;
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let now_unix = unix_now();
                    let mut suspected = 0;
                    let mut due = Vec::new();
                    // Witnesses: a few random nodes that are not suspected (any replica's share).
                    let witness_odds = if std::mem::take(&mut self.witnesses_wanted) {
                        WITNESSES as f64 / self.nodes.len().max(1) as f64
                    } else {
                        0.0
                    };
                    for (key, st) in &mut self.nodes {
                        let suspect = st.suspected(self.cfg.phi_threshold, now_unix);
                        suspected += usize::from(suspect);
                        // A suspect is probed at once and then every suspect_interval, whatever
                        // the sweep's schedule; the others when the sweep comes to them.
                        let is_due = if suspect {
                            st.flying < MAX_OVERLAP
                                && st.last_probe.is_none_or(|t| now >= t + self.cfg.suspect_interval)
                        } else {
                            st.flying == 0
                                && ((st.mine && now >= st.next_sweep) || (witness_odds > 0.0 && rand::random::<f64>() < witness_odds))
                        };
                        if is_due {
                            st.last_probe = Some(now);
                            st.next_sweep = now + self.cfg.sweep_interval;
                            st.flying += 1;
                            due.push((key.clone(), st.target.clone(), suspect));
                        }
                    }
                    for (key, target, full) in due {
                        let (limit, timeout) = (limit.clone(), self.cfg.probe_timeout);
                        let kubelet = probe::KubeletPorts { port: self.cfg.kubelet_port, healthz: self.cfg.kubelet_healthz_port };
                        let icmp = self.icmp.clone();
                        probes.spawn(async move {
                            let _permit = limit.acquire_owned().await;
                            (key, probe::probe(&target, kubelet, icmp.as_ref(), timeout, full).await)
                        });
                    }
                    self.metrics.suspected.set(suspected as i64);
                    if !dirty && now < looked + Duration::from_secs(1) {
                        continue;
                    }
                    (dirty, looked) = (false, now);
                    let (partitioned, probed, silent) = self.partition_check(now);
                    let changed = partitioned != self.partitioned;
                    if changed {
                        self.partitioned = partitioned;
                        self.metrics.partitioned.set(i64::from(partitioned));
                        if partitioned {
                            tracing::warn!(probed, silent, "most nodes are unreachable at once: this detector suspects itself and declares no node faulty");
                        } else {
                            tracing::info!(probed, silent, "the nodes answer again: this detector reports again");
                            // What was seen while cut off is no evidence: back to what was last
                            // reported, and confirmations start over.
                            for st in self.nodes.values_mut() {
                                st.failures = 0;
                                st.kubelet_failures = 0;
                                st.view = st.reported.as_ref().map(|(v, _)| v.clone()).unwrap_or_default();
                            }
                        }
                    }
                    unsent.extend(self.due_reports(changed));
                    if !unsent.is_empty() {
                        match self.send(unsent.clone()).await {
                            Ok(()) => unsent.clear(),
                            Err(s) => tracing::warn!(error = %s.message(), pending = unsent.len(), "cannot report to the center; will retry"),
                        }
                    }
                }
            }
        }
        if !unsent.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.send(unsent)).await;
        }
        tracing::info!("detector stopped");
    }
}

fn report_id(name: &str, counter: &mut u64, what: &str) -> String {
    *counter += 1;
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("{name}-{what}-{t}-{counter}")
}

fn verdict_report(cluster: &str, node: &str, verdict: &str, holds: bool, evidence: &str, id: String) -> Report {
    let status = if holds { ConditionStatus::True } else { ConditionStatus::False };
    let reason = if holds { verdict.to_owned() } else { format!("No{verdict}") };
    let message = if holds { evidence.to_owned() } else { format!("answers again: {evidence}") };
    let o = Observation {
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: verdict.into(),
        reason: reason.clone(),
        message: message.clone(),
        severity: Severity::Error as i32,
        category: Category::Network as i32,
        action: RecommendedAction::Manual as i32,
        condition: Some(Condition {
            r#type: verdict.into(),
            status: status as i32,
            reason,
            message,
            last_transition_time: Some(nodekeeper_common::time::now_timestamp()),
        }),
        source: "detector".into(),
        ..Default::default()
    };
    Report { report_id: id, cluster: cluster.into(), node: node.into(), observation: Some(o) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probed_address_is_the_first_usable_ipv4() {
        use nodekeeper_proto::v1::{Inventory, NetworkInterface};
        let node = |addrs: &[&str]| Node {
            inventory: Some(Inventory {
                interfaces: vec![
                    NetworkInterface {
                        name: "lo".into(),
                        addresses: vec!["127.0.0.1/8".into(), "::1/128".into()],
                        ..Default::default()
                    },
                    NetworkInterface {
                        name: "eth0".into(),
                        addresses: addrs.iter().map(|a| a.to_string()).collect(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(address(&node(&["fd00::5/64", "10.0.0.5/24", "10.0.0.6/24"])), ip("10.0.0.5"));
        assert_eq!(address(&node(&["fd00::5/64", "fd00::6/64"])), ip("fd00::5"));
        assert_eq!(address(&node(&["0.0.0.0/0"])), None, "loopback and unspecified name no node");
        assert_eq!(address(&Node::default()), None);
    }

    #[test]
    fn shares_split_the_nodes() {
        let counts = (0..1000).fold([0usize; 3], |mut c, i| {
            c[share_of(&format!("node-{i}"), 3)] += 1;
            c
        });
        assert!(counts.iter().all(|&n| n > 250), "{counts:?}");
        assert_eq!(share_of("node-1", 1), 0);
    }
}

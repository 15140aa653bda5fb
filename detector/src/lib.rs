//! nodekeeper-detector: probes nodes from outside and reports what the agents cannot say
//! themselves: `AgentDown` (the node answers, its agent does not), `KubeletDown`, and
//! `NodeUnreachable` (nothing answers), and their recovery.
//!
//! - The node list, addresses, agent status ports and heartbeat times come from the event center
//!   (`ListNodes`, every `refresh_interval`). Heartbeat arrivals feed a phi-accrual suspicion
//!   level per node; a suspected node (phi above the threshold, or a failed probe) is probed every
//!   `suspect_interval` by every replica, the others once per `sweep_interval` by the replica
//!   whose share they are.
//! - A verdict needs `confirmations` consecutive failed probes. The center folds the replicas'
//!   views with its quorum; a detector that finds more than `partition_share` of the nodes it
//!   probed unreachable at once suspects itself, reports `DetectorPartitioned`, and declares no
//!   node faulty until that passes.
//! - Views are reported when they change (and at start), and views that a node is down again every
//!   `repeat_interval`.

pub mod config;
pub mod phi;
pub mod probe;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nodekeeper_proto::v1::{
    Category, Condition, ConditionStatus, ListNodesRequest, Node, Observation, RecommendedAction, Report,
    ReportRequest, Severity, fleet_service_client::FleetServiceClient, report_service_client::ReportServiceClient,
};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use config::Config;
use probe::{ProbeResult, Reach, Target};

pub const VERDICTS: [&str; 3] = ["AgentDown", "KubeletDown", "NodeUnreachable"];

/// Probes of one suspected node in flight at once.
const MAX_OVERLAP: usize = 3;

/// Counters for /metrics.
#[derive(Default)]
pub struct Stats {
    pub probes: AtomicU64,
    pub probes_failed: AtomicU64,
    pub reports: AtomicU64,
    pub suspected: AtomicU64,
    pub partitioned: AtomicU64,
    pub probe_micros: AtomicU64,
}

struct NodeState {
    target: Target,
    phi: phi::Phi,
    last_heartbeat: Option<f64>,
    failures: u32,
    kubelet_failures: u32,
    next_probe: Instant,
    /// The last probe's outcome: did anything on the node answer?
    answered: Option<(bool, Instant)>,
    evidence: String,
    /// Confirmed verdicts.
    view: BTreeSet<&'static str>,
    /// What was last reported, and when.
    reported: Option<(BTreeSet<&'static str>, Instant)>,
    mine: bool,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// The address a detector probes: the node's first non-loopback IPv4 address, else IPv6.
pub fn address(n: &Node) -> Option<IpAddr> {
    let mut addrs: Vec<IpAddr> = n
        .inventory
        .as_ref()?
        .interfaces
        .iter()
        .flat_map(|i| i.addresses.iter())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .filter(|a: &IpAddr| !a.is_loopback() && !a.is_unspecified())
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.first().copied()
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
    pub stats: Arc<Stats>,
    counter: u64,
}

impl Detector {
    pub fn new(cfg: Config, channel: Channel) -> Detector {
        Detector { cfg, channel, nodes: HashMap::new(), partitioned: false, stats: Arc::default(), counter: 0 }
    }

    /// Reads the node list and heartbeat times.
    async fn refresh(&mut self) -> Result<(), tonic::Status> {
        let nodes = FleetServiceClient::new(self.channel.clone())
            .list_nodes(ListNodesRequest { clusters: self.cfg.clusters.clone() })
            .await?
            .into_inner()
            .nodes;
        let now = Instant::now();
        let mut seen = BTreeSet::new();
        for n in nodes {
            let Some(addr) = address(&n) else { continue };
            let key = (n.cluster.clone(), n.name.clone());
            seen.insert(key.clone());
            let target =
                Target { cluster: n.cluster.clone(), node: n.name.clone(), addr, status_port: n.status_port as u16 };
            let interval = nodekeeper_common::time::from_duration(n.heartbeat_interval.as_ref())
                .unwrap_or(Duration::from_secs(10));
            let sweep = self.cfg.sweep_interval;
            let mine = share_of(&n.name, self.cfg.replicas) == self.cfg.replica;
            let st = self.nodes.entry(key).or_insert_with(|| NodeState {
                target: target.clone(),
                // Suspicion only makes a node probed every second (verdicts need failed probes),
                // so it may come early: a twentieth of the interval as the deviation floor puts
                // it about 3 s after a 10 s heartbeat is due.
                phi: phi::Phi::new(interval.as_secs_f64() / 20.0, interval.as_secs_f64() * 2.0),
                last_heartbeat: None,
                failures: 0,
                kubelet_failures: 0,
                // Spread the first sweep over the interval.
                next_probe: now + sweep.mul_f64(rand::random::<f64>()),
                answered: None,
                evidence: String::new(),
                view: BTreeSet::new(),
                reported: None,
                mine,
            });
            st.target = target;
            st.mine = mine;
            if let Some(hb) = n.last_heartbeat_time.as_ref() {
                let t = hb.seconds as f64 + f64::from(hb.nanos) / 1e9;
                if st.last_heartbeat != Some(t) {
                    st.last_heartbeat = Some(t);
                    st.phi.arrival(t);
                }
            }
        }
        self.nodes.retain(|k, _| seen.contains(k));
        Ok(())
    }

    fn suspected(&self, st: &NodeState, now_unix: f64) -> bool {
        st.failures > 0
            || st.kubelet_failures > 0
            || !st.view.is_empty()
            || st.phi.phi(now_unix) >= self.cfg.phi_threshold
    }

    /// Applies one probe's result to a node's state.
    fn apply(&mut self, key: &(String, String), r: ProbeResult) {
        let confirmations = self.cfg.confirmations;
        let Some(st) = self.nodes.get_mut(key) else { return };
        self.stats.probes.fetch_add(1, Ordering::Relaxed);
        self.stats.probe_micros.fetch_add(r.latency.as_micros() as u64, Ordering::Relaxed);
        let answered = r.agent != Reach::NoAnswer || r.kubelet.is_some_and(|k| k != Reach::NoAnswer);
        st.answered = Some((answered, Instant::now()));
        st.evidence = r.evidence();
        let agent_ok = r.agent_healthy;
        if agent_ok {
            st.failures = 0;
            st.view.remove("AgentDown");
            st.view.remove("NodeUnreachable");
        } else {
            self.stats.probes_failed.fetch_add(1, Ordering::Relaxed);
            st.failures += 1;
            if st.failures >= confirmations {
                let (set, clear) =
                    if answered { ("AgentDown", "NodeUnreachable") } else { ("NodeUnreachable", "AgentDown") };
                st.view.insert(set);
                st.view.remove(clear);
            }
        }
        match r.kubelet {
            Some(Reach::Ok) | None => {
                st.kubelet_failures = 0;
                st.view.remove("KubeletDown");
            }
            // The node answers on another port but the kubelet does not.
            Some(_) if answered && agent_ok => {
                st.kubelet_failures += 1;
                if st.kubelet_failures >= confirmations {
                    st.view.insert("KubeletDown");
                }
            }
            Some(_) => {}
        }
        if !answered {
            st.view.remove("KubeletDown");
        }
    }

    /// True when more than `partition_share` of the nodes probed recently did not answer at all.
    fn partition_check(&self) -> bool {
        let recent = self.cfg.sweep_interval + self.cfg.suspect_interval * 2;
        let (mut probed, mut silent) = (0usize, 0usize);
        for st in self.nodes.values() {
            if let Some((answered, at)) = st.answered
                && at.elapsed() <= recent
            {
                probed += 1;
                if !answered {
                    silent += 1;
                }
            }
        }
        probed >= 2 && silent as f64 > self.cfg.partition_share * probed as f64
    }

    fn report_id(&mut self, what: &str) -> String {
        self.counter += 1;
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        format!("{}-{what}-{t}-{}", self.cfg.name, self.counter)
    }

    /// The reports due: changed views, views repeated, the partition status.
    fn due_reports(&mut self, partition_changed: bool) -> Vec<Report> {
        let mut out = Vec::new();
        let repeat = self.cfg.repeat_interval;
        let keys: Vec<(String, String)> = self.nodes.keys().cloned().collect();
        let mut clusters = BTreeSet::new();
        for key in keys {
            let (cluster, node) = key.clone();
            clusters.insert(cluster.clone());
            let st = &self.nodes[&key];
            // While partitioned, only recoveries are reported: nothing is declared faulty.
            let mut view = st.view.clone();
            if self.partitioned {
                let held = st.reported.as_ref().map(|(v, _)| v.clone()).unwrap_or_default();
                view.retain(|v| held.contains(v));
            }
            let due = match &st.reported {
                None => true,
                Some((v, at)) => *v != view || (!view.is_empty() && at.elapsed() >= repeat),
            };
            if !due {
                continue;
            }
            let previous = st.reported.as_ref().map(|(v, _)| v.clone());
            let evidence = format!("{} (detector {})", st.evidence, self.cfg.name);
            for verdict in VERDICTS {
                let holds = view.contains(verdict);
                // Report a verdict that holds, changed, or the first time a node is seen.
                if !holds && previous.as_ref().is_some_and(|p| !p.contains(verdict)) {
                    continue;
                }
                let id = self.report_id(&format!("{node}-{verdict}"));
                out.push(verdict_report(&cluster, &node, verdict, holds, &evidence, id));
            }
            self.nodes.get_mut(&key).expect("present").reported = Some((view, Instant::now()));
        }
        if partition_changed {
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
                let id = self.report_id(reason);
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
            self.stats.reports.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(self.cfg.refresh_interval);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limit = Arc::new(tokio::sync::Semaphore::new(self.cfg.concurrency));
        let mut probes: JoinSet<((String, String), ProbeResult)> = JoinSet::new();
        // Probes in flight per node: a suspect gets a new probe every suspect_interval even while
        // earlier ones wait for their timeout (up to MAX_OVERLAP), so that confirmations take
        // about confirmations × suspect_interval rather than × probe_timeout.
        let mut in_flight: HashMap<(String, String), usize> = HashMap::new();
        let mut unsent: Vec<Report> = Vec::new();
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
                        if let Some(n) = in_flight.get_mut(&key) {
                            *n -= 1;
                            if *n == 0 {
                                in_flight.remove(&key);
                            }
                        }
                        self.apply(&key, r);
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let now_unix = unix_now();
                    let mut suspected = 0;
                    let keys: Vec<(String, String)> = self.nodes.keys().cloned().collect();
                    for key in keys {
                        let st = &self.nodes[&key];
                        let suspect = self.suspected(st, now_unix);
                        suspected += usize::from(suspect);
                        let flying = in_flight.get(&key).copied().unwrap_or(0);
                        let overlap = if suspect { MAX_OVERLAP } else { 1 };
                        if flying >= overlap || st.next_probe > now || !(suspect || st.mine) {
                            continue;
                        }
                        let interval = if suspect { self.cfg.suspect_interval } else { self.cfg.sweep_interval };
                        let target = st.target.clone();
                        self.nodes.get_mut(&key).expect("present").next_probe = now + interval;
                        let (limit, timeout, kubelet) = (limit.clone(), self.cfg.probe_timeout, self.cfg.kubelet_port);
                        *in_flight.entry(key.clone()).or_default() += 1;
                        probes.spawn(async move {
                            let _permit = limit.acquire_owned().await;
                            (key, probe::probe(&target, kubelet, timeout).await)
                        });
                    }
                    self.stats.suspected.store(suspected as u64, Ordering::Relaxed);
                    let partitioned = self.partition_check();
                    let changed = partitioned != self.partitioned;
                    if changed {
                        self.partitioned = partitioned;
                        self.stats.partitioned.store(u64::from(partitioned), Ordering::Relaxed);
                        if partitioned {
                            tracing::warn!("most nodes are unreachable at once: this detector suspects itself and declares no node faulty");
                        } else {
                            tracing::info!("the nodes answer again: this detector reports again");
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
    fn shares_split_the_nodes() {
        let counts = (0..1000).fold([0usize; 3], |mut c, i| {
            c[share_of(&format!("node-{i}"), 3)] += 1;
            c
        });
        assert!(counts.iter().all(|&n| n > 250), "{counts:?}");
        assert_eq!(share_of("node-1", 1), 0);
    }
}

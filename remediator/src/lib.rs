//! nodekeeper-remediator: a durable subscriber of one cluster's faults that isolates faulty nodes,
//! labels their pods to be migrated, recovers them, releases them when their readiness gates hold,
//! and escalates to people when it cannot heal them.
//!
//! Every step is recorded on the fault (`RecordStep`), which is also where a restarted remediator
//! learns how far it got: the state lives in the center and on the Kubernetes node (our
//! annotations), not in this process. Before each disruptive step the fault must still be open and
//! the node still in the boot the fault saw, so replayed or stale events never act.

mod center;
pub mod conditions;
pub mod config;
mod events;
pub mod kube;
pub mod leader;
pub mod nodesync;
mod playbook;
pub mod rollouts;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::v1::{
    AckConsumerRequest, ConditionStatus, EventFilter, EventKind, Fault, FaultState, GetFaultRequest, GetFaultResponse,
    ListConsumersRequest, ListFaultsRequest, StartPosition, SubscribeRequest, event_service_client::EventServiceClient,
    fleet_service_client::FleetServiceClient, subscribe_response,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{Config, Playbook};
use crate::kube::Kube;

/// Remediations started, by node: (fault id, when).
type Starts = HashMap<String, Vec<(u64, SystemTime)>>;

pub struct Remediator {
    cfg: Config,
    ch: Channel,
    kube: Option<Kube>,
    http: reqwest::Client,
    /// Nodes with a remediation running, and the faults of that node that came in meanwhile
    /// (considered when it ends: one remediation per node at a time, no fault left behind).
    busy: Mutex<HashMap<String, BTreeSet<u64>>>,
    /// Those faults, handed back to the follow loop when their node's remediation ended.
    again: tokio::sync::mpsc::UnboundedSender<u64>,
    again_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<u64>>,
    /// Remediations started, by node: (fault id, when). Read once from the center's log, then
    /// kept up to date here.
    starts: tokio::sync::Mutex<Option<Starts>>,
    cancel: CancellationToken,
    /// Steps by name and outcome, for `/metrics`.
    steps: Family<Vec<(&'static str, String)>, Counter>,
    /// Nodes waiting to onboard, shared with the node sync, for `/metrics`.
    onboarding: nodesync::Waiting,
    /// This replica acts (it leads, or there is no election).
    leading: std::sync::atomic::AtomicBool,
}

/// How a remediation ended, or why a step could not go on.
#[derive(Debug)]
enum Stop {
    /// The fault is no longer what we acted on (resolved, escalated by someone, another boot).
    Stale(String),
    /// Shutting down: the next start resumes from the fault's timeline.
    Shutdown,
    /// A step failed beyond its deadline: escalate.
    Failed(String),
}

type Step<T> = Result<T, Stop>;

fn rpc(what: &str) -> impl FnOnce(tonic::Status) -> Stop + '_ {
    move |s| Stop::Failed(format!("{what}: {}", s.message()))
}

/// One remediation of one node, for the fault that started it.
struct Run {
    fault: Fault,
    playbook: Playbook,
    /// The boot the node must still be in for disruptive steps (the fault's, then the one it came
    /// back in after our reboot).
    boot_id: String,
    isolate_permit: Option<String>,
    /// Held from the reboot until `verify` sees the node back (or gives up).
    reboot_permit: Option<String>,
    isolated: bool,
    rebooted: bool,
    deadline: Instant,
}

impl Remediator {
    pub async fn new(cfg: Config, ch: Channel, cancel: CancellationToken) -> anyhow::Result<Arc<Remediator>> {
        let kube = if cfg.dry_run && cfg.kubeconfig.is_none() {
            None
        } else {
            Some(Kube::connect(cfg.kubeconfig.as_deref(), &cfg.name).await?)
        };
        nodekeeper_common::tls::install_default_provider();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let (again, again_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Arc::new(Remediator {
            cfg,
            ch,
            kube,
            http,
            busy: Mutex::default(),
            again,
            again_rx: tokio::sync::Mutex::new(again_rx),
            starts: Default::default(),
            cancel,
            steps: Family::default(),
            onboarding: nodesync::Waiting::default(),
            leading: Default::default(),
        }))
    }

    /// The node conditions exporter for this cluster, when it is on (not in a dry run, and with
    /// Kubernetes access).
    pub fn conditions_exporter(&self) -> Option<conditions::Exporter> {
        let kube = self.kube.as_ref().filter(|_| self.cfg.node_conditions.enabled && !self.cfg.dry_run)?;
        Some(conditions::Exporter::new(
            self.cfg.node_conditions.clone(),
            self.cfg.cluster.clone(),
            self.ch.clone(),
            kube.client(),
            self.cancel.child_token(),
        ))
    }

    /// The Kubernetes node sync (labels, onboarding, deletions) for this cluster, when it is on
    /// (not in a dry run, and with Kubernetes access).
    pub fn node_sync(&self) -> Option<nodesync::NodeSync> {
        let kube = self.kube.as_ref().filter(|_| self.cfg.kubernetes_nodes.enabled && !self.cfg.dry_run)?;
        Some(nodesync::NodeSync::new(
            self.cfg.kubernetes_nodes.clone(),
            self.cfg.cluster.clone(),
            self.ch.clone(),
            kube.clone(),
            self.onboarding.clone(),
            self.cancel.child_token(),
        ))
    }

    /// The Kubernetes work of this cluster's rollouts (drain, uncordon), when there is
    /// Kubernetes access and this is not a dry run.
    pub fn rollout_worker(&self) -> Option<std::sync::Arc<rollouts::NodeWorker>> {
        let kube = self.kube.as_ref().filter(|_| !self.cfg.dry_run)?;
        Some(std::sync::Arc::new(rollouts::NodeWorker::new(
            self.cfg.cluster.clone(),
            self.ch.clone(),
            kube.clone(),
            self.cancel.child_token(),
        )))
    }

    /// The leader election of this cluster's replicas, when it is on.
    pub fn elector(&self) -> anyhow::Result<Option<leader::Elector>> {
        let cfg = &self.cfg.leader_election;
        if !cfg.enabled {
            return Ok(None);
        }
        let Some(kube) = &self.kube else {
            anyhow::bail!("leader_election needs Kubernetes access (kubeconfig, or running in a pod)");
        };
        let mut cfg = cfg.clone();
        if cfg.lease_name.is_empty() {
            cfg.lease_name = format!("nodekeeper-remediator-{}", self.cfg.cluster);
        }
        let identity = if cfg.identity.is_empty() { leader::default_identity() } else { cfg.identity.clone() };
        Ok(Some(leader::Elector::new(kube.client(), cfg, identity)))
    }

    /// Whether this replica acts, for `/metrics`.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, std::sync::atomic::Ordering::Relaxed);
    }

    fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.ch.clone())
    }

    /// Resumes the remediations the center shows in progress, then follows the cluster's events
    /// from the consumer's acknowledged position (reconnecting with backoff) until cancelled.
    /// OpenMetrics text of the remediator's metrics.
    pub fn render_metrics(&self) -> String {
        let mut r = Registry::with_prefix("nodekeeper_remediator");
        r.register("steps", "Remediation steps recorded, by step and outcome (success, failure)", self.steps.clone());
        let active: Gauge = Gauge::default();
        active.set(self.busy.lock().expect("busy lock").len() as i64);
        r.register("active_remediations", "Nodes with a remediation in progress", active);
        let leader: Gauge = Gauge::default();
        leader.set(i64::from(self.leading.load(std::sync::atomic::Ordering::Relaxed)));
        r.register("leader", "1 while this replica acts (it leads, or leader election is off)", leader);
        let waiting = Family::<Vec<(&'static str, String)>, Gauge>::default();
        for (gate, nodes) in self.onboarding.by_gate() {
            waiting.get_or_create(&vec![("gate", gate)]).set(nodes as i64);
        }
        r.register(
            "onboarding_waiting_nodes",
            "Nodes carrying the startup taint, by the first readiness gate that holds them",
            waiting,
        );
        nodekeeper_common::metrics::encode(&r)
    }

    pub async fn run(self: Arc<Self>) {
        let mut backoff = nodekeeper_common::backoff::Backoff::default();
        let mut resumed = false;
        while !self.cancel.is_cancelled() {
            match self.clone().follow(&mut resumed).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "subscription ended; resubscribing"),
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn resume(self: &Arc<Self>) -> Result<(), String> {
        let active = [FaultState::Open, FaultState::Isolated, FaultState::Recovering];
        let faults = self
            .fleet()
            .list_faults(ListFaultsRequest {
                clusters: vec![self.cfg.cluster.clone()],
                states: active.iter().map(|s| *s as i32).collect(),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .faults;
        for f in faults {
            self.clone().consider(f.id, false).await;
        }
        // Nodes we isolated whose fault resolved while we were away: still ours to release.
        if let Some(kube) = &self.kube {
            for (node, fault_id) in kube.isolated_nodes().await.map_err(|e| e.to_string())? {
                tracing::info!(node = %node, fault_id, "resuming a node isolated before this start");
                self.clone().consider(fault_id, true).await;
            }
        }
        Ok(())
    }

    /// Subscribes, then (the first time) resumes what the center and the nodes show in progress:
    /// a fault opened in between is in the subscription, none falls between the two.
    async fn follow(self: Arc<Self>, resumed: &mut bool) -> Result<(), String> {
        let mut events = EventServiceClient::new(self.ch.clone());
        // A known consumer resumes where it acknowledged; a new one starts where configured.
        let known = events
            .list_consumers(ListConsumersRequest {})
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .consumers
            .iter()
            .any(|c| c.name == self.cfg.name);
        let start = match (known, self.cfg.start_from.as_str()) {
            (true, _) => StartPosition::Unspecified,
            (false, "oldest") => StartPosition::Oldest,
            (false, _) => StartPosition::Now,
        };
        let mut stream = events
            .subscribe(SubscribeRequest {
                consumer: self.cfg.name.clone(),
                start: start as i32,
                // Faults open with condition events; the rest is looked up when needed.
                filter: Some(EventFilter {
                    clusters: vec![self.cfg.cluster.clone()],
                    kinds: vec![EventKind::Condition as i32],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        if !*resumed {
            self.resume().await?;
            *resumed = true;
        }
        tracing::info!(consumer = %self.cfg.name, cluster = %self.cfg.cluster, "following the cluster's faults");
        // Acknowledged at most once a second (and with each bookmark when idle): a restart replays
        // that much, and a replayed event is harmless (a fault is looked up, never trusted).
        let mut acked = Instant::now();
        let mut again = self.again_rx.lock().await;
        loop {
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                Some(fault_id) = again.recv() => {
                    self.clone().consider(fault_id, false).await;
                    continue;
                }
                m = stream.message() => m.map_err(|s| s.message().to_owned())?,
            };
            let Some(msg) = msg else { return Err("the center ended the stream".into()) };
            let (cursor, idle) = match msg.msg {
                Some(subscribe_response::Msg::Event(e)) => {
                    if e.fault_id != 0 && e.condition.as_ref().is_some_and(|c| c.status() == ConditionStatus::True) {
                        self.clone().consider(e.fault_id, false).await;
                    }
                    (e.cursor, false)
                }
                Some(subscribe_response::Msg::Bookmark(b)) => (b.cursor, true),
                None => continue,
            };
            if idle || acked.elapsed() >= Duration::from_secs(1) {
                events
                    .ack_consumer(AckConsumerRequest { consumer: self.cfg.name.clone(), cursor })
                    .await
                    .map_err(|s| s.message().to_owned())?;
                acked = Instant::now();
            }
        }
    }

    /// Starts remediating the fault's node unless the fault is stale or the node is in hand;
    /// `isolated`: we hold the node isolated for this fault, so it goes on (to its release) even
    /// if the fault is over.
    async fn consider(self: Arc<Self>, fault_id: u64, isolated: bool) {
        let (fault, timeline) = match self.fleet().get_fault(GetFaultRequest { id: fault_id }).await {
            Ok(r) => match r.into_inner() {
                GetFaultResponse { fault: Some(f), events } => (f, events),
                _ => return,
            },
            Err(s) => {
                tracing::warn!(fault_id, error = %s.message(), "cannot read the fault");
                return;
            }
        };
        let wanted = match fault.state() {
            FaultState::Open | FaultState::Isolated | FaultState::Recovering => true,
            FaultState::Resolved => isolated,
            _ => false,
        };
        if !wanted {
            return;
        }
        let Some(playbook) = self.playbook(&fault) else {
            tracing::debug!(fault_id, kind = %fault.r#type, "no playbook for this fault");
            return;
        };
        {
            let mut busy = self.busy.lock().expect("busy lock");
            if let Some(waiting) = busy.get_mut(&fault.node) {
                waiting.insert(fault.id);
                return;
            }
            busy.insert(fault.node.clone(), BTreeSet::new());
        }
        let this = self.clone();
        tokio::spawn(async move {
            let node = fault.node.clone();
            let id = fault.id;
            let outcome = this.remediate(fault, &timeline, playbook).await;
            match &outcome {
                Ok(()) => tracing::info!(node = %node, fault_id = id, "remediation ended"),
                Err(Stop::Stale(why)) => {
                    tracing::info!(node = %node, fault_id = id, reason = %why, "stale fault: nothing done")
                }
                Err(Stop::Shutdown) => {}
                Err(Stop::Failed(why)) => {
                    tracing::warn!(node = %node, fault_id = id, reason = %why, "remediation escalated")
                }
            }
            let waiting = this.busy.lock().expect("busy lock").remove(&node).unwrap_or_default();
            for fault_id in waiting.into_iter().filter(|w| *w != id) {
                // The follow loop considers it (a closed channel: shutting down).
                let _ = this.again.send(fault_id);
            }
        });
    }

    fn playbook(&self, fault: &Fault) -> Option<Playbook> {
        let action = fault
            .action()
            .as_str_name()
            .trim_start_matches("RECOMMENDED_ACTION_")
            .to_ascii_lowercase()
            .replace('_', "-");
        self.cfg.playbook.iter().find(|p| p.types.contains(&fault.r#type) || p.actions.contains(&action)).cloned()
    }
}

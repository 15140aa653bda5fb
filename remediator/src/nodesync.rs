//! The cluster's Kubernetes Nodes kept in step with the center:
//!
//! - **labels**: every Node's labels go to the center (`SyncKubernetesNode`), which merges them
//!   with the agent's for component selectors; only changes are sent after the first pass;
//! - **onboarding**: a Node that carries the startup taint (kubelet `--register-with-taints`)
//!   waits; its gates (the center's: agent connected, components converged, no open fault, the
//!   operators' conditions) are checked every `onboarding_check`, and when all hold the taint is
//!   removed and the center records NodeOnboarded. Onboarding never adds the taint: a node whose
//!   gates fail later is isolation's business;
//! - **deletion**: a node the center knows from Kubernetes that is gone from the list, and whose
//!   agent is not connected, is decommissioned; more than `max_decommissions_per_pass` at once are
//!   left to a person.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use nodekeeper_proto::v1::{
    DecommissionNodeRequest, GetNodeRequest, ListNodesRequest, SyncKubernetesNodeRequest,
    fleet_service_client::FleetServiceClient,
};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::config::KubernetesNodesConfig;
use crate::kube::{Kube, tainted};

/// The nodes waiting to onboard, each with the first gate that holds it and why ("" before its
/// first check); shared with `/metrics`.
#[derive(Clone, Default)]
pub struct Waiting(Arc<Mutex<BTreeMap<String, (String, String)>>>);

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, String)>> {
        self.0.lock().expect("onboarding lock")
    }

    /// How many nodes each gate holds ("unchecked": not checked yet).
    pub fn by_gate(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (gate, _) in self.lock().values() {
            let gate = if gate.is_empty() { "unchecked" } else { gate };
            *out.entry(gate.to_owned()).or_default() += 1;
        }
        out
    }
}

/// SyncKubernetesNode calls in flight at once.
const TELL_AT_ONCE: usize = 32;

/// Tells the center what Kubernetes says of a node; true once the center has it.
async fn tell(
    mut fleet: FleetServiceClient<Channel>,
    cluster: String,
    name: &str,
    (labels, onboarding): &Synced,
    onboarded: bool,
) -> bool {
    let request = SyncKubernetesNodeRequest {
        cluster,
        node: name.to_owned(),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        onboarding: *onboarding,
        onboarded,
    };
    match fleet.sync_kubernetes_node(request).await {
        Ok(_) => true,
        // Its agent has not registered yet: told at a later pass.
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => {
            tracing::warn!(node = name, error = %s.message(), "kubernetes nodes: cannot sync the node to the center");
            false
        }
    }
}

/// What the center was last told of a Node: its labels and whether it carries the startup taint.
type Synced = (BTreeMap<String, String>, bool);

pub struct NodeSync {
    cfg: KubernetesNodesConfig,
    cluster: String,
    ch: Channel,
    kube: Kube,
    cancel: CancellationToken,
    synced: HashMap<String, Synced>,
    /// Nodes carrying the startup taint, with why they wait (logged when it changes).
    waiting: Waiting,
}

impl NodeSync {
    pub fn new(
        cfg: KubernetesNodesConfig,
        cluster: String,
        ch: Channel,
        kube: Kube,
        waiting: Waiting,
        cancel: CancellationToken,
    ) -> Self {
        Self { cfg, cluster, ch, kube, cancel, synced: HashMap::new(), waiting }
    }

    fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.ch.clone())
    }

    /// Lists the Nodes every `sync_period` and checks the waiting ones every `onboarding_check`,
    /// until cancelled.
    pub async fn run(mut self) {
        let mut list = tokio::time::interval(self.cfg.sync_period);
        let mut check = tokio::time::interval(self.cfg.onboarding_check);
        list.set_missed_tick_behavior(MissedTickBehavior::Delay);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = list.tick() => {
                    if let Err(e) = self.sync().await {
                        tracing::warn!(error = %e, "kubernetes nodes: sync failed; trying again next period");
                    }
                }
                _ = check.tick() => self.onboard().await,
            }
        }
    }

    /// One pass over every Node: labels and startup taints to the center, deleted nodes
    /// decommissioned.
    async fn sync(&mut self) -> Result<(), String> {
        let started = std::time::Instant::now();
        let nodes = self.kube.all_nodes().await.map_err(|e| e.to_string())?;
        let listed = nodes.len();
        let mut seen = HashSet::new();
        let mut changed = Vec::new();
        for node in nodes {
            let Some(name) = node.metadata.name.clone() else { continue };
            let labels = node.metadata.labels.clone().unwrap_or_default();
            let onboarding = tainted(&node, &self.cfg.startup_taint);
            seen.insert(name.clone());
            if onboarding {
                self.waiting.lock().entry(name.clone()).or_default();
            } else {
                self.waiting.lock().remove(&name);
            }
            let now = (labels, onboarding);
            if self.synced.get(&name) != Some(&now) {
                changed.push((name, now));
            }
        }
        let told = changed.len();
        // Several at once, so that the center commits them in groups (a first pass has every node).
        let limit = Arc::new(tokio::sync::Semaphore::new(TELL_AT_ONCE));
        let mut tasks = tokio::task::JoinSet::new();
        for (name, state) in changed {
            let permit = limit.clone().acquire_owned().await.expect("the semaphore is never closed");
            let (fleet, cluster) = (self.fleet(), self.cluster.clone());
            tasks.spawn(async move {
                let ok = tell(fleet, cluster, &name, &state, false).await;
                drop(permit);
                (name, state, ok)
            });
            while let Some(done) = tasks.try_join_next() {
                self.remember(done);
            }
        }
        while let Some(done) = tasks.join_next().await {
            self.remember(done);
        }
        if told > 0 {
            tracing::info!(nodes = listed, changed = told, took = ?started.elapsed(), "kubernetes nodes: synced to the center");
        }
        self.synced.retain(|n, _| seen.contains(n));
        self.waiting.lock().retain(|n, _| seen.contains(n));
        self.decommission_gone(&seen).await
    }

    /// What the center was told of a node, once it has it.
    fn remember(&mut self, done: Result<(String, Synced, bool), tokio::task::JoinError>) {
        match done {
            Ok((name, state, true)) => {
                self.synced.insert(name, state);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "kubernetes nodes: a sync task failed"),
        }
    }

    async fn decommission_gone(&mut self, seen: &HashSet<String>) -> Result<(), String> {
        let request = ListNodesRequest { clusters: vec![self.cluster.clone()], brief: true, ..Default::default() };
        let known = self.fleet().list_nodes(request).await.map_err(|s| s.message().to_owned())?.into_inner().nodes;
        let gone: Vec<String> = known
            .into_iter()
            .filter(|n| n.kubernetes_synced_time.is_some() && !n.connected && !seen.contains(&n.name))
            .map(|n| n.name)
            .collect();
        if gone.len() > self.cfg.max_decommissions_per_pass {
            tracing::error!(
                nodes = gone.len(),
                max = self.cfg.max_decommissions_per_pass,
                "kubernetes nodes: more nodes gone from Kubernetes than max_decommissions_per_pass; decommissioning none \
                 (check the kubeconfig; `nodekeeper nodes delete` takes them one by one)"
            );
            return Ok(());
        }
        for node in gone {
            let request = DecommissionNodeRequest {
                cluster: self.cluster.clone(),
                node: node.clone(),
                reason: "deleted from Kubernetes".into(),
            };
            match self.fleet().decommission_node(request).await {
                Ok(r) => tracing::info!(node = %node, faults_closed = r.into_inner().faults_closed,
                    "kubernetes nodes: node deleted from Kubernetes decommissioned"),
                // Its agent connected meanwhile (a Node deleted and registering again).
                Err(s) if s.code() == Code::FailedPrecondition => {}
                Err(s) => tracing::warn!(node = %node, error = %s.message(), "kubernetes nodes: cannot decommission"),
            }
        }
        Ok(())
    }

    /// Checks the gates of each waiting node; removes the startup taint of those whose gates hold.
    async fn onboard(&mut self) {
        let names: Vec<String> = self.waiting.lock().keys().cloned().collect();
        for name in names {
            let request = GetNodeRequest { cluster: self.cluster.clone(), node: name.clone() };
            let failing = match self.fleet().get_node(request).await {
                Ok(node) => node.into_inner().gates.into_iter().find(|g| !g.holds).map(|g| (g.name, g.reason)),
                Err(s) if s.code() == Code::NotFound => {
                    Some(("agent connected".into(), "the node is not registered".into()))
                }
                Err(s) => {
                    tracing::warn!(node = %name, error = %s.message(), "kubernetes nodes: cannot read the node's gates");
                    continue;
                }
            };
            if let Some(failing) = failing {
                let mut waiting = self.waiting.lock();
                if waiting.get(&name) != Some(&failing) {
                    tracing::info!(node = %name, gate = %failing.0, why = %failing.1, "kubernetes nodes: waiting to onboard");
                    waiting.insert(name, failing);
                }
                continue;
            }
            match self.kube.remove_taint(&name, &self.cfg.startup_taint).await {
                Ok(_) => {
                    let labels = self.synced.get(&name).map(|s| s.0.clone()).unwrap_or_default();
                    let state = (labels, false);
                    if tell(self.fleet(), self.cluster.clone(), &name, &state, true).await {
                        self.synced.insert(name.clone(), state);
                        tracing::info!(node = %name, "kubernetes nodes: every gate holds; startup taint removed");
                        self.waiting.lock().remove(&name);
                    }
                }
                Err(e) => tracing::warn!(node = %name, error = %e, "kubernetes nodes: cannot remove the startup taint"),
            }
        }
    }
}

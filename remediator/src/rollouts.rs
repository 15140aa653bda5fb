//! The Kubernetes side of rollouts that drain their nodes: the center's controller decides, this
//! does. Every second (while this replica leads) it asks the center which nodes of the cluster's
//! rollouts wait for a cordon and drain (before their change) or an uncordon (after), does each,
//! a few at a time, and records it. The state is the center's (a node waits in `draining` until
//! its drain is recorded) and the node's (our annotations), so a restart of either side asks
//! again and finds the same work.
//!
//! Drain: cordon (noting whether someone else had cordoned the node), then evict its movable
//! pods through the Eviction API until none is left; a PodDisruptionBudget holds a pod back for
//! the next round, and the node fails once `timeout` is nearly over. Uncordon: only a node this
//! rollout cordoned, and never one someone else cordoned first or one isolated for a fault.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    NodeWork, NodeWorkAction, PendingNodeWorkRequest, RecordNodeWorkRequest,
    rollout_service_client::RolloutServiceClient,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::kube::{Kube, Released};

const POLL: Duration = Duration::from_secs(1);
/// Between eviction rounds of a node whose pods are not all gone.
const EVICT_AGAIN: Duration = Duration::from_secs(2);
/// Nodes worked on at once.
const AT_ONCE: usize = 32;

pub struct NodeWorker {
    cluster: String,
    ch: Channel,
    kube: Kube,
    cancel: CancellationToken,
    /// (rollout, node, action) being worked on.
    busy: Mutex<HashSet<(String, String, i32)>>,
}

impl NodeWorker {
    pub fn new(cluster: String, ch: Channel, kube: Kube, cancel: CancellationToken) -> NodeWorker {
        NodeWorker { cluster, ch, kube, cancel, busy: Mutex::default() }
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let request = PendingNodeWorkRequest { cluster: self.cluster.clone() };
            let work = match RolloutServiceClient::new(self.ch.clone()).pending_node_work(request).await {
                Ok(r) => r.into_inner().work,
                Err(s) => {
                    tracing::debug!(error = %s.message(), "rollouts' node work not read; asking again");
                    continue;
                }
            };
            for w in work {
                let key = (w.rollout.clone(), w.node.clone(), w.action);
                {
                    let mut busy = self.busy.lock().expect("busy lock");
                    if busy.len() >= AT_ONCE || !busy.insert(key.clone()) {
                        continue;
                    }
                }
                let me = self.clone();
                tokio::spawn(async move {
                    me.one(&w).await;
                    me.busy.lock().expect("busy lock").remove(&key);
                });
            }
        }
    }

    async fn one(&self, w: &NodeWork) {
        let (success, message) = match w.action() {
            NodeWorkAction::Drain => self.drain(w).await,
            NodeWorkAction::Uncordon => match self.kube.uncordon_after_rollout(&w.node).await {
                Ok(Released::Uncordoned) => (true, "uncordoned".to_owned()),
                Ok(Released::LeftCordoned) => {
                    (true, "left cordoned: it was cordoned before the rollout, or is isolated".to_owned())
                }
                Ok(Released::NotOurs) => (true, "not cordoned for this rollout: nothing to undo".to_owned()),
                Err(e) => (false, e.to_string()),
            },
            NodeWorkAction::Unspecified => return,
        };
        tracing::info!(rollout = %w.rollout, node = %w.node, action = w.action().as_str_name(), success, "{message}");
        let record = RecordNodeWorkRequest {
            rollout: w.rollout.clone(),
            node: w.node.clone(),
            action: w.action,
            success,
            message,
        };
        if let Err(s) = RolloutServiceClient::new(self.ch.clone()).record_node_work(record).await {
            // The next poll finds the node still waiting and does it again (both steps repeat
            // safely).
            tracing::warn!(rollout = %w.rollout, node = %w.node, error = %s.message(), "node work not recorded");
        }
    }

    async fn drain(&self, w: &NodeWork) -> (bool, String) {
        let was_cordoned = match self.kube.cordon_for_rollout(&w.node, &w.rollout).await {
            Ok(was) => was,
            Err(e) => return (false, format!("cannot cordon: {e}")),
        };
        // Leave a tenth of the time for the record and the uncordon.
        let timeout = nodekeeper_common::time::from_duration(w.timeout.as_ref()).unwrap_or(Duration::from_secs(600));
        let deadline = Instant::now() + timeout.mul_f64(0.9);
        let mut evicted = 0;
        loop {
            let (n, held) = match self.kube.evict(&w.node).await {
                Ok(r) => r,
                Err(e) => return (false, format!("cannot evict: {e}")),
            };
            evicted += n;
            match self.kube.pods_left(&w.node).await {
                Ok(0) => {
                    let before = if was_cordoned { " (it was cordoned already)" } else { "" };
                    return (true, format!("cordoned{before}; {evicted} pod(s) evicted"));
                }
                Ok(left) if Instant::now() >= deadline => {
                    return (false, format!("{left} pod(s) still on it ({held} held by a PodDisruptionBudget)"));
                }
                Ok(_) => {}
                Err(e) => return (false, format!("cannot list its pods: {e}")),
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return (false, "the remediator stopped".into()),
                _ = tokio::time::sleep(EVICT_AGAIN) => {}
            }
        }
    }
}

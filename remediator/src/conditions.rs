//! The center's node conditions on the Kubernetes Nodes, the way node-problem-detector's
//! Kubernetes exporter writes them: `status.conditions` through the status subresource, one
//! strategic merge patch per node (conditions merge by `type`, so other writers' conditions are
//! never touched) under our own field manager, with type, status, reason, message,
//! lastHeartbeatTime and lastTransitionTime (the center's, which changes only when the status
//! does).
//!
//! A node is written when one of its conditions or its liveness changes (the cluster's condition
//! and node events wake the exporter; it reads the node back from the center) and otherwise once
//! per `heartbeat_period`, which only moves lastHeartbeatTime. When a node's agent stops
//! reporting (liveness lost), the conditions the agent reported become Unknown from its last
//! heartbeat on, as node-problem-detector's users expect of a silent node; conditions other
//! producers report (the detector's NodeUnreachable) stay theirs. Kubernetes' own condition types
//! (Ready, MemoryPressure, ...) are never written. Temporary problems go to [`crate::events`].

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::{Api, Patch, PatchParams};
use nodekeeper_proto::v1::{
    ConditionStatus, EventFilter, EventKind, GetNodeRequest, ListConditionsRequest, ListNodesRequest, Liveness, Node,
    NodeCondition, StartPosition, SubscribeRequest, event_service_client::EventServiceClient,
    fleet_service_client::FleetServiceClient, subscribe_response,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{KUBERNETES_TYPES, NodeConditionsConfig};

/// Nodes whose conditions are listed in one request at the start of a subscription.
const LIST_CHUNK: usize = 200;

/// The producer name of the agent's own reports.
const AGENT: &str = "agent";

/// One condition as it goes on the Node (lastHeartbeatTime is added when written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeCondition {
    pub r#type: String,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    nodekeeper_common::time::rfc3339(&t.copied().unwrap_or_default())
}

/// What the Node's conditions must say of `node`, sorted by type; `rename` maps a center type to
/// the Node's (unlisted: the same, node-problem-detector's names).
pub fn desired(node: &Node, rename: &BTreeMap<String, String>) -> Vec<KubeCondition> {
    let silent = node.liveness() == Liveness::Lost;
    let mut out: Vec<KubeCondition> = node
        .conditions
        .iter()
        .filter_map(|nc| {
            let c = nc.condition.as_ref()?;
            let kind = rename.get(&c.r#type).unwrap_or(&c.r#type).clone();
            if kind.is_empty() || KUBERNETES_TYPES.contains(&kind.as_str()) {
                return None;
            }
            if silent && nc.producer == AGENT {
                // Unknown from the last heartbeat on, or from the condition's last change if the
                // agent reported that after its last heartbeat.
                let ms = |t: Option<&prost_types::Timestamp>| t.map(nodekeeper_common::time::timestamp_to_unix_ms);
                let since = if ms(c.last_transition_time.as_ref()) > ms(node.last_heartbeat_time.as_ref()) {
                    c.last_transition_time.as_ref()
                } else {
                    node.last_heartbeat_time.as_ref()
                };
                return Some(KubeCondition {
                    r#type: kind,
                    status: "Unknown",
                    reason: "NodekeeperAgentNotReporting".into(),
                    message: format!(
                        "the nodekeeper agent on this node has not reported since {}",
                        rfc3339(node.last_heartbeat_time.as_ref())
                    ),
                    last_transition_time: rfc3339(since),
                });
            }
            let status = match c.status() {
                ConditionStatus::True => "True",
                ConditionStatus::False => "False",
                _ => "Unknown",
            };
            let reason = if c.reason.is_empty() { c.r#type.clone() } else { c.reason.clone() };
            Some(KubeCondition {
                r#type: kind,
                status,
                reason,
                message: c.message.clone(),
                last_transition_time: rfc3339(c.last_transition_time.as_ref()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.r#type.cmp(&b.r#type));
    out.dedup_by(|a, b| a.r#type == b.r#type);
    out
}

/// The strategic merge patch that writes `conditions` with `heartbeat` as lastHeartbeatTime.
pub fn patch(conditions: &[KubeCondition], heartbeat: &str) -> Value {
    let list: Vec<Value> = conditions
        .iter()
        .map(|c| {
            json!({
                "type": c.r#type,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "lastHeartbeatTime": heartbeat,
                "lastTransitionTime": c.last_transition_time,
            })
        })
        .collect();
    json!({ "status": { "conditions": list } })
}

/// What was last written to a node, and when.
struct Written {
    conditions: Vec<KubeCondition>,
    at: Instant,
}

pub struct Exporter {
    cfg: NodeConditionsConfig,
    cluster: String,
    ch: Channel,
    nodes: Api<KubeNode>,
    cancel: CancellationToken,
    written: HashMap<String, Written>,
    events: crate::events::Recorder,
}

impl Exporter {
    pub fn new(
        cfg: NodeConditionsConfig,
        cluster: String,
        ch: Channel,
        client: kube::Client,
        cancel: CancellationToken,
    ) -> Exporter {
        let events = crate::events::Recorder::new(client.clone(), cfg.field_manager.clone());
        Exporter { cfg, cluster, ch, nodes: Api::all(client), cancel, written: HashMap::new(), events }
    }

    /// Follows the cluster until cancelled, resubscribing with backoff.
    pub async fn run(mut self) {
        let mut backoff = nodekeeper_common::backoff::Backoff::default();
        while !self.cancel.is_cancelled() {
            let started = Instant::now();
            if let Err(e) = self.session().await {
                tracing::warn!(error = %e, "node conditions: subscription ended; resubscribing");
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff.reset();
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One subscription: every node written once (where it differs), then each change as it
    /// comes and each heartbeat as it falls due.
    async fn session(&mut self) -> Result<(), String> {
        let kinds = vec![EventKind::Condition as i32, EventKind::Node as i32, EventKind::Observation as i32];
        let filter = EventFilter { clusters: vec![self.cluster.clone()], kinds, ..Default::default() };
        // Subscribed before listing: a change between the two is seen twice, never missed.
        let mut stream = EventServiceClient::new(self.ch.clone())
            .subscribe(SubscribeRequest {
                start: StartPosition::Now as i32,
                filter: Some(filter),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("subscribe: {}", s.message()))?
            .into_inner();
        // The nodes in brief (liveness and heartbeat times), their conditions a few hundred
        // nodes at a time: a whole cluster's conditions in one answer would pass gRPC's message
        // limit (5,000 nodes × 10 conditions do).
        let mut fleet = FleetServiceClient::new(self.ch.clone());
        let nodes = fleet
            .list_nodes(ListNodesRequest { clusters: vec![self.cluster.clone()], brief: true, ..Default::default() })
            .await
            .map_err(|s| format!("list nodes: {}", s.message()))?
            .into_inner()
            .nodes;
        for chunk in nodes.chunks(LIST_CHUNK) {
            let names = chunk.iter().map(|n| n.name.clone()).collect();
            let conditions = fleet
                .list_conditions(ListConditionsRequest { clusters: vec![self.cluster.clone()], nodes: names })
                .await
                .map_err(|s| format!("list conditions: {}", s.message()))?
                .into_inner()
                .conditions;
            let mut by_node: HashMap<String, Vec<NodeCondition>> = HashMap::new();
            for c in conditions {
                by_node.entry(c.node.clone()).or_default().push(c);
            }
            for node in chunk {
                let full = Node { conditions: by_node.remove(&node.name).unwrap_or_default(), ..node.clone() };
                self.export(&node.name, desired(&full, &self.cfg.rename), false).await;
            }
        }
        let mut tick = tokio::time::interval(self.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                _ = tick.tick() => self.heartbeats().await,
                m = stream.message() => {
                    let m = m.map_err(|s| s.message().to_owned())?.ok_or("the center closed the subscription")?;
                    match m.msg {
                        Some(subscribe_response::Msg::Event(e)) if e.node.is_empty() => {}
                        // A temporary problem (an observation without a condition): an Event.
                        Some(subscribe_response::Msg::Event(e))
                            if e.kind() == EventKind::Observation && e.condition.is_none() =>
                        {
                            self.events.record(&e).await;
                        }
                        Some(subscribe_response::Msg::Event(e)) => self.changed(&e.node).await,
                        _ => {}
                    }
                }
            }
        }
    }

    /// How often due heartbeats are looked for: a tenth of the period, at most 10 s.
    fn tick(&self) -> Duration {
        (self.cfg.heartbeat_period / 10).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// A node's conditions or liveness changed: read it back and write what differs.
    async fn changed(&mut self, name: &str) {
        let req = GetNodeRequest { cluster: self.cluster.clone(), node: name.to_owned() };
        match FleetServiceClient::new(self.ch.clone()).get_node(req).await {
            Ok(node) => self.export(name, desired(&node.into_inner(), &self.cfg.rename), false).await,
            Err(s) => tracing::warn!(node = name, error = s.message(), "node conditions: cannot read the node"),
        }
    }

    /// Rewrites the nodes whose last write is a heartbeat period old, the oldest first and at
    /// most a tick's share of all nodes per tick: nodes written together (the initial sync) drift
    /// apart over the first periods instead of falling due together, so a change never waits
    /// behind a whole cluster's heartbeats.
    async fn heartbeats(&mut self) {
        let period = self.cfg.heartbeat_period;
        let share = self.written.len() as f64 * self.tick().as_secs_f64() / period.as_secs_f64();
        let mut due: Vec<(Instant, String, Vec<KubeCondition>)> = self
            .written
            .iter()
            .filter(|(_, w)| w.at.elapsed() >= period)
            .map(|(n, w)| (w.at, n.clone(), w.conditions.clone()))
            .collect();
        due.sort_by_key(|(at, _, _)| *at);
        for (_, name, conditions) in due.into_iter().take(share.ceil() as usize + 1) {
            self.export(&name, conditions, true).await;
        }
    }

    /// Writes `conditions` to the Node when they differ from what was written last, or when
    /// `heartbeat` says it is due anyway.
    async fn export(&mut self, name: &str, conditions: Vec<KubeCondition>, heartbeat: bool) {
        let same = self.written.get(name).is_some_and(|w| w.conditions == conditions);
        if conditions.is_empty() || (same && !heartbeat) {
            return;
        }
        let now = nodekeeper_common::time::rfc3339(&nodekeeper_common::time::now_timestamp());
        let params = PatchParams { field_manager: Some(self.cfg.field_manager.clone()), ..Default::default() };
        let body = patch(&conditions, &now);
        match self.nodes.patch_status(name, &params, &Patch::Strategic(&body)).await {
            Ok(_) => {
                self.written.insert(name.to_owned(), Written { conditions, at: Instant::now() });
            }
            // Not (yet) a Kubernetes node: looked at again with its next change.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.written.remove(name);
            }
            Err(e) => {
                tracing::warn!(node = name, error = %e, "node conditions: cannot write the node's status");
                // Tried again at the next tick.
                let stale = Instant::now().checked_sub(self.cfg.heartbeat_period).unwrap_or_else(Instant::now);
                self.written.insert(name.to_owned(), Written { conditions, at: stale });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{Condition, NodeCondition};

    fn cond(t: &str, status: ConditionStatus, producer: &str) -> NodeCondition {
        NodeCondition {
            condition: Some(Condition {
                r#type: t.into(),
                status: status as i32,
                reason: format!("{t}Reason"),
                message: "m".into(),
                last_transition_time: Some(prost_types::Timestamp { seconds: 1_800_000_000, nanos: 0 }),
            }),
            producer: producer.into(),
            ..Default::default()
        }
    }

    #[test]
    fn conditions_as_the_node_should_have_them() {
        let mut node = Node {
            liveness: Liveness::Alive as i32,
            last_heartbeat_time: Some(prost_types::Timestamp { seconds: 1_800_000_600, nanos: 0 }),
            conditions: vec![
                cond("KernelDeadlock", ConditionStatus::True, AGENT),
                cond("Ready", ConditionStatus::False, AGENT),
                cond("NodeUnreachable", ConditionStatus::False, "detector-1"),
            ],
            ..Default::default()
        };
        let none = BTreeMap::new();
        let d = desired(&node, &none);
        assert_eq!(d.iter().map(|c| c.r#type.as_str()).collect::<Vec<_>>(), ["KernelDeadlock", "NodeUnreachable"]);
        // Renamed types go under their new name; a rename to Kubernetes' own is never written.
        let rename: BTreeMap<String, String> =
            [("KernelDeadlock".into(), "KernelHasDeadlock".into()), ("NodeUnreachable".into(), "Ready".into())].into();
        let r = desired(&node, &rename);
        assert_eq!(r.iter().map(|c| c.r#type.as_str()).collect::<Vec<_>>(), ["KernelHasDeadlock"]);
        assert_eq!(d[0].status, "True");
        assert_eq!(d[0].last_transition_time, "2027-01-15T08:00:00Z");
        // A silent agent: its conditions Unknown since its last heartbeat; the detector's stay.
        node.liveness = Liveness::Lost as i32;
        let d = desired(&node, &none);
        assert_eq!((d[0].status, d[0].reason.as_str()), ("Unknown", "NodekeeperAgentNotReporting"));
        assert_eq!(d[0].last_transition_time, "2027-01-15T08:10:00Z");
        assert_eq!(d[1].status, "False");
        // A change reported after the last heartbeat: Unknown from that change on.
        node.last_heartbeat_time = Some(prost_types::Timestamp { seconds: 1_799_999_000, nanos: 0 });
        assert_eq!(desired(&node, &none)[0].last_transition_time, "2027-01-15T08:00:00Z");
        let p = patch(&d, "2027-01-15T09:00:00Z");
        assert_eq!(p["status"]["conditions"][0]["lastHeartbeatTime"], "2027-01-15T09:00:00Z");
        assert_eq!(p["status"]["conditions"][1]["type"], "NodeUnreachable");
    }
}

//! Temporary problems (observations without a condition: an OOM kill, a task hung once) as
//! Kubernetes Events on their Node, as node-problem-detector records them: source `nodekeeper` on
//! the node's host, reason and message from the observation, Warning for problems and Normal for
//! information. Like client-go's event correlator, the same reason and message on the same node
//! within ten minutes raises the existing Event's `count` and `lastTimestamp` instead of making a
//! new one, and each node has a spam budget (a burst of 25, then one more every five minutes);
//! what is over budget is not sent (logged once per node while it lasts).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Event as KubeEvent;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nodekeeper_proto::v1::{Event, Severity};
use serde_json::json;

/// client-go's event correlator: the aggregation window and the spam filter's budget.
const WINDOW: Duration = Duration::from_secs(600);
const BURST: f64 = 25.0;
const REFILL: Duration = Duration::from_secs(300);

/// An Event already made: its name, how many times it happened, when last.
struct Made {
    name: String,
    count: i32,
    last: Instant,
}

/// A node's spam budget.
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Events dropped since the last one sent.
    dropped: u64,
}

pub struct Recorder {
    events: Api<KubeEvent>,
    field_manager: String,
    made: HashMap<(String, String, String), Made>,
    /// When `made` was last rid of Events past the window.
    pruned: Instant,
    buckets: HashMap<String, Bucket>,
}

impl Recorder {
    pub fn new(client: kube::Client, field_manager: String) -> Recorder {
        // Events about cluster-scoped objects (Nodes) live in "default", as the kubelet's do.
        let events = Api::namespaced(client, "default");
        Recorder { events, field_manager, made: HashMap::new(), pruned: Instant::now(), buckets: HashMap::new() }
    }

    /// Whether the node's budget allows one more.
    fn allowed(&mut self, node: &str) -> bool {
        let b = self.buckets.entry(node.to_owned()).or_insert(Bucket { tokens: BURST, at: Instant::now(), dropped: 0 });
        let refilled = b.at.elapsed().as_secs_f64() / REFILL.as_secs_f64();
        b.tokens = (b.tokens + refilled).min(BURST);
        b.at = Instant::now();
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            if b.dropped > 0 {
                tracing::info!(node, dropped = b.dropped, "Kubernetes Events of this node are sent again");
                b.dropped = 0;
            }
            true
        } else {
            if b.dropped == 0 {
                tracing::warn!(
                    node,
                    "this node's Kubernetes Events are over budget (25, then one per 5 minutes): not sent"
                );
            }
            b.dropped += 1;
            false
        }
    }

    /// Records a temporary problem of `e.node` as an Event on the Node.
    pub async fn record(&mut self, e: &Event) {
        let key = (e.node.clone(), e.r#type.clone(), e.message.clone());
        // Past the window an Event is not raised again; the map is swept once per window.
        if self.made.get(&key).is_some_and(|m| m.last.elapsed() >= WINDOW) {
            self.made.remove(&key);
        }
        if self.pruned.elapsed() >= WINDOW {
            self.made.retain(|_, m| m.last.elapsed() < WINDOW);
            self.pruned = Instant::now();
        }
        if !self.allowed(&e.node) {
            return;
        }
        let now = nodekeeper_common::time::rfc3339(&nodekeeper_common::time::now_timestamp());
        let result = match self.made.get_mut(&key) {
            Some(m) => {
                m.count += 1;
                m.last = Instant::now();
                let patch = json!({ "count": m.count, "lastTimestamp": now });
                let params = PatchParams { field_manager: Some(self.field_manager.clone()), ..Default::default() };
                self.events.patch(&m.name, &params, &Patch::Merge(&patch)).await.map(drop)
            }
            None => {
                let name = format!(
                    "{}.{:x}",
                    e.node,
                    SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
                );
                let kind = if e.severity() >= Severity::Warning { "Warning" } else { "Normal" };
                let event: KubeEvent = match serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": "default" },
                    "involvedObject": { "kind": "Node", "name": e.node, "uid": e.node, "apiVersion": "v1" },
                    "reason": e.r#type,
                    "message": e.message,
                    "source": { "component": "nodekeeper", "host": e.node },
                    "type": kind,
                    "count": 1,
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                })) {
                    Ok(ev) => ev,
                    Err(err) => {
                        tracing::warn!(node = %e.node, error = %err, "cannot make a Kubernetes Event");
                        return;
                    }
                };
                let params = PostParams { field_manager: Some(self.field_manager.clone()), ..Default::default() };
                let made = self.events.create(&params, &event).await.map(drop);
                if made.is_ok() {
                    self.made.insert(key, Made { name, count: 1, last: Instant::now() });
                }
                made
            }
        };
        if let Err(err) = result {
            tracing::warn!(node = %e.node, reason = %e.r#type, error = %err, "cannot record the Kubernetes Event");
        }
    }
}

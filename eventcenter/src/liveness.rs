//! Node liveness. Heartbeats are kept in memory only (100k nodes × every 10 s would otherwise be
//! 10k writes/s for nothing); transitions are persisted as events, in the order they happen, by
//! one task. A node silent for longer than its grace (grace_multiplier × its heartbeat interval)
//! is declared lost. A restarted center gives every node a fresh grace, so it does not declare
//! the whole fleet lost because it was itself away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nodekeeper_common::time::to_timestamp;
use nodekeeper_proto::v1::{Heartbeat, Node};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::NodesConfig;
use crate::store::{NodeKey, Store, StoreError};

struct Entry {
    last_seen: Instant,
    grace: Duration,
    lost: bool,
    connections: u32,
    last_heartbeat: Option<SystemTime>,
    outbox_depth: u64,
    outbox_dropped_total: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub nodes: u64,
    pub lost: u64,
    pub connected: u64,
}

type Transition = (NodeKey, bool, Duration);

pub struct Liveness {
    entries: Mutex<HashMap<NodeKey, Entry>>,
    config: NodesConfig,
    transitions: mpsc::UnboundedSender<Transition>,
}

impl Liveness {
    /// Loads the known nodes, each with a fresh grace, and starts the task that checks them and
    /// the one that persists transitions.
    pub async fn start(
        store: Store,
        config: NodesConfig,
        cancel: CancellationToken,
    ) -> Result<(Arc<Self>, Vec<JoinHandle<()>>), StoreError> {
        let now = Instant::now();
        let mut entries = HashMap::new();
        for node in store.list_nodes(Vec::new(), false).await? {
            let interval = nodekeeper_common::time::from_duration(node.heartbeat_interval.as_ref())
                .unwrap_or(config.default_heartbeat_interval);
            entries.insert(
                NodeKey { cluster: node.cluster.clone(), node: node.name.clone() },
                Entry {
                    last_seen: now,
                    grace: interval * config.grace_multiplier,
                    lost: node.liveness == nodekeeper_proto::v1::Liveness::Lost as i32,
                    connections: 0,
                    last_heartbeat: None,
                    outbox_depth: 0,
                    outbox_dropped_total: 0,
                },
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let this = Arc::new(Self { entries: Mutex::new(entries), config, transitions: tx });
        let persist = tokio::spawn(persist(store, rx));
        let check = tokio::spawn(this.clone().check_loop(cancel));
        Ok((this, vec![persist, check]))
    }

    /// The grace of a node announcing `interval` (or none).
    pub fn grace_for(&self, interval: Option<Duration>) -> Duration {
        interval.unwrap_or(self.config.default_heartbeat_interval) * self.config.grace_multiplier
    }

    fn with_entry(&self, key: &NodeKey, interval: Option<Duration>, f: impl FnOnce(&mut Entry)) {
        let mut entries = self.entries.lock().expect("liveness lock");
        let grace = self.grace_for(interval);
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            last_seen: Instant::now(),
            grace,
            lost: false,
            connections: 0,
            last_heartbeat: None,
            outbox_depth: 0,
            outbox_dropped_total: 0,
        });
        if interval.is_some() {
            entry.grace = grace;
        }
        entry.last_seen = Instant::now();
        if entry.lost {
            entry.lost = false;
            // Sent under the lock: transitions reach the store in the order they happened.
            if self.transitions.send((key.clone(), false, entry.grace)).is_err() {
                tracing::error!(node = %key.node, "liveness persister stopped; resumption not recorded");
            }
        }
        f(entry);
    }

    /// A hello: the node is alive; `interval` is its announced heartbeat interval.
    pub fn hello(&self, key: &NodeKey, interval: Option<Duration>) {
        self.with_entry(key, interval, |e| e.connections += 1);
    }

    pub fn heartbeat(&self, key: &NodeKey, hb: &Heartbeat) {
        self.with_entry(key, None, |e| {
            e.last_heartbeat = Some(SystemTime::now());
            e.outbox_depth = hb.outbox_depth;
            e.outbox_dropped_total = hb.outbox_dropped_total;
        });
    }

    /// Any message from the node counts as a sign of life.
    pub fn seen(&self, key: &NodeKey) {
        self.with_entry(key, None, |_| {});
    }

    pub fn disconnected(&self, key: &NodeKey) {
        if let Some(e) = self.entries.lock().expect("liveness lock").get_mut(key) {
            e.connections = e.connections.saturating_sub(1);
        }
    }

    /// An agent stream of the node is open on this center.
    pub fn connected(&self, key: &NodeKey) -> bool {
        self.entries.lock().expect("liveness lock").get(key).is_some_and(|e| e.connections > 0)
    }

    /// A decommissioned node: its silence is no longer watched (a new hello watches it again).
    pub fn forget(&self, key: &NodeKey) {
        self.entries.lock().expect("liveness lock").remove(key);
    }

    /// Adds what only memory knows (connection, last heartbeat, outbox) to a stored node.
    pub fn annotate(&self, node: &mut Node) {
        let key = NodeKey { cluster: node.cluster.clone(), node: node.name.clone() };
        if let Some(e) = self.entries.lock().expect("liveness lock").get(&key) {
            node.connected = e.connections > 0;
            node.last_heartbeat_time = e.last_heartbeat.map(to_timestamp);
            node.outbox_depth = e.outbox_depth;
            node.outbox_dropped_total = e.outbox_dropped_total;
        }
    }

    /// Per cluster: known nodes, nodes lost, nodes with an open stream.
    pub fn census(&self) -> std::collections::BTreeMap<String, Census> {
        let mut out = std::collections::BTreeMap::<String, Census>::new();
        for (key, e) in self.entries.lock().expect("liveness lock").iter() {
            let c = out.entry(key.cluster.clone()).or_default();
            c.nodes += 1;
            c.lost += u64::from(e.lost);
            c.connected += u64::from(e.connections > 0);
        }
        out
    }

    async fn check_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.check_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.check(Instant::now()),
            }
        }
    }

    fn check(&self, now: Instant) {
        let mut entries = self.entries.lock().expect("liveness lock");
        for (key, e) in entries.iter_mut() {
            if !e.lost && now.duration_since(e.last_seen) > e.grace {
                e.lost = true;
                tracing::warn!(cluster = %key.cluster, node = %key.node, grace = ?e.grace, "node heartbeat lost");
                if self.transitions.send((key.clone(), true, e.grace)).is_err() {
                    tracing::error!(node = %key.node, "liveness persister stopped; loss not recorded");
                }
            }
        }
    }
}

async fn persist(store: Store, mut rx: mpsc::UnboundedReceiver<Transition>) {
    while let Some((key, lost, grace)) = rx.recv().await {
        if !lost {
            tracing::info!(cluster = %key.cluster, node = %key.node, "node heartbeat resumed");
        }
        if let Err(err) = store.set_liveness(key.clone(), lost, grace).await {
            tracing::error!(error = %err, node = %key.node, lost, "cannot persist liveness transition");
        }
    }
}

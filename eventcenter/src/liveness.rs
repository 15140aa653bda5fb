//! Node liveness. Heartbeats are kept in memory only (100k nodes × every 10 s would otherwise be
//! 10k writes/s for nothing); transitions are persisted as events, in the order they happen, by
//! one task. A node silent for longer than its grace (grace_multiplier × its heartbeat interval)
//! is declared lost. A restarted center gives every node a fresh grace, so it does not declare
//! the whole fleet lost because it was itself away.
//!
//! Several replicas on one PostgreSQL store: a node is watched by its owner, the replica that has
//! its agent's stream (its hello makes it the owner), and only the owner records its loss (a
//! replica that finds the node owned by another when it would declare it lost forgets it). The
//! nodes of a replica whose lease ran out (dead, or cut off from the database) are taken over by
//! the others, each with a fresh grace, so a node whose agent reconnects elsewhere within its
//! grace is never declared lost, and one that does not is declared lost by its new owner. Every
//! replica takes back, every few seconds, the nodes whose streams it has but that were taken
//! over while its own lease had lapsed.

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

impl Entry {
    /// A node seen now (or given a fresh grace from now).
    fn new(grace: Duration, lost: bool) -> Entry {
        Entry {
            last_seen: Instant::now(),
            grace,
            lost,
            connections: 0,
            last_heartbeat: None,
            outbox_depth: 0,
            outbox_dropped_total: 0,
        }
    }
}

pub use crate::store::Census;

/// What the persister records, in the order it happened.
enum Transition {
    Lost(NodeKey, Duration),
    Resumed(NodeKey, Duration),
    /// One of the node's streams on this replica ended.
    Disconnected(NodeKey),
}

/// How often a replica on a shared store takes over the nodes nobody watches, and takes back
/// those whose streams it has.
const ADOPT_INTERVAL: Duration = Duration::from_secs(2);
const RECLAIM_INTERVAL: Duration = Duration::from_secs(10);

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
        let nodes =
            if store.shared() { store.adopt_nodes().await? } else { store.list_nodes(Vec::new(), false).await? };
        let (tx, rx) = mpsc::unbounded_channel();
        let this = Arc::new(Self { entries: Mutex::new(HashMap::new()), config, transitions: tx });
        this.watch(nodes);
        let persist = tokio::spawn(persist(store.clone(), rx, Arc::downgrade(&this)));
        let check = tokio::spawn(this.clone().check_loop(cancel.clone()));
        let mut tasks = vec![persist, check];
        if store.shared() {
            tasks.push(tokio::spawn(Self::adopt_loop(Arc::downgrade(&this), store, cancel)));
        }
        Ok((this, tasks))
    }

    /// Watches stored nodes from now, each with a fresh grace (those already watched stay as
    /// they are).
    fn watch(&self, nodes: Vec<Node>) {
        let mut entries = self.entries.lock().expect("liveness lock");
        for node in nodes {
            let interval = nodekeeper_common::time::from_duration(node.heartbeat_interval.as_ref())
                .unwrap_or(self.config.default_heartbeat_interval);
            let lost = node.liveness == nodekeeper_proto::v1::Liveness::Lost as i32;
            entries
                .entry(NodeKey { cluster: node.cluster, node: node.name })
                .or_insert_with(|| Entry::new(interval * self.config.grace_multiplier, lost));
        }
    }

    /// On a shared store: takes over the nodes nobody watches, and takes back the nodes whose
    /// streams this replica has.
    async fn adopt_loop(this: std::sync::Weak<Self>, store: Store, cancel: CancellationToken) {
        let mut adopt = tokio::time::interval(ADOPT_INTERVAL);
        adopt.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut reclaim = tokio::time::interval(RECLAIM_INTERVAL);
        reclaim.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = adopt.tick() => {
                    let adopted = store.adopt_nodes().await;
                    let Some(live) = this.upgrade() else { return };
                    match adopted {
                        Ok(nodes) if nodes.is_empty() => {}
                        Ok(nodes) => {
                            tracing::info!(nodes = nodes.len(), "watching nodes nobody watched (their replica is gone)");
                            live.watch(nodes);
                        }
                        Err(err) => tracing::warn!(error = %err, "cannot take over the nodes nobody watches"),
                    }
                }
                _ = reclaim.tick() => {
                    let Some(live) = this.upgrade() else { return };
                    let connected: Vec<(NodeKey, u32)> = live
                        .entries
                        .lock()
                        .expect("liveness lock")
                        .iter()
                        .filter(|(_, e)| e.connections > 0)
                        .map(|(k, e)| (k.clone(), e.connections))
                        .collect();
                    drop(live);
                    match store.reclaim_nodes(connected).await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(nodes = n, "took back the nodes whose streams this replica has"),
                        Err(err) => tracing::warn!(error = %err, "cannot take back this replica's nodes"),
                    }
                }
            }
        }
    }

    /// The grace of a node announcing `interval` (or none).
    pub fn grace_for(&self, interval: Option<Duration>) -> Duration {
        interval.unwrap_or(self.config.default_heartbeat_interval) * self.config.grace_multiplier
    }

    fn with_entry(&self, key: &NodeKey, interval: Option<Duration>, f: impl FnOnce(&mut Entry)) {
        let mut entries = self.entries.lock().expect("liveness lock");
        let grace = self.grace_for(interval);
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry::new(grace, false));
        if interval.is_some() {
            entry.grace = grace;
        }
        entry.last_seen = Instant::now();
        if entry.lost {
            entry.lost = false;
            // Sent under the lock: transitions reach the store in the order they happened.
            if self.transitions.send(Transition::Resumed(key.clone(), entry.grace)).is_err() {
                tracing::error!(node = %key.node, "liveness persister stopped; resumption not recorded");
            }
        }
        f(entry);
    }

    /// A hello: the node is alive; `interval` is its announced heartbeat interval; `stored_lost`
    /// whether the store has it lost (declared by another replica, its resumption is recorded
    /// here).
    pub fn hello(&self, key: &NodeKey, interval: Option<Duration>, stored_lost: bool) {
        if stored_lost {
            let grace = self.grace_for(interval);
            let mut entries = self.entries.lock().expect("liveness lock");
            entries.entry(key.clone()).or_insert_with(|| Entry::new(grace, true)).lost = true;
        }
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
            let _ = self.transitions.send(Transition::Disconnected(key.clone()));
        }
    }

    /// Another replica owns the node now: it is not watched here unless it has a stream here.
    fn not_mine(&self, key: &NodeKey) {
        let mut entries = self.entries.lock().expect("liveness lock");
        if entries.get(key).is_some_and(|e| e.connections == 0) {
            entries.remove(key);
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

    /// Adds what only memory knows (a stream on this replica, last heartbeat, outbox) to a
    /// stored node.
    pub fn annotate(&self, node: &mut Node) {
        let key = NodeKey { cluster: node.cluster.clone(), node: node.name.clone() };
        if let Some(e) = self.entries.lock().expect("liveness lock").get(&key) {
            node.connected |= e.connections > 0;
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
                if self.transitions.send(Transition::Lost(key.clone(), e.grace)).is_err() {
                    tracing::error!(node = %key.node, "liveness persister stopped; loss not recorded");
                }
            }
        }
    }
}

async fn persist(store: Store, mut rx: mpsc::UnboundedReceiver<Transition>, liveness: std::sync::Weak<Liveness>) {
    while let Some(t) = rx.recv().await {
        let (key, done) = match t {
            Transition::Lost(key, grace) => {
                let mine = store.set_liveness(key.clone(), true, grace).await;
                if let (Ok(false), Some(l)) = (&mine, liveness.upgrade()) {
                    tracing::info!(cluster = %key.cluster, node = %key.node, "node watched by another replica now");
                    l.not_mine(&key);
                }
                (key, mine.map(drop))
            }
            Transition::Resumed(key, grace) => {
                tracing::info!(cluster = %key.cluster, node = %key.node, "node heartbeat resumed");
                let done = store.set_liveness(key.clone(), false, grace).await.map(drop);
                (key, done)
            }
            Transition::Disconnected(key) => {
                let done = store.disconnected(key.clone()).await;
                (key, done)
            }
        };
        if let Err(err) = done {
            tracing::error!(error = %err, node = %key.node, "cannot persist a liveness transition");
        }
    }
}

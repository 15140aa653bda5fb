//! The center's store, whichever engine holds it: SQLite embedded in the one center, or
//! PostgreSQL shared by several replicas. The rest of the center talks to this and never to an
//! engine; both keep the invariants in ARCHITECTURE.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_proto::v1::{
    ClusterGuard, ComponentStatusReport, Consumer, Event, Fault, Node, NodeCondition, Permit, Rollout,
};
use tokio::sync::{broadcast, watch};

use super::postgres::PgStore;
use super::{
    Appended, DesiredRow, DiskState, FaultFilter, HelloOutcome, LiveBatch, NewEvent, NodeChanged, NodeHello, NodeKey,
    Result, Sqlite, StoreMetrics,
};

#[derive(Clone)]
pub enum Store {
    Sqlite(Sqlite),
    Postgres(Arc<PgStore>),
}

/// Calls the same method on whichever engine, with the same arguments.
macro_rules! both {
    ($self:ident, $s:ident => $sqlite:expr, $p:ident => $postgres:expr) => {
        match $self {
            Store::Sqlite($s) => $sqlite,
            Store::Postgres($p) => $postgres,
        }
    };
}

/// Held while permits are decided: on PostgreSQL the database's lock over every replica's
/// decisions; on SQLite nothing (its one center decides alone, under its own lock).
pub struct PermitsLock {
    _held: Option<super::postgres::AdvisoryLock>,
}

impl Store {
    /// Whether other replicas write this store too (so what this replica keeps in memory of the
    /// shared state must be read again before it decides on it).
    pub fn shared(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    pub async fn lock_permits(&self) -> Result<PermitsLock> {
        Ok(PermitsLock {
            _held: match self {
                Store::Sqlite(_) => None,
                Store::Postgres(p) => Some(p.lock_permits().await?),
            },
        })
    }

    pub fn metrics(&self) -> &StoreMetrics {
        both!(self, s => s.metrics(), p => p.metrics())
    }

    /// The disk reserve (SQLite's disk; PostgreSQL's is the database's operators').
    pub fn disk(&self) -> DiskState {
        both!(self, s => s.disk(), p => p.disk())
    }

    pub fn watch_disk(&self) -> watch::Receiver<DiskState> {
        both!(self, s => s.watch_disk(), p => p.watch_disk())
    }

    pub fn head(&self) -> u64 {
        both!(self, s => s.head(), p => p.head())
    }

    pub fn floor(&self) -> u64 {
        both!(self, s => s.floor(), p => p.floor_now())
    }

    /// Follows the newest committed cursor (PostgreSQL: every replica's commits).
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        both!(self, s => s.watch_head(), p => p.watch_head())
    }

    /// The detector votes in `after..=upto` (PostgreSQL, where the leader folds every replica's
    /// votes; SQLite's one center folds them as they are reported, and answers none).
    pub async fn votes(&self, after: u64, upto: u64, limit: usize) -> Result<Vec<Event>> {
        both!(self, _s => Ok(Vec::new()), p => p.votes(after, upto, limit).await)
    }

    pub fn subscribe_live(&self) -> broadcast::Receiver<LiveBatch> {
        both!(self, s => s.subscribe_live(), p => p.subscribe_live())
    }

    pub async fn append_queued(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Appended>>> + Send>>> {
        Ok(match self {
            Store::Sqlite(s) => Box::pin(s.append_queued(events).await?),
            Store::Postgres(p) => Box::pin(p.append_queued(events).await?),
        })
    }

    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        both!(self, s => s.append(events).await, p => p.append(events).await)
    }

    pub async fn hello(&self, hello: NodeHello) -> Result<HelloOutcome> {
        both!(self, s => s.hello(hello).await, p => p.hello(hello).await)
    }

    /// Records a liveness transition; whether this replica watches the node (on PostgreSQL a
    /// loss is recorded only by the node's owner; SQLite's one center watches every node).
    pub async fn set_liveness(&self, key: NodeKey, lost: bool, grace: Duration) -> Result<bool> {
        both!(self, s => s.set_liveness(key, lost, grace).await.map(|()| true), p => p.set_liveness(key, lost, grace).await)
    }

    /// One of the node's agent streams on this replica ended.
    pub async fn disconnected(&self, key: NodeKey) -> Result<()> {
        both!(self, _s => Ok(()), p => p.disconnected(key).await)
    }

    /// The nodes nobody watches, taken over by this replica (PostgreSQL; SQLite's one center
    /// watches every node from its start).
    pub async fn adopt_nodes(&self) -> Result<Vec<Node>> {
        both!(self, _s => Ok(Vec::new()), p => p.adopt_nodes().await)
    }

    /// Removes the leases of replicas gone for longer than `gone_for` (PostgreSQL).
    pub async fn forget_dead_replicas(&self, gone_for: Duration) -> Result<u64> {
        both!(self, _s => Ok(0), p => p.forget_dead_replicas(gone_for).await)
    }

    /// Owns again the nodes whose streams this replica has (PostgreSQL).
    pub async fn reclaim_nodes(&self, connected: Vec<(NodeKey, u32)>) -> Result<u64> {
        both!(self, _s => Ok(0), p => p.reclaim_nodes(connected).await)
    }

    /// The fleet's census by cluster as stored, on a store shared by replicas (each replica's
    /// memory knows only the nodes it watches); `None` on SQLite, whose center's memory knows.
    pub async fn census(&self) -> Result<Option<BTreeMap<String, super::Census>>> {
        both!(self, _s => Ok(None), p => p.census().await.map(Some))
    }

    /// `Some(_)` while this replica holds its lease on the store (PostgreSQL); SQLite's one
    /// center always does.
    pub fn alive(&self) -> watch::Receiver<Option<u64>> {
        both!(self, _s => watch::channel(Some(1)).1, p => p.alive())
    }

    /// `Some(epoch)` while this replica leads the work that runs once; SQLite's one center
    /// always does.
    pub fn leading(&self) -> watch::Receiver<Option<u64>> {
        both!(self, _s => watch::channel(Some(1)).1, p => p.leading())
    }

    pub async fn sync_kubernetes(
        &self,
        key: NodeKey,
        labels: HashMap<String, String>,
        onboarding: bool,
        onboarded: bool,
        issuer: String,
    ) -> Result<Option<NodeChanged>> {
        both!(self,
            s => s.sync_kubernetes(key, labels, onboarding, onboarded, issuer).await,
            p => p.sync_kubernetes(key, labels, onboarding, onboarded, issuer).await)
    }

    pub async fn decommission(&self, key: NodeKey, reason: String, issuer: String) -> Result<Option<NodeChanged>> {
        both!(self, s => s.decommission(key, reason, issuer).await, p => p.decommission(key, reason, issuer).await)
    }

    pub async fn ensure_consumer(&self, name: String, position: u64) -> Result<u64> {
        both!(self, s => s.ensure_consumer(name, position).await, p => p.ensure_consumer(&name, position).await)
    }

    pub async fn ack_consumer(&self, name: String, cursor: u64) -> Result<bool> {
        both!(self, s => s.ack_consumer(name, cursor).await, p => p.ack_consumer(&name, cursor).await)
    }

    pub async fn delete_consumer(&self, name: String) -> Result<bool> {
        both!(self, s => s.delete_consumer(name).await, p => p.delete_consumer(&name).await)
    }

    pub async fn retain(&self, cutoff_ms: i64, max_rows: usize) -> Result<u64> {
        both!(self, s => s.retain(cutoff_ms, max_rows).await, p => p.retain(cutoff_ms, max_rows).await)
    }

    pub async fn set_desired(&self, cluster: String, target: String, specs: Vec<u8>) -> Result<u64> {
        both!(self, s => s.set_desired(cluster, target, specs).await, p => p.set_desired(cluster, target, specs).await)
    }

    pub async fn set_component_status(&self, key: NodeKey, body: Vec<u8>) -> Result<u64> {
        both!(self, s => s.set_component_status(key, body).await, p => p.set_component_status(key, body).await)
    }

    pub async fn put_permits(&self, permits: Vec<(Permit, bool)>, events: Vec<NewEvent>) -> Result<u64> {
        both!(self, s => s.put_permits(permits, events).await, p => p.put_permits(permits, events).await)
    }

    pub async fn put_guard(&self, cluster: String, body: Vec<u8>, events: Vec<NewEvent>) -> Result<u64> {
        both!(self, s => s.put_guard(cluster, body, events).await, p => p.put_guard(cluster, body, events).await)
    }

    pub async fn put_rollout(
        &self,
        name: String,
        cluster: String,
        body: Vec<u8>,
        events: Vec<NewEvent>,
        desired: Vec<(String, Vec<u8>)>,
    ) -> Result<u64> {
        both!(self,
            s => s.put_rollout(name, cluster, body, events, desired).await,
            p => p.put_rollout(name, cluster, body, events, desired).await)
    }

    pub async fn fault_action(&self, event: NewEvent, state: i32) -> Result<u64> {
        both!(self, s => s.fault_action(event, state).await, p => p.fault_action(event, state).await)
    }

    /// Stops after everything submitted so far committed.
    pub async fn close(&self) {
        both!(self, s => s.close().await, p => p.close().await)
    }

    pub async fn desired_components(&self, cluster: String) -> Result<Vec<DesiredRow>> {
        both!(self, s => s.desired_components(cluster).await, p => p.desired_components(&cluster).await)
    }

    pub async fn permits_since(&self, since_ms: i64) -> Result<Vec<(Permit, bool)>> {
        both!(self, s => s.permits_since(since_ms).await, p => p.permits_since(since_ms).await)
    }

    pub async fn guards(&self) -> Result<Vec<ClusterGuard>> {
        both!(self, s => s.guards().await, p => p.guards().await)
    }

    pub async fn component_statuses(
        &self,
        clusters: Vec<String>,
        one: Option<NodeKey>,
    ) -> Result<Vec<(String, String, ComponentStatusReport)>> {
        both!(self, s => s.component_statuses(clusters, one).await, p => p.component_statuses(clusters, one).await)
    }

    pub async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        both!(self, s => s.read_after(after, limit).await, p => p.read_after(after, limit).await)
    }

    pub async fn list_nodes(&self, clusters: Vec<String>, include_decommissioned: bool) -> Result<Vec<Node>> {
        both!(self,
            s => s.list_nodes(clusters, include_decommissioned).await,
            p => p.list_nodes(clusters, include_decommissioned).await)
    }

    pub async fn count_nodes(&self, cluster: String) -> Result<usize> {
        both!(self, s => s.count_nodes(cluster).await, p => p.count_nodes(&cluster).await)
    }

    pub async fn node_events_before(&self, key: NodeKey, before: u64, limit: usize) -> Result<Vec<Event>> {
        both!(self,
            s => s.node_events_before(key, before, limit).await,
            p => p.node_events_before(&key.cluster, &key.node, before, limit).await)
    }

    pub async fn cluster_sizes(&self) -> Result<Vec<(String, usize)>> {
        both!(self, s => s.cluster_sizes().await, p => p.cluster_sizes().await)
    }

    pub async fn get_node(&self, key: NodeKey) -> Result<Option<Node>> {
        both!(self, s => s.get_node(key).await, p => p.get_node(key).await)
    }

    pub async fn list_rollouts(&self, clusters: Vec<String>) -> Result<Vec<Rollout>> {
        both!(self, s => s.list_rollouts(clusters).await, p => p.list_rollouts(clusters).await)
    }

    pub async fn rollout(&self, name: String) -> Result<Option<Rollout>> {
        both!(self, s => s.rollout(name).await, p => p.rollout(&name).await)
    }

    pub async fn get_rollout(&self, name: String) -> Result<Option<(Rollout, Vec<Event>)>> {
        both!(self, s => s.get_rollout(name).await, p => p.get_rollout(&name).await)
    }

    pub async fn open_fault_types(
        &self,
        clusters: Vec<String>,
        one: Option<NodeKey>,
    ) -> Result<HashMap<(String, String), Vec<String>>> {
        both!(self, s => s.open_fault_types(clusters, one).await, p => p.open_fault_types(clusters, one).await)
    }

    pub async fn list_conditions(&self, clusters: Vec<String>, nodes: Vec<String>) -> Result<Vec<NodeCondition>> {
        both!(self, s => s.list_conditions(clusters, nodes).await, p => p.list_conditions(clusters, nodes).await)
    }

    pub async fn list_faults(&self, filter: FaultFilter) -> Result<Vec<Fault>> {
        both!(self, s => s.list_faults(filter).await, p => p.list_faults(filter).await)
    }

    pub async fn unresolved_fault_counts(&self) -> Result<BTreeMap<(String, i32, i32), u64>> {
        both!(self, s => s.unresolved_fault_counts().await, p => p.unresolved_fault_counts().await)
    }

    pub async fn fault(&self, id: u64) -> Result<Option<Fault>> {
        both!(self, s => s.fault(id).await, p => p.fault(id).await)
    }

    pub async fn get_fault(&self, id: u64) -> Result<Option<(Fault, Vec<Event>)>> {
        both!(self, s => s.get_fault(id).await, p => p.get_fault(id).await)
    }

    pub async fn list_consumers(&self) -> Result<Vec<Consumer>> {
        both!(self, s => s.list_consumers().await, p => p.list_consumers().await)
    }

    pub async fn consumer_position(&self, name: String) -> Result<Option<u64>> {
        both!(self, s => s.consumer_position(name).await, p => p.consumer_position(&name).await)
    }
}

//! The durable store, on one of two engines behind [`Store`]: SQLite embedded (`sqlite.rs`, one
//! center; the default) or PostgreSQL (`postgres.rs`, one log shared by several replicas). Both
//! answer a write only once it committed, and publish every committed event on a broadcast channel
//! for live subscribers; a subscriber that lags re-reads the store, so the channel may drop but
//! the subscriber never skips. This module holds what the engines share: identities, the events
//! and node records they take, errors, options and metrics.

mod engine;
mod fold;
mod lifecycle;
pub mod postgres;
mod read;
mod space;
mod sqlite;
mod writer;

pub use engine::{PermitsLock, Store};
pub use read::{DesiredRow, FaultFilter};
pub use space::DiskState;
pub use sqlite::{Sqlite, backup};
pub use writer::NodeChanged;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_proto::v1::{Event, Inventory};
use thiserror::Error;

/// Fault state numbers as stored (equal to `nodekeeper.v1.FaultState`).
pub(crate) const FAULT_RESOLVED: i32 = nodekeeper_proto::v1::FaultState::Resolved as i32;

#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("store {path}: {message}")]
    Sqlite { path: PathBuf, message: String },
    #[error("store {path}: journal_mode is {found}, expected wal")]
    NotWal { path: PathBuf, found: String },
    #[error("store {path}: synchronous is {found}, expected 2 (FULL)")]
    NotSynchronousFull { path: PathBuf, found: i64 },
    #[error("store {path}: schema version {found} is newer than this binary knows ({known})")]
    SchemaTooNew { path: PathBuf, found: i64, known: usize },
    #[error("store is closed")]
    Closed,
    /// The disk is within the reserve (or full): new data is refused until space is freed.
    #[error("the event center's store is low on disk space ({free} bytes free, {reserve} reserved): retry later")]
    Full { free: u64, reserve: u64 },
    #[error("corrupt row in {table}: {message}")]
    Corrupt { table: &'static str, message: String },
    #[error("postgres: {message}")]
    Postgres { message: String },
    /// PostgreSQL would acknowledge commits it has not made durable.
    #[error("postgres: synchronous_commit is {found}: acknowledged events could be lost; set it to on")]
    NotDurable { found: String },
}

impl StoreError {
    fn sqlite(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Sqlite { path: path.to_owned(), message: e.to_string() }
    }

    /// What a client may be told: no server paths.
    pub fn for_client(&self) -> String {
        match self {
            StoreError::Sqlite { message, .. } => format!("store: {message}"),
            StoreError::NotWal { .. }
            | StoreError::NotSynchronousFull { .. }
            | StoreError::SchemaTooNew { .. }
            | StoreError::NotDurable { .. } => "store misconfigured; see the event center's log".to_owned(),
            other => other.to_string(),
        }
    }
}

/// SQLite's "database or disk is full".
fn is_disk_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The identity that makes ingest idempotent: an origin and a sequence within it. Agent events
/// are (cluster, node, boot id) + sequence; a report is (producer, report id) + 0. The store keeps
/// one event per identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Keyed {
        origin: OriginKey,
        sequence: u64,
    },
    /// An event the center itself generated; always new.
    Center,
}

/// An interned origin key; share one per agent session so the writer resolves it once per batch.
pub type OriginKey = Arc<str>;

impl Identity {
    pub fn agent(origin: &OriginKey, sequence: u64) -> Self {
        Identity::Keyed { origin: origin.clone(), sequence }
    }

    pub fn report(producer: &str, report_id: &str) -> Self {
        Identity::Keyed { origin: format!("p/{producer}/{report_id}").into(), sequence: 0 }
    }
}

/// A durable consumer's stored key, `owner:name` (only `name` on an insecure center), as
/// (owner, name). Consumer names never hold ':'.
pub fn consumer_parts(key: &str) -> (&str, &str) {
    key.rsplit_once(':').unwrap_or(("", key))
}

/// The origin of one agent boot.
pub fn agent_origin(cluster: &str, node: &str, boot_id: &str) -> OriginKey {
    format!("a/{cluster}/{node}/{boot_id}").into()
}

/// The type of the events that carry one detector's view of a node (see `crate::quorum`).
pub const DETECTOR_VOTE: &str = "DetectorVote";

/// The key under which a node is interned in `origins`, for the events' node index.
pub(crate) fn node_origin(cluster: &str, node: &str) -> String {
    format!("n/{cluster}/{node}")
}

const CENTER_ORIGIN: &str = "c";

/// An event to append. The body is encoded by the caller (off the writer thread) with
/// `received_time` set; the store assigns the cursor and, for condition events, the fault.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub identity: Identity,
    pub event: Event,
    body: Vec<u8>,
}

impl NewEvent {
    pub fn new(identity: Identity, mut event: Event) -> Self {
        event.received_time = Some(nodekeeper_common::time::now_timestamp());
        let body = prost::Message::encode_to_vec(&event);
        NewEvent { identity, event, body }
    }

    /// An action the center itself records (`source`: the part of the center, e.g.
    /// "eventcenter/permits"; `node` empty: of the cluster).
    pub fn center_action(
        source: &str,
        cluster: &str,
        node: &str,
        kind: &str,
        message: String,
        severity: nodekeeper_proto::v1::Severity,
        attributes: Vec<(&str, String)>,
    ) -> Self {
        use nodekeeper_proto::v1::{Category, EventKind, Origin};
        let event = Event {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            kind: EventKind::Action as i32,
            r#type: kind.to_owned(),
            message,
            severity: severity as i32,
            category: Category::Action as i32,
            time: Some(nodekeeper_common::time::now_timestamp()),
            origin: Some(Origin { producer: "center".into(), ..Default::default() }),
            source: source.to_owned(),
            attributes: attributes.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            ..Default::default()
        };
        NewEvent::new(Identity::Center, event)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub cursor: u64,
    /// The event was already stored; `cursor` is where.
    pub duplicate: bool,
}

/// A node announcing itself (an agent's hello).
#[derive(Debug, Clone)]
pub struct NodeHello {
    pub cluster: String,
    pub node: String,
    pub boot_id: String,
    pub agent_version: String,
    pub inventory: Inventory,
    pub labels: HashMap<String, String>,
    pub heartbeat_interval: Duration,
    pub status_port: u32,
    /// A stream's opening hello (not an inventory update on an open stream).
    pub opens_stream: bool,
}

/// A cluster's nodes: known (not decommissioned), lost, with an agent stream open.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub nodes: u64,
    pub lost: u64,
    pub connected: u64,
}

#[derive(Debug, Clone)]
pub struct HelloOutcome {
    /// Highest sequence stored for this node and boot id (0 if none).
    pub last_stored_sequence: u64,
    /// The node's labels: its agent's merged with its Kubernetes Node's.
    pub labels: HashMap<String, String>,
    /// The node is stored lost (a replica that did not know may have to record its resumption).
    pub was_lost: bool,
}

/// A node's labels as the center uses them: those of its Kubernetes Node, with its agent's own
/// on top (the agent's value wins for a key both set).
pub fn merged_labels(node: &nodekeeper_proto::v1::Node) -> HashMap<String, String> {
    let mut labels = node.kubernetes_labels.clone();
    labels.extend(node.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey {
    pub cluster: String,
    pub node: String,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub commit_max_rows: usize,
    pub commit_delay: Duration,
    pub max_pending_rows: usize,
    /// Free bytes kept on the store's disk: below them new data is refused (see `space.rs`).
    pub min_free_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            commit_max_rows: 8192,
            commit_delay: Duration::from_millis(1),
            max_pending_rows: 200_000,
            min_free_bytes: 256 << 20,
        }
    }
}

/// What the writer counts, for `/metrics`.
#[derive(Clone)]
pub struct StoreMetrics {
    /// Time of each group's COMMIT (the fsync).
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Rows (events and state changes) per committed group.
    pub commit_rows: prometheus_client::metrics::histogram::Histogram,
    /// Events stored (duplicates excluded).
    pub events: prometheus_client::metrics::counter::Counter,
    /// Observations and reports that were already stored (resends).
    pub duplicates: prometheus_client::metrics::counter::Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        Self {
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            commit_rows: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            events: Default::default(),
            duplicates: Default::default(),
        }
    }
}

/// A batch of committed events, in cursor order.
pub type LiveBatch = Arc<Vec<Event>>;

#[cfg(test)]
mod tests;

//! A node's life in the store: registration (an agent's hello), liveness transitions, what
//! Kubernetes says of it (labels, the startup taint), and decommissioning. Each change that
//! matters downstream is recorded as a node event of the center's.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use nodekeeper_common::time::to_unix_ms;
use nodekeeper_proto::v1::{Event, Fault, Node};
use prost::Message;
use rusqlite::{OptionalExtension, params};

use super::Writer;
use crate::store::{HelloOutcome, NodeHello, NodeKey, Result, StoreError, lifecycle};

/// A change to a node that does not come from its agent.
pub(crate) enum NodeChange {
    /// What Kubernetes says of the node, as the remediator's sync saw it.
    Kubernetes {
        key: NodeKey,
        labels: HashMap<String, String>,
        onboarding: bool,
        onboarded: bool,
        issuer: String,
    },
    Decommission {
        key: NodeKey,
        reason: String,
        issuer: String,
    },
}

/// What a [`NodeChange`] did; `None` from the writer when the node is unknown.
#[derive(Debug, Clone, Default)]
pub struct NodeChanged {
    pub changed: bool,
    pub faults_closed: u32,
    /// Of the last event it recorded (0: none).
    pub cursor: u64,
    /// The node's labels (merged), when a Kubernetes sync changed them.
    pub labels: Option<HashMap<String, String>>,
}

impl Writer {
    fn stored_node(&self, key: &NodeKey) -> Result<Option<Node>> {
        let stored: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT info FROM nodes WHERE cluster = ?1 AND name = ?2")
            .and_then(|mut s| s.query_row(params![key.cluster, key.node], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        stored
            .map(|b| Node::decode(b.as_slice()))
            .transpose()
            .map_err(|e| StoreError::Corrupt { table: "nodes", message: e.to_string() })
    }

    fn save_node(&self, info: &Node) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE nodes SET info = ?3 WHERE cluster = ?1 AND name = ?2")
            .and_then(|mut s| s.execute(params![info.cluster, info.name, info.encode_to_vec()]))
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Appends the events, returning the cursor of the last (0: none).
    fn center_events(&mut self, events: Vec<Event>, published: &mut Vec<Event>) -> Result<u64> {
        let mut cursor = 0;
        for e in events {
            self.center_event(e, published)?;
            cursor = self.next_cursor - 1;
        }
        Ok(cursor)
    }

    pub(super) fn hello(&mut self, hello: NodeHello, published: &mut Vec<Event>) -> Result<HelloOutcome> {
        let now = SystemTime::now();
        let key = NodeKey { cluster: hello.cluster.clone(), node: hello.node.clone() };
        let previous = self.stored_node(&key)?;
        let was_lost: bool = self
            .conn
            .prepare_cached("SELECT lost FROM nodes WHERE cluster = ?1 AND name = ?2")
            .and_then(|mut s| s.query_row(params![key.cluster, key.node], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?
            .unwrap_or(false);
        let (info, events) = lifecycle::registered(previous.as_ref(), &hello, now);
        self.center_events(events, published)?;
        let now_ms = to_unix_ms(now);
        self.conn
            .prepare_cached(
                "INSERT INTO nodes (cluster, name, lost, liveness_changed_ms, info) VALUES (?1, ?2, 0, ?3, ?4)
                 ON CONFLICT (cluster, name) DO UPDATE SET info = excluded.info, decommissioned_ms = NULL",
            )
            .and_then(|mut s| s.execute(params![hello.cluster, hello.node, now_ms, info.encode_to_vec()]))
            .map_err(|e| self.err(e))?;
        let origin = self.origin_id(&crate::store::agent_origin(&hello.cluster, &hello.node, &hello.boot_id))?;
        let last: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(origin_seq), 0) FROM events WHERE origin = ?1")
            .and_then(|mut s| s.query_row([origin], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        Ok(HelloOutcome { last_stored_sequence: last as u64, labels: crate::store::merged_labels(&info), was_lost })
    }

    pub(super) fn liveness(
        &mut self,
        key: NodeKey,
        lost: bool,
        grace: Duration,
        published: &mut Vec<Event>,
    ) -> Result<()> {
        let now = SystemTime::now();
        let n = self
            .conn
            .prepare_cached("UPDATE nodes SET lost = ?3, liveness_changed_ms = ?4 WHERE cluster = ?1 AND name = ?2")
            .and_then(|mut s| s.execute(params![key.cluster, key.node, lost, to_unix_ms(now)]))
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Ok(());
        }
        self.center_event(lifecycle::liveness_event(&key, lost, grace, now), published)
    }

    pub(super) fn node_change(
        &mut self,
        change: NodeChange,
        published: &mut Vec<Event>,
    ) -> Result<Option<NodeChanged>> {
        match change {
            NodeChange::Kubernetes { key, labels, onboarding, onboarded, issuer } => {
                self.kubernetes(key, labels, onboarding, onboarded, &issuer, published)
            }
            NodeChange::Decommission { key, reason, issuer } => self.decommission(key, &reason, &issuer, published),
        }
    }

    fn kubernetes(
        &mut self,
        key: NodeKey,
        labels: HashMap<String, String>,
        onboarding: bool,
        onboarded: bool,
        issuer: &str,
        published: &mut Vec<Event>,
    ) -> Result<Option<NodeChanged>> {
        let Some(mut info) = self.stored_node(&key)? else { return Ok(None) };
        let before = crate::store::merged_labels(&info);
        let Some(events) = lifecycle::kubernetes(&mut info, labels, onboarding, onboarded, issuer, SystemTime::now())
        else {
            return Ok(Some(NodeChanged::default()));
        };
        self.save_node(&info)?;
        let cursor = self.center_events(events, published)?;
        let after = crate::store::merged_labels(&info);
        let labels = (after != before).then_some(after);
        Ok(Some(NodeChanged { changed: true, cursor, labels, ..Default::default() }))
    }

    fn decommission(
        &mut self,
        key: NodeKey,
        reason: &str,
        issuer: &str,
        published: &mut Vec<Event>,
    ) -> Result<Option<NodeChanged>> {
        let Some(mut info) = self.stored_node(&key)? else { return Ok(None) };
        if info.decommissioned_time.is_some() {
            return Ok(Some(NodeChanged::default()));
        }
        let now = SystemTime::now();
        let bodies: Vec<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT body FROM faults WHERE cluster = ?1 AND node = ?2 AND state <> 4 ORDER BY id")
            .and_then(|mut s| {
                s.query_map(params![key.cluster, key.node], |r| r.get(0))?.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.err(e))?;
        let open = bodies
            .iter()
            .map(|b| Fault::decode(b.as_slice()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt { table: "faults", message: e.to_string() })?;
        let (closed, e) = lifecycle::decommissioned(&mut info, open, reason, issuer, now);
        for fault in &closed {
            self.save_fault(fault)?;
        }
        self.save_node(&info)?;
        self.conn
            .prepare_cached(
                "UPDATE nodes SET lost = 0, liveness_changed_ms = ?3, decommissioned_ms = ?3 WHERE cluster = ?1 AND name = ?2",
            )
            .and_then(|mut s| s.execute(params![key.cluster, key.node, to_unix_ms(now)]))
            .map_err(|e| self.err(e))?;
        let cursor = self.center_events(vec![e], published)?;
        Ok(Some(NodeChanged { changed: true, faults_closed: closed.len() as u32, cursor, labels: None }))
    }
}

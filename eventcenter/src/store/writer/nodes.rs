//! A node's life in the store: registration (an agent's hello), liveness transitions, what
//! Kubernetes says of it (labels, the startup taint), and decommissioning. Each change that
//! matters downstream is recorded as a node event of the center's.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use nodekeeper_common::time::{self as nktime, to_duration, to_unix_ms};
use nodekeeper_proto::v1::{Category, Event, EventKind, Fault, Inventory, Node, Origin, Severity};
use prost::Message;
use rusqlite::{OptionalExtension, params};

use super::Writer;
use crate::store::{FAULT_RESOLVED, HelloOutcome, NodeHello, NodeKey, Result, StoreError};

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

/// A node event of the center's.
fn node_event(key: &NodeKey, kind: &str, severity: Severity, message: String, now: SystemTime) -> Event {
    Event {
        cluster: key.cluster.clone(),
        node: key.node.clone(),
        kind: EventKind::Node as i32,
        r#type: kind.to_owned(),
        message,
        severity: severity as i32,
        category: Category::Lifecycle as i32,
        time: Some(nktime::to_timestamp(now)),
        origin: Some(Origin { producer: "center".into(), ..Default::default() }),
        source: "eventcenter".into(),
        ..Default::default()
    }
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
        let info = Node {
            name: hello.node.clone(),
            cluster: hello.cluster.clone(),
            boot_id: hello.boot_id.clone(),
            agent_version: hello.agent_version.clone(),
            inventory: Some(hello.inventory.clone()),
            labels: hello.labels.clone(),
            registered_time: previous.as_ref().and_then(|p| p.registered_time).or(Some(nktime::to_timestamp(now))),
            heartbeat_interval: Some(to_duration(hello.heartbeat_interval)),
            status_port: hello.status_port,
            // What Kubernetes said of it stays; a hello ends a decommission.
            kubernetes_labels: previous.as_ref().map(|p| p.kubernetes_labels.clone()).unwrap_or_default(),
            kubernetes_synced_time: previous.as_ref().and_then(|p| p.kubernetes_synced_time),
            onboarding: previous.as_ref().is_some_and(|p| p.onboarding),
            onboarded_time: previous.as_ref().and_then(|p| p.onboarded_time),
            ..Default::default()
        };
        let base = |kind: &str, message: String| node_event(&key, kind, Severity::Info, message, now);
        let mut events = Vec::new();
        match &previous {
            None => events.push(base("NodeRegistered", format!("node registered, agent {}", hello.agent_version))),
            Some(p) if p.decommissioned_time.is_some() => events.push(base(
                "NodeRegistered",
                format!("node registered again after it was decommissioned, agent {}", hello.agent_version),
            )),
            Some(p) => {
                if p.boot_id != hello.boot_id {
                    let mut e =
                        base("NodeRebooted", format!("boot id changed from {} to {}", p.boot_id, hello.boot_id));
                    e.attributes.insert("previous_boot_id".into(), p.boot_id.clone());
                    e.attributes.insert("boot_id".into(), hello.boot_id.clone());
                    events.push(e);
                }
                let changed = inventory_changes(p.inventory.as_ref(), &hello.inventory);
                if !changed.is_empty() {
                    let mut e = base("NodeInventoryChanged", format!("inventory changed: {}", changed.join(", ")));
                    e.attributes.insert("changed".into(), changed.join(","));
                    events.push(e);
                }
            }
        }
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
        Ok(HelloOutcome { last_stored_sequence: last as u64, labels: crate::store::merged_labels(&info) })
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
        let (kind, severity, message) = if lost {
            ("NodeHeartbeatLost", Severity::Error, format!("no heartbeat for {:.1}s", grace.as_secs_f64()))
        } else {
            ("NodeHeartbeatResumed", Severity::Info, "heartbeats resumed".to_owned())
        };
        let mut event = node_event(&key, kind, severity, message, now);
        event.attributes.insert("grace_ms".into(), grace.as_millis().to_string());
        self.center_event(event, published)
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
        let now = SystemTime::now();
        let mut events = Vec::new();
        let diff = label_changes(&info.kubernetes_labels, &labels);
        if !diff.is_empty() {
            let mut e = node_event(
                &key,
                "NodeLabelsChanged",
                Severity::Info,
                format!("Kubernetes labels changed: {}", diff.join(", ")),
                now,
            );
            e.attributes.insert("changed".into(), diff.join(","));
            events.push(e);
        }
        if onboarding && !info.onboarding {
            events.push(node_event(
                &key,
                "NodeOnboarding",
                Severity::Info,
                "the Kubernetes Node carries the startup taint: it takes no pods until its gates hold".into(),
                now,
            ));
        }
        if onboarded {
            let mut e = node_event(
                &key,
                "NodeOnboarded",
                Severity::Info,
                format!("every gate held: {issuer} removed the startup taint"),
                now,
            );
            e.attributes.insert("issuer".into(), issuer.to_owned());
            events.push(e);
            info.onboarded_time = Some(nktime::to_timestamp(now));
        }
        let first_sync = info.kubernetes_synced_time.is_none();
        if events.is_empty() && !first_sync && info.onboarding == onboarding {
            return Ok(Some(NodeChanged::default()));
        }
        let before = crate::store::merged_labels(&info);
        info.kubernetes_labels = labels;
        info.kubernetes_synced_time = info.kubernetes_synced_time.or(Some(nktime::to_timestamp(now)));
        info.onboarding = onboarding && !onboarded;
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
        let resolution = format!("node decommissioned: {reason}");
        let bodies: Vec<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT body FROM faults WHERE cluster = ?1 AND node = ?2 AND state <> 4 ORDER BY id")
            .and_then(|mut s| {
                s.query_map(params![key.cluster, key.node], |r| r.get(0))?.collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.err(e))?;
        let mut closed = Vec::new();
        for body in bodies {
            let mut fault = Fault::decode(body.as_slice())
                .map_err(|e| StoreError::Corrupt { table: "faults", message: e.to_string() })?;
            fault.state = FAULT_RESOLVED;
            fault.resolved_time = Some(nktime::to_timestamp(now));
            fault.resolution = resolution.clone();
            self.save_fault(&fault)?;
            closed.push(fault.id.to_string());
        }
        info.decommissioned_time = Some(nktime::to_timestamp(now));
        info.onboarding = false;
        self.save_node(&info)?;
        self.conn
            .prepare_cached(
                "UPDATE nodes SET lost = 0, liveness_changed_ms = ?3, decommissioned_ms = ?3 WHERE cluster = ?1 AND name = ?2",
            )
            .and_then(|mut s| s.execute(params![key.cluster, key.node, to_unix_ms(now)]))
            .map_err(|e| self.err(e))?;
        let mut e = node_event(
            &key,
            "NodeDecommissioned",
            Severity::Info,
            format!("{resolution} (by {issuer}); {} open fault(s) closed", closed.len()),
            now,
        );
        e.attributes.insert("issuer".into(), issuer.to_owned());
        e.attributes.insert("reason".into(), reason.to_owned());
        e.attributes.insert("faults_closed".into(), closed.join(","));
        let cursor = self.center_events(vec![e], published)?;
        Ok(Some(NodeChanged { changed: true, faults_closed: closed.len() as u32, cursor, labels: None }))
    }
}

/// "+key", "-key" and "~key" for each label added, removed or changed, in key order.
fn label_changes(old: &HashMap<String, String>, new: &HashMap<String, String>) -> Vec<String> {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| match (old.get(k), new.get(k)) {
            (None, Some(_)) => Some(format!("+{k}")),
            (Some(_), None) => Some(format!("-{k}")),
            (Some(a), Some(b)) if a != b => Some(format!("~{k}")),
            _ => None,
        })
        .collect()
}

/// Names of the inventory fields that differ.
fn inventory_changes(old: Option<&Inventory>, new: &Inventory) -> Vec<&'static str> {
    let default = Inventory::default();
    let old = old.unwrap_or(&default);
    let mut changed = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("hostname", old.hostname != new.hostname);
    check("interfaces", old.interfaces != new.interfaces);
    check("kernel_version", old.kernel_version != new.kernel_version);
    check("os", old.os_name != new.os_name || old.os_version != new.os_version);
    check("cpu", old.cpu_model != new.cpu_model || old.cpu_count != new.cpu_count);
    check("memory_bytes", old.memory_bytes != new.memory_bytes);
    check("disks", old.disks != new.disks);
    check("iscsi_initiator_name", old.iscsi_initiator_name != new.iscsi_initiator_name);
    check("machine_id", old.machine_id != new.machine_id);
    changed
}

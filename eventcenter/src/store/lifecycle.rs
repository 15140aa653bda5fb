//! A node's life as the center records it, decided apart from any database so that every store
//! engine records alike: what a hello, a liveness transition, a Kubernetes sync and a
//! decommissioning change on the stored node, and the node events they make.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use nodekeeper_common::time::{self as nktime, to_duration};
use nodekeeper_proto::v1::{Category, Event, EventKind, Fault, FaultState, Inventory, Node, Origin, Severity};

use super::{NodeHello, NodeKey};

/// A node event of the center's.
pub(crate) fn node_event(key: &NodeKey, kind: &str, severity: Severity, message: String, now: SystemTime) -> Event {
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

/// The node an agent's hello stores (what it had before kept where the agent does not say), and
/// the events it makes: registered (again), rebooted, inventory changed.
pub(crate) fn registered(previous: Option<&Node>, hello: &NodeHello, now: SystemTime) -> (Node, Vec<Event>) {
    let key = NodeKey { cluster: hello.cluster.clone(), node: hello.node.clone() };
    let info = Node {
        name: hello.node.clone(),
        cluster: hello.cluster.clone(),
        boot_id: hello.boot_id.clone(),
        agent_version: hello.agent_version.clone(),
        inventory: Some(hello.inventory.clone()),
        labels: hello.labels.clone(),
        registered_time: previous.and_then(|p| p.registered_time).or(Some(nktime::to_timestamp(now))),
        heartbeat_interval: Some(to_duration(hello.heartbeat_interval)),
        status_port: hello.status_port,
        // What Kubernetes said of it stays; a hello ends a decommission.
        kubernetes_labels: previous.map(|p| p.kubernetes_labels.clone()).unwrap_or_default(),
        kubernetes_synced_time: previous.and_then(|p| p.kubernetes_synced_time),
        onboarding: previous.is_some_and(|p| p.onboarding),
        onboarded_time: previous.and_then(|p| p.onboarded_time),
        ..Default::default()
    };
    let base = |kind: &str, message: String| node_event(&key, kind, Severity::Info, message, now);
    let mut events = Vec::new();
    match previous {
        None => events.push(base("NodeRegistered", format!("node registered, agent {}", hello.agent_version))),
        Some(p) if p.decommissioned_time.is_some() => events.push(base(
            "NodeRegistered",
            format!("node registered again after it was decommissioned, agent {}", hello.agent_version),
        )),
        Some(p) => {
            if p.boot_id != hello.boot_id {
                let mut e = base("NodeRebooted", format!("boot id changed from {} to {}", p.boot_id, hello.boot_id));
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
    (info, events)
}

/// The event of a liveness transition.
pub(crate) fn liveness_event(key: &NodeKey, lost: bool, grace: Duration, now: SystemTime) -> Event {
    let (kind, severity, message) = if lost {
        ("NodeHeartbeatLost", Severity::Error, format!("no heartbeat for {:.1}s", grace.as_secs_f64()))
    } else {
        ("NodeHeartbeatResumed", Severity::Info, "heartbeats resumed".to_owned())
    };
    let mut event = node_event(key, kind, severity, message, now);
    event.attributes.insert("grace_ms".into(), grace.as_millis().to_string());
    event
}

/// What Kubernetes says of a node (its labels, the startup taint, whether `issuer` just removed
/// it): the events, with `info` changed; `None` when nothing is to be stored.
pub(crate) fn kubernetes(
    info: &mut Node,
    labels: HashMap<String, String>,
    onboarding: bool,
    onboarded: bool,
    issuer: &str,
    now: SystemTime,
) -> Option<Vec<Event>> {
    let key = NodeKey { cluster: info.cluster.clone(), node: info.name.clone() };
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
        return None;
    }
    info.kubernetes_labels = labels;
    info.kubernetes_synced_time = info.kubernetes_synced_time.or(Some(nktime::to_timestamp(now)));
    info.onboarding = onboarding && !onboarded;
    Some(events)
}

/// A node decommissioned: its open faults resolved (returned, to be stored), `info` marked, and
/// the event.
pub(crate) fn decommissioned(
    info: &mut Node,
    open: Vec<Fault>,
    reason: &str,
    issuer: &str,
    now: SystemTime,
) -> (Vec<Fault>, Event) {
    let key = NodeKey { cluster: info.cluster.clone(), node: info.name.clone() };
    let resolution = format!("node decommissioned: {reason}");
    let closed: Vec<Fault> = open
        .into_iter()
        .map(|mut fault| {
            fault.state = FaultState::Resolved as i32;
            fault.resolved_time = Some(nktime::to_timestamp(now));
            fault.resolution = resolution.clone();
            fault
        })
        .collect();
    info.decommissioned_time = Some(nktime::to_timestamp(now));
    info.onboarding = false;
    let ids: Vec<String> = closed.iter().map(|f| f.id.to_string()).collect();
    let mut e = node_event(
        &key,
        "NodeDecommissioned",
        Severity::Info,
        format!("{resolution} (by {issuer}); {} open fault(s) closed", closed.len()),
        now,
    );
    e.attributes.insert("issuer".into(), issuer.to_owned());
    e.attributes.insert("reason".into(), reason.to_owned());
    e.attributes.insert("faults_closed".into(), ids.join(","));
    (closed, e)
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

//! `nodekeeper nodes`: the fleet's nodes, one node's readiness gates, decommissioning.

use std::collections::BTreeMap;

use nodekeeper_proto::v1::{
    DecommissionNodeRequest, GetNodeRequest, ListNodesRequest, Node, fleet_service_client::FleetServiceClient,
};
use tonic::transport::Channel;

use crate::args::NodeRef;
use crate::connect::status;
use crate::output::{self, enum_name, json_line, table, time};

/// LIVENESS for people: alive, lost, or decommissioned.
fn liveness(n: &Node) -> String {
    if n.decommissioned_time.is_some() {
        return "decommissioned".into();
    }
    enum_name(n.liveness().as_str_name(), "LIVENESS_")
}

/// GATES for people: "ok", or the first gate that does not hold (marked when the node waits to
/// onboard).
fn gates(n: &Node) -> String {
    match n.gates.iter().find(|g| !g.holds) {
        None => "ok".into(),
        Some(g) if n.onboarding => format!("onboarding: {}", g.name),
        Some(g) => g.name.clone(),
    }
}

pub async fn list(ch: Channel, json: bool, clusters: Vec<String>, decommissioned: bool) -> anyhow::Result<()> {
    let request = ListNodesRequest { clusters, include_decommissioned: decommissioned, ..Default::default() };
    let nodes = FleetServiceClient::new(ch).list_nodes(request).await.map_err(status)?.into_inner().nodes;
    if json {
        for n in &nodes {
            json_line("nodekeeper.v1.Node", n)?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let open = n.conditions.iter().filter(|c| c.condition.as_ref().is_some_and(|c| c.status == 1)).count();
            vec![
                n.cluster.clone(),
                n.name.clone(),
                liveness(n),
                if n.connected { "yes".into() } else { "no".into() },
                time(n.last_heartbeat_time.as_ref()),
                n.agent_version.clone(),
                n.inventory.as_ref().map(|i| i.kernel_version.clone()).unwrap_or_default(),
                open.to_string(),
                gates(n),
            ]
        })
        .collect();
    table(
        &["CLUSTER", "NODE", "LIVENESS", "CONNECTED", "LAST HEARTBEAT", "AGENT", "KERNEL", "CONDITIONS", "GATES"],
        &rows,
    )?;
    // The overview: nodes waiting to onboard, by the first gate that holds them.
    let mut waiting: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.onboarding) {
        let gate = n.gates.iter().find(|g| !g.holds).map_or("none (the taint goes at the next check)", |g| &g.name);
        *waiting.entry(gate).or_default() += 1;
    }
    if !waiting.is_empty() {
        let total: usize = waiting.values().sum();
        let by: Vec<String> = waiting.iter().map(|(g, n)| format!("{g}: {n}")).collect();
        output::println("")?;
        output::println(&format!("Waiting to onboard: {total} node(s); held by {}", by.join(", ")))?;
    }
    Ok(())
}

pub async fn show(ch: Channel, json: bool, target: NodeRef) -> anyhow::Result<()> {
    let request = GetNodeRequest { cluster: target.cluster, node: target.node };
    let n = FleetServiceClient::new(ch).get_node(request).await.map_err(status)?.into_inner();
    if json {
        return json_line("nodekeeper.v1.Node", &n);
    }
    let inventory = n.inventory.clone().unwrap_or_default();
    let kubernetes = match (&n.kubernetes_synced_time, n.onboarding, &n.onboarded_time) {
        (None, _, _) => "not seen in Kubernetes".to_owned(),
        (Some(_), true, _) => "waiting to onboard (startup taint)".to_owned(),
        (Some(_), false, Some(t)) => format!("onboarded {}", time(Some(t))),
        (Some(_), false, None) => "schedulable".to_owned(),
    };
    let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let fields = [
        ("Node", format!("{}/{}", n.cluster, n.name)),
        ("Liveness", liveness(&n)),
        ("Connected", if n.connected { "yes".into() } else { "no".into() }),
        ("Last heartbeat", time(n.last_heartbeat_time.as_ref())),
        ("Registered", time(n.registered_time.as_ref())),
        ("Decommissioned", time(n.decommissioned_time.as_ref())),
        ("Agent", n.agent_version.clone()),
        ("Boot id", n.boot_id.clone()),
        ("Kernel", inventory.kernel_version.clone()),
        ("Kubernetes", kubernetes),
        ("Labels", labels.join(",")),
    ];
    output::fields(&fields, 15, &[])?;
    output::println("Readiness gates:")?;
    let rows: Vec<Vec<String>> = n
        .gates
        .iter()
        .map(|g| vec![g.name.clone(), if g.holds { "yes".into() } else { "no".into() }, g.reason.clone()])
        .collect();
    table(&["GATE", "HOLDS", "WHY NOT"], &rows)?;
    output::println("")?;
    output::println("Conditions:")?;
    let rows: Vec<Vec<String>> = n
        .conditions
        .iter()
        .filter_map(|c| c.condition.as_ref().map(|cond| (c, cond)))
        .map(|(c, cond)| {
            vec![
                cond.r#type.clone(),
                enum_name(cond.status().as_str_name(), "CONDITION_STATUS_"),
                cond.reason.clone(),
                c.producer.clone(),
                time(cond.last_transition_time.as_ref()),
            ]
        })
        .collect();
    table(&["TYPE", "STATUS", "REASON", "PRODUCER", "SINCE"], &rows)?;
    Ok(())
}

pub async fn delete(ch: Channel, json: bool, target: NodeRef, reason: String) -> anyhow::Result<()> {
    let request = DecommissionNodeRequest { cluster: target.cluster.clone(), node: target.node.clone(), reason };
    let r = FleetServiceClient::new(ch).decommission_node(request).await.map_err(status)?.into_inner();
    if json {
        return json_line("nodekeeper.v1.DecommissionNodeResponse", &r);
    }
    if r.cursor.is_empty() {
        output::println(&format!("node {}/{} was decommissioned already", target.cluster, target.node))?;
    } else {
        output::println(&format!(
            "node {}/{} decommissioned; {} open fault(s) closed (event {})",
            target.cluster, target.node, r.faults_closed, r.cursor
        ))?;
    }
    Ok(())
}

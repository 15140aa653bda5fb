//! Desired components and their status: `SetDesiredComponents` stores specs per node or per label
//! selector and pushes each affected connected node its new desired state; `ListComponents`
//! answers what every node reported, with the readiness gate "components converged".

use std::collections::{BTreeMap, HashMap};

use nodekeeper_common::tls::Kind;
use nodekeeper_proto::v1::{
    CenterMessage, ComponentPhase, ComponentSpec, ComponentStatus, ComponentStatusReport, DesiredState,
    ListComponentsRequest, ListComponentsResponse, Node, NodeComponents, SetDesiredComponentsRequest,
    SetDesiredComponentsResponse, center_message, set_desired_components_request::Target,
};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{Ctx, READERS, require, require_cluster, scope_clusters, store_status};
use crate::store::DesiredRow;
use crate::store::NodeKey;
use crate::{selector, validate};

/// A cluster's desired-components rows, indexed: selector rows (oldest generation first) and
/// each node's own row.
pub struct Desired<'a> {
    selectors: Vec<&'a DesiredRow>,
    own: HashMap<&'a str, &'a DesiredRow>,
}

impl<'a> Desired<'a> {
    pub fn new(rows: &'a [DesiredRow]) -> Self {
        let mut out = Desired { selectors: Vec::new(), own: HashMap::new() };
        for row in rows {
            if let Some(node) = row.0.strip_prefix("node:") {
                out.own.insert(node, row);
            } else {
                out.selectors.push(row);
            }
        }
        out
    }

    /// The node's own row: (generation, specs).
    pub fn own(&self, node: &str) -> Option<(u64, &'a [ComponentSpec])> {
        self.own.get(node).map(|(_, g, specs)| (*g, specs.as_slice()))
    }

    /// The specs of the row of `target` ("selector:..."), if there is one.
    pub fn selector_row(&self, target: &str) -> Option<&'a [ComponentSpec]> {
        self.selectors.iter().find(|(t, _, _)| t == target).map(|(_, _, specs)| specs.as_slice())
    }

    /// The desired state of one node: the specs of every selector its labels match (older
    /// generations first, a newer one replacing a component of the same name), then its own.
    pub fn effective(&self, node: &str, labels: &HashMap<String, String>) -> DesiredState {
        let mut by_name: BTreeMap<String, ComponentSpec> = BTreeMap::new();
        let mut generation = 0;
        let matching = self.selectors.iter().filter(|(target, _, _)| {
            target.strip_prefix("selector:").is_some_and(|sel| selector::matches(sel, labels))
        });
        for (_, g, specs) in matching.chain(self.own.get(node)) {
            generation = generation.max(*g);
            for s in specs {
                by_name.insert(s.name.clone(), s.clone());
            }
        }
        DesiredState { generation, components: by_name.into_values().collect() }
    }
}

/// The desired state of one node (see `Desired::effective`).
pub fn effective(rows: &[DesiredRow], node: &str, labels: &HashMap<String, String>) -> DesiredState {
    Desired::new(rows).effective(node, labels)
}

/// Sends a connected node its desired state (if anything is desired of it).
pub async fn push(ctx: &Ctx, key: &NodeKey, labels: &HashMap<String, String>) -> Result<bool, Status> {
    Ok(push_many(ctx, &key.cluster, &[(key.node.as_str(), labels)]).await? == 1)
}

/// Sends each connected node (name, labels) of `cluster` its desired state, reading the
/// cluster's desired components once; returns how many were sent one.
pub async fn push_many(ctx: &Ctx, cluster: &str, nodes: &[(&str, &HashMap<String, String>)]) -> Result<usize, Status> {
    let rows = ctx.store.desired_components(cluster.to_owned()).await.map_err(store_status)?;
    let desired = Desired::new(&rows);
    let mut sent = 0;
    for (node, labels) in nodes {
        let state = desired.effective(node, labels);
        if state.generation == 0 {
            continue;
        }
        let key = NodeKey { cluster: cluster.to_owned(), node: (*node).to_owned() };
        let Some(tx) = ctx.sessions.sender(&key) else { continue };
        if tx.send(Ok(CenterMessage { msg: Some(center_message::Msg::DesiredState(state)) })).await.is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

pub(crate) fn check_spec(s: &ComponentSpec) -> Result<(), Status> {
    let bad = |e: String| Status::invalid_argument(format!("component {:?}: {e}", s.name));
    nodekeeper_common::names::component(&s.name).map_err(|e| bad(e.to_string()))?;
    nodekeeper_common::names::package(&s.package).map_err(|e| bad(e.to_string()))?;
    // An absent component has no version (the agent checks the rest of the spec whole).
    if !s.absent {
        nodekeeper_common::names::evr(&s.version).map_err(|e| bad(e.to_string()))?;
    }
    for p in &s.with_packages {
        nodekeeper_common::names::package(&p.package).map_err(|e| bad(e.to_string()))?;
        if !p.version.is_empty() {
            nodekeeper_common::names::evr(&p.version).map_err(|e| bad(format!("package {:?}: {e}", p.package)))?;
        }
    }
    Ok(())
}

pub async fn set_desired(
    ctx: &Ctx,
    request: Request<SetDesiredComponentsRequest>,
) -> Result<Response<SetDesiredComponentsResponse>, Status> {
    let caller = ctx.caller(&request)?;
    require(&caller, &[Kind::Admin], "set desired components")?;
    let req = request.into_inner();
    validate::name(nodekeeper_common::names::cluster(&req.cluster))?;
    require_cluster(&caller, &req.cluster)?;
    let target = match &req.target {
        Some(Target::Node(n)) => {
            validate::name(nodekeeper_common::names::node(n))?;
            format!("node:{n}")
        }
        Some(Target::Selector(s)) => selector::target(s).map_err(Status::invalid_argument)?,
        None => return Err(Status::invalid_argument("name a node or a label selector")),
    };
    let mut names = std::collections::HashSet::new();
    for s in &req.components {
        check_spec(s)?;
        if !names.insert(&s.name) {
            return Err(Status::invalid_argument(format!("component {:?} is listed twice", s.name)));
        }
    }
    let body = DesiredState { generation: 0, components: req.components.clone() }.encode_to_vec();
    let generation = ctx.store.set_desired(req.cluster.clone(), target.clone(), body).await.map_err(store_status)?;
    // Which known nodes it concerns, and push to those connected.
    let nodes = ctx.store.list_nodes(vec![req.cluster.clone()], false).await.map_err(store_status)?;
    let hits: Vec<&Node> = nodes
        .iter()
        .filter(|n| match &req.target {
            Some(Target::Node(name)) => &n.name == name,
            Some(Target::Selector(s)) => selector::matches(s, &n.labels),
            None => false,
        })
        .collect();
    let matched = hits.len() as u32;
    let targets: Vec<(&str, &HashMap<String, String>)> = hits.iter().map(|n| (n.name.as_str(), &n.labels)).collect();
    push_many(ctx, &req.cluster, &targets).await?;
    tracing::info!(cluster = %req.cluster, target = %target, generation, nodes = matched, components = req.components.len(), "desired components set");
    Ok(Response::new(SetDesiredComponentsResponse { generation, nodes_matched: matched }))
}

pub async fn list(
    ctx: &Ctx,
    request: Request<ListComponentsRequest>,
) -> Result<Response<ListComponentsResponse>, Status> {
    let caller = ctx.caller(&request)?;
    require(&caller, READERS, "list components")?;
    let req = request.into_inner();
    let clusters = scope_clusters(&caller, req.clusters)?;
    let mut nodes = ctx.store.list_nodes(clusters, false).await.map_err(store_status)?;
    if !req.nodes.is_empty() {
        nodes.retain(|n| req.nodes.contains(&n.name));
    }
    let nodes = of_nodes(ctx, &nodes).await?;
    Ok(Response::new(ListComponentsResponse { nodes }))
}

/// The key of the only node of `nodes` (reads for one node are narrowed to it).
pub fn only(nodes: &[Node]) -> Option<NodeKey> {
    match nodes {
        [n] => Some(NodeKey { cluster: n.cluster.clone(), node: n.name.clone() }),
        _ => None,
    }
}

/// Each node's components, desired against reported, and whether they converged, in the nodes'
/// order; nodes with neither are left out.
pub async fn of_nodes(ctx: &Ctx, nodes: &[Node]) -> Result<Vec<NodeComponents>, Status> {
    let clusters: Vec<String> = {
        let mut c: Vec<String> = nodes.iter().map(|n| n.cluster.clone()).collect();
        c.sort();
        c.dedup();
        c
    };
    let mut reports: HashMap<(String, String), ComponentStatusReport> = ctx
        .store
        .component_statuses(clusters.clone(), only(nodes))
        .await
        .map_err(store_status)?
        .into_iter()
        .map(|(c, n, r)| ((c, n), r))
        .collect();
    let mut rows_by_cluster: HashMap<String, Vec<DesiredRow>> = HashMap::new();
    for c in &clusters {
        rows_by_cluster.insert(c.clone(), ctx.store.desired_components(c.clone()).await.map_err(store_status)?);
    }
    let desired_by_cluster: HashMap<&str, Desired<'_>> =
        rows_by_cluster.iter().map(|(c, rows)| (c.as_str(), Desired::new(rows))).collect();
    let mut out = Vec::new();
    for n in nodes {
        let desired = desired_by_cluster[n.cluster.as_str()].effective(&n.name, &n.labels);
        let report = reports.remove(&(n.cluster.clone(), n.name.clone())).unwrap_or_default();
        if desired.components.is_empty() && report.components.is_empty() {
            continue;
        }
        let mut components = report.components.clone();
        // Desired but not reported yet: pending.
        for d in &desired.components {
            if !components.iter().any(|c| c.name == d.name) {
                components.push(ComponentStatus {
                    name: d.name.clone(),
                    desired_version: desired_version(d).to_owned(),
                    phase: ComponentPhase::Pending as i32,
                    ..Default::default()
                });
            }
        }
        components.sort_by(|a, b| a.name.cmp(&b.name));
        let converged = report.generation == desired.generation
            && desired.components.iter().all(|d| {
                components.iter().any(|c| {
                    c.name == d.name
                        && c.desired_version == desired_version(d)
                        && c.phase() == ComponentPhase::Converged
                })
            });
        out.push(NodeComponents {
            cluster: n.cluster.clone(),
            node: n.name.clone(),
            components,
            desired_generation: desired.generation,
            converged,
            reported_generation: report.generation,
        });
    }
    Ok(out)
}

/// What a component's status says it wants: its version, or "absent" (as the agent reports it).
pub fn desired_version(d: &nodekeeper_proto::v1::ComponentSpec) -> &str {
    if d.absent { "absent" } else { &d.version }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, version: &str) -> ComponentSpec {
        ComponentSpec { name: name.into(), package: name.into(), version: version.into(), ..Default::default() }
    }

    #[test]
    fn node_targets_override_selectors_and_newer_selectors_override_older() {
        let rows: Vec<DesiredRow> = vec![
            ("selector:pool=gpu".into(), 1, vec![spec("kubelet", "1.28-1"), spec("containerd", "1.7-1")]),
            ("node:n1".into(), 2, vec![spec("kubelet", "1.29-1")]),
            ("selector:pool=gpu,zone=a".into(), 3, vec![spec("containerd", "1.8-1")]),
            ("selector:pool=cpu".into(), 4, vec![spec("docker", "24-1")]),
        ];
        let labels: HashMap<String, String> = [("pool".into(), "gpu".into()), ("zone".into(), "a".into())].into();
        let s = effective(&rows, "n1", &labels);
        let got: Vec<(String, String)> = s.components.iter().map(|c| (c.name.clone(), c.version.clone())).collect();
        assert_eq!(got, vec![("containerd".into(), "1.8-1".into()), ("kubelet".into(), "1.29-1".into())]);
        assert_eq!(s.generation, 3);
        assert_eq!(effective(&rows, "n2", &HashMap::new()).generation, 0, "nothing desired of an unlabelled node");
        assert!(selector::parse("a").is_err());
        assert!(selector::parse("a=,b=c").is_err());
    }
}

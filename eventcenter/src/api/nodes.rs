//! A node's place in the fleet beyond its agent: its readiness gates, what Kubernetes says of it
//! (`SyncKubernetesNode`), and its decommissioning (`DecommissionNode`).

use nodekeeper_common::names;
use nodekeeper_proto::v1::{
    DecommissionNodeRequest, DecommissionNodeResponse, Node, SyncKubernetesNodeRequest, SyncKubernetesNodeResponse,
};
use tonic::{Request, Response, Status};

use super::{Caller, Ctx, issuer, require, require_cluster, store_status};
use crate::store::NodeKey;
use crate::{readiness, validate};

/// Fills each node's gates (one node's reads are narrowed to it).
pub async fn fill_gates(ctx: &Ctx, nodes: &mut [Node]) -> Result<(), Status> {
    let components = super::components::of_nodes(ctx, nodes).await?;
    let mut clusters: Vec<String> = nodes.iter().map(|n| n.cluster.clone()).collect();
    clusters.sort();
    clusters.dedup();
    let open = ctx.store.open_fault_types(clusters, super::components::only(nodes)).await.map_err(store_status)?;
    // In the nodes' order: one walk, not a search per node (10,000 nodes in a listing).
    let mut components = components.iter().peekable();
    for n in nodes {
        let c = components.next_if(|c| c.cluster == n.cluster && c.node == n.name);
        let faults = open.get(&(n.cluster.clone(), n.name.clone())).map(Vec::as_slice).unwrap_or_default();
        n.gates = readiness::gates(n, c, faults, &ctx.config.readiness_gates);
    }
    Ok(())
}

fn key_of(caller: &Caller, cluster: String, node: String) -> Result<NodeKey, Status> {
    validate::name(names::cluster(&cluster))?;
    validate::name(names::node(&node))?;
    require_cluster(caller, &cluster)?;
    Ok(NodeKey { cluster, node })
}

fn no_node(key: &NodeKey) -> Status {
    Status::not_found(format!("no node {} in cluster {}", key.node, key.cluster))
}

pub async fn sync_kubernetes(
    ctx: &Ctx,
    request: Request<SyncKubernetesNodeRequest>,
) -> Result<Response<SyncKubernetesNodeResponse>, Status> {
    let caller = ctx.caller(&request)?;
    require(&caller, super::ACTORS, "sync nodes from Kubernetes")?;
    let req = request.into_inner();
    let key = key_of(&caller, req.cluster, req.node)?;
    validate::labels(&req.labels)?;
    let changed = ctx
        .store
        .sync_kubernetes(key.clone(), req.labels, req.onboarding, req.onboarded, issuer(&caller))
        .await
        .map_err(store_status)?
        .ok_or_else(|| no_node(&key))?;
    // New labels may select other desired components.
    if let Some(labels) = &changed.labels {
        super::components::push(ctx, &key, labels).await?;
    }
    if req.onboarded {
        tracing::info!(cluster = %key.cluster, node = %key.node, by = %issuer(&caller), "node onboarded: startup taint removed");
    }
    Ok(Response::new(SyncKubernetesNodeResponse { changed: changed.changed }))
}

pub async fn decommission(
    ctx: &Ctx,
    request: Request<DecommissionNodeRequest>,
) -> Result<Response<DecommissionNodeResponse>, Status> {
    let caller = ctx.caller(&request)?;
    require(&caller, super::ACTORS, "decommission nodes")?;
    let req = request.into_inner();
    let key = key_of(&caller, req.cluster, req.node)?;
    let reason = if req.reason.trim().is_empty() { "no reason given".to_owned() } else { req.reason };
    validate::text("reason", &reason)?;
    // Connected here, or (replicas) to the replica that owns the node.
    let stored = ctx.store.get_node(key.clone()).await.map_err(store_status)?;
    if ctx.liveness.connected(&key) || stored.is_some_and(|n| n.connected) {
        return Err(Status::failed_precondition(format!(
            "node {} of cluster {} has its agent connected: stop the agent first",
            key.node, key.cluster
        )));
    }
    let done = ctx
        .store
        .decommission(key.clone(), reason.clone(), issuer(&caller))
        .await
        .map_err(store_status)?
        .ok_or_else(|| no_node(&key))?;
    ctx.liveness.forget(&key);
    if done.changed {
        tracing::info!(cluster = %key.cluster, node = %key.node, by = %issuer(&caller), %reason, faults_closed = done.faults_closed, "node decommissioned");
    }
    let cursor = if done.cursor == 0 { String::new() } else { crate::cursor::format(done.cursor) };
    Ok(Response::new(DecommissionNodeResponse { faults_closed: done.faults_closed, cursor }))
}

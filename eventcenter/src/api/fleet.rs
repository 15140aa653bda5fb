//! Nodes, faults and conditions.

use nodekeeper_common::names;
use nodekeeper_proto::v1::{
    Fault, GetFaultRequest, GetFaultResponse, GetNodeRequest, Inventory, ListComponentsRequest, ListComponentsResponse,
    ListConditionsRequest, ListConditionsResponse, ListFaultsRequest, ListFaultsResponse, ListNodesRequest,
    ListNodesResponse, NetworkInterface, Node, SetDesiredComponentsRequest, SetDesiredComponentsResponse,
    fleet_service_server,
};
use tonic::{Request, Response, Status};

use super::{Ctx, READERS, require, require_cluster, scope_clusters, store_status};
use crate::store::{FaultFilter, NodeKey};
use crate::validate;

pub struct FleetApi(pub Ctx);

#[tonic::async_trait]
impl fleet_service_server::FleetService for FleetApi {
    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "list nodes")?;
        let req = request.into_inner();
        let clusters = scope_clusters(&caller, req.clusters)?;
        let mut nodes = self.0.store.list_nodes(clusters).await.map_err(store_status)?;
        for n in &mut nodes {
            self.0.liveness.annotate(n);
            if req.brief {
                brief(n);
            }
        }
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "read nodes")?;
        let req = request.into_inner();
        require_cluster(&caller, &req.cluster)?;
        validate::name(names::cluster(&req.cluster))?;
        validate::name(names::node(&req.node))?;
        let key = NodeKey { cluster: req.cluster, node: req.node };
        let mut node = self
            .0
            .store
            .get_node(key.clone())
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no node {} in cluster {}", key.node, key.cluster)))?;
        self.0.liveness.annotate(&mut node);
        Ok(Response::new(node))
    }

    async fn list_faults(&self, request: Request<ListFaultsRequest>) -> Result<Response<ListFaultsResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "list faults")?;
        let mut req = request.into_inner();
        req.clusters = scope_clusters(&caller, req.clusters)?;
        let limit = match req.limit as usize {
            0 => 100,
            n => n.min(10_000),
        };
        let faults: Vec<Fault> = self
            .0
            .store
            .list_faults(FaultFilter { clusters: req.clusters, nodes: req.nodes, states: req.states, limit })
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListFaultsResponse { faults }))
    }

    async fn get_fault(&self, request: Request<GetFaultRequest>) -> Result<Response<GetFaultResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "read faults")?;
        let id = request.into_inner().id;
        let (fault, events) = self
            .0
            .store
            .get_fault(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no fault {id}")))?;
        // Another cluster's fault does not exist for this caller.
        if caller.as_ref().is_some_and(|c| !c.covers(&fault.cluster)) {
            return Err(Status::not_found(format!("no fault {id}")));
        }
        Ok(Response::new(GetFaultResponse { fault: Some(fault), events }))
    }

    async fn list_conditions(
        &self,
        request: Request<ListConditionsRequest>,
    ) -> Result<Response<ListConditionsResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "list conditions")?;
        let req = request.into_inner();
        let clusters = scope_clusters(&caller, req.clusters)?;
        let conditions = self.0.store.list_conditions(clusters, req.nodes).await.map_err(store_status)?;
        Ok(Response::new(ListConditionsResponse { conditions }))
    }

    async fn list_components(
        &self,
        request: Request<ListComponentsRequest>,
    ) -> Result<Response<ListComponentsResponse>, Status> {
        super::components::list(&self.0, request).await
    }

    async fn send_command(
        &self,
        request: Request<nodekeeper_proto::v1::SendCommandRequest>,
    ) -> Result<Response<nodekeeper_proto::v1::SendCommandResponse>, Status> {
        super::agent::send_command(&self.0, request).await
    }

    async fn set_desired_components(
        &self,
        request: Request<SetDesiredComponentsRequest>,
    ) -> Result<Response<SetDesiredComponentsResponse>, Status> {
        super::components::set_desired(&self.0, request).await
    }
}

/// What a prober needs of a node (`ListNodesRequest.brief`).
fn brief(n: &mut Node) {
    n.labels.clear();
    n.conditions.clear();
    n.agent_version.clear();
    n.inventory = n.inventory.take().map(|inv| Inventory {
        interfaces: inv
            .interfaces
            .into_iter()
            .map(|i| NetworkInterface { name: i.name, addresses: i.addresses, ..Default::default() })
            .collect(),
        ..Default::default()
    });
}

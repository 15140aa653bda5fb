//! Nodes, faults and conditions.

use nodekeeper_common::names;
use nodekeeper_proto::v1::{
    Category, DecommissionNodeRequest, DecommissionNodeResponse, Event, EventKind, Fault, FaultState, GetFaultRequest,
    GetFaultResponse, GetNodeRequest, Inventory, ListComponentsRequest, ListComponentsResponse, ListConditionsRequest,
    ListConditionsResponse, ListFaultsRequest, ListFaultsResponse, ListNodesRequest, ListNodesResponse,
    NetworkInterface, Node, Origin, RecordStepRequest, RecordStepResponse, SetDesiredComponentsRequest,
    SetDesiredComponentsResponse, Severity, SyncKubernetesNodeRequest, SyncKubernetesNodeResponse,
    fleet_service_server,
};
use tonic::{Request, Response, Status};

use super::{Ctx, READERS, require, require_cluster, scope_clusters, store_status};
use crate::store::{FaultFilter, Identity, NewEvent, NodeKey};
use crate::validate;

pub struct FleetApi(pub Ctx);

#[tonic::async_trait]
impl fleet_service_server::FleetService for FleetApi {
    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "list nodes")?;
        let req = request.into_inner();
        let clusters = scope_clusters(&caller, req.clusters)?;
        let mut nodes = self.0.store.list_nodes(clusters, req.include_decommissioned).await.map_err(store_status)?;
        for n in &mut nodes {
            self.0.liveness.annotate(n);
            if req.brief {
                brief(n);
            }
        }
        if !req.brief {
            super::nodes::fill_gates(&self.0, &mut nodes).await?;
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
        super::nodes::fill_gates(&self.0, std::slice::from_mut(&mut node)).await?;
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
            .list_faults(FaultFilter {
                clusters: req.clusters,
                nodes: req.nodes,
                states: req.states,
                types: req.types,
                limit,
            })
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

    async fn record_step(&self, request: Request<RecordStepRequest>) -> Result<Response<RecordStepResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, super::ACTORS, "record remediation steps")?;
        let req = request.into_inner();
        validate::step(&req)?;
        let state = req.state();
        let fault = self
            .0
            .store
            .fault(req.fault_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no fault {}", req.fault_id)))?;
        require_cluster(&caller, &fault.cluster)?;
        // The producer is who the certificate says, never what the message claims.
        let producer = match &caller {
            Some(id) if !req.producer.is_empty() && req.producer != id.name => {
                return Err(super::deny(id, format!("{} may not record steps as {}", id.name, req.producer)));
            }
            Some(id) => id.name.clone(),
            None if req.producer.is_empty() => "insecure".to_owned(),
            None => req.producer.clone(),
        };
        validate::name(names::producer(&producer))?;
        let mut attributes = req.attributes;
        attributes.insert("step".into(), req.step.clone());
        attributes.insert("success".into(), req.success.to_string());
        if req.dry_run {
            attributes.insert("dry_run".into(), "true".into());
        }
        if state != FaultState::Unspecified {
            attributes.insert(
                "fault_state".into(),
                state.as_str_name().trim_start_matches("FAULT_STATE_").to_ascii_lowercase(),
            );
        }
        let event = Event {
            cluster: fault.cluster.clone(),
            node: fault.node.clone(),
            kind: EventKind::Action as i32,
            r#type: "RemediationStep".into(),
            message: format!("{}{}: {}", if req.dry_run { "[dry run] " } else { "" }, req.step, req.message),
            severity: if req.success { Severity::Info } else { Severity::Warning } as i32,
            category: Category::Action as i32,
            time: Some(nodekeeper_common::time::now_timestamp()),
            origin: Some(Origin { producer: producer.clone(), report_id: req.step_id.clone(), ..Default::default() }),
            source: "remediator".into(),
            fault_id: fault.id,
            attributes,
            ..Default::default()
        };
        let new = NewEvent::new(Identity::report(&producer, &req.step_id), event);
        let state = if req.dry_run { 0 } else { state as i32 };
        let cursor = self.0.store.fault_action(new, state).await.map_err(store_status)?;
        if state == FaultState::Escalated as i32 {
            // Its ops alert goes out now, not at the next resend.
            self.0.permits.changed.notify_one();
        }
        Ok(Response::new(RecordStepResponse { cursor: crate::cursor::format(cursor) }))
    }

    async fn sync_kubernetes_node(
        &self,
        request: Request<SyncKubernetesNodeRequest>,
    ) -> Result<Response<SyncKubernetesNodeResponse>, Status> {
        super::nodes::sync_kubernetes(&self.0, request).await
    }

    async fn decommission_node(
        &self,
        request: Request<DecommissionNodeRequest>,
    ) -> Result<Response<DecommissionNodeResponse>, Status> {
        super::nodes::decommission(&self.0, request).await
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
    n.kubernetes_labels.clear();
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

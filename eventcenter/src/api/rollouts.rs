//! `RolloutService`: rollouts created (checked whole, planned in waves), listed, shown with their
//! timeline, and controlled by people. Every change is stored with the event that records it.

use nodekeeper_common::tls::Kind;
use nodekeeper_proto::v1::{
    ControlRolloutRequest, CreateRolloutRequest, GetRolloutRequest, GetRolloutResponse, ListRolloutsRequest,
    ListRolloutsResponse, Rollout, RolloutControl, RolloutFailureAction, RolloutPhase, Severity,
    rollout_service_server,
};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{Ctx, READERS, issuer, require, require_cluster, scope_clusters, store_status};
use crate::store::NewEvent;
use crate::{rollout, selector};
use nodekeeper_proto::v1::{
    NodeWork, NodeWorkAction, PendingNodeWorkRequest, PendingNodeWorkResponse, RecordNodeWorkRequest,
    RecordNodeWorkResponse, RolloutNodePhase,
};

pub struct RolloutApi(pub Ctx);

async fn save(ctx: &Ctx, r: &Rollout, events: Vec<NewEvent>) -> Result<(), Status> {
    let spec = r.spec.as_ref().expect("a stored rollout has its spec");
    ctx.store
        .put_rollout(spec.name.clone(), spec.cluster.clone(), r.encode_to_vec(), events, vec![])
        .await
        .map_err(store_status)?;
    ctx.rollouts.changed.notify_one();
    Ok(())
}

#[tonic::async_trait]
impl rollout_service_server::RolloutService for RolloutApi {
    async fn create_rollout(&self, request: Request<CreateRolloutRequest>) -> Result<Response<Rollout>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, &[Kind::Admin], "create rollouts")?;
        let mut spec = request.into_inner().spec.ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        rollout::validate(&spec).map_err(Status::invalid_argument)?;
        require_cluster(&caller, &spec.cluster)?;
        let mut names = std::collections::HashSet::new();
        for c in &spec.components {
            super::components::check_spec(c)?;
            if !names.insert(&c.name) {
                return Err(Status::invalid_argument(format!("component {:?} is listed twice", c.name)));
            }
        }
        let strategy = spec.strategy.get_or_insert_default();
        strategy.max_parallel = strategy.max_parallel.max(1);
        if strategy.on_failure == RolloutFailureAction::Unspecified as i32 {
            strategy.on_failure = RolloutFailureAction::Halt as i32;
        }
        // One change of the rollouts at a time: the name is checked and taken under the lock.
        let _one = self.0.rollouts.lock.lock().await;
        if self.0.store.rollout(spec.name.clone()).await.map_err(store_status)?.is_some() {
            return Err(Status::already_exists(format!("a rollout named {} exists", spec.name)));
        }
        let nodes: Vec<String> = self
            .0
            .store
            .list_nodes(vec![spec.cluster.clone()], false)
            .await
            .map_err(store_status)?
            .into_iter()
            .filter(|n| selector::matches(&spec.selector, &n.labels))
            .map(|n| n.name)
            .collect();
        if nodes.is_empty() {
            return Err(Status::invalid_argument(format!(
                "selector {:?} matches no node of cluster {}",
                spec.selector, spec.cluster
            )));
        }
        let now = nodekeeper_common::time::now_timestamp();
        let by = issuer(&caller);
        let r = Rollout {
            nodes: rollout::plan(&spec, nodes),
            spec: Some(spec),
            phase: RolloutPhase::Pending as i32,
            created_by: by.clone(),
            created_time: Some(now),
            updated_time: Some(now),
            ..Default::default()
        };
        let spec = r.spec.as_ref().expect("set above");
        let strategy = spec.strategy.clone().unwrap_or_default();
        let components: Vec<String> = spec.components.iter().map(|c| format!("{} {}", c.name, c.version)).collect();
        let message = format!(
            "rollout of {} to {} node(s) matching {} in waves {}",
            components.join(", "),
            r.nodes.len(),
            spec.selector,
            strategy.waves.join(", ")
        );
        let created = rollout::event(&r, "RolloutCreated", "", None, message, Severity::Info, &by);
        save(&self.0, &r, vec![created]).await?;
        tracing::info!(rollout = %spec.name, cluster = %spec.cluster, nodes = r.nodes.len(), by = %by, "rollout created");
        Ok(Response::new(r))
    }

    async fn list_rollouts(
        &self,
        request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "list rollouts")?;
        let clusters = scope_clusters(&caller, request.into_inner().clusters)?;
        let rollouts = self.0.store.list_rollouts(clusters).await.map_err(store_status)?;
        Ok(Response::new(ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(&self, request: Request<GetRolloutRequest>) -> Result<Response<GetRolloutResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "read rollouts")?;
        let name = request.into_inner().name;
        let not_found = || Status::not_found(format!("no rollout {name}"));
        let (rollout, events) =
            self.0.store.get_rollout(name.clone()).await.map_err(store_status)?.ok_or_else(not_found)?;
        // Another cluster's rollout does not exist for this caller.
        let cluster = rollout.spec.as_ref().map(|s| s.cluster.as_str()).unwrap_or_default();
        if caller.as_ref().is_some_and(|c| !c.covers(cluster)) {
            return Err(not_found());
        }
        Ok(Response::new(GetRolloutResponse { rollout: Some(rollout), events }))
    }

    async fn control_rollout(&self, request: Request<ControlRolloutRequest>) -> Result<Response<Rollout>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, &[Kind::Admin], "control rollouts")?;
        let req = request.into_inner();
        crate::validate::text("reason", &req.reason)?;
        let _one = self.0.rollouts.lock.lock().await;
        let not_found = || Status::not_found(format!("no rollout {}", req.name));
        let (mut r, _) =
            self.0.store.get_rollout(req.name.clone()).await.map_err(store_status)?.ok_or_else(not_found)?;
        let cluster = r.spec.as_ref().map(|s| s.cluster.clone()).unwrap_or_default();
        if caller.as_ref().is_some_and(|c| !c.covers(&cluster)) {
            return Err(not_found());
        }
        let control = req.control();
        let next = rollout::control(r.phase(), control).map_err(Status::failed_precondition)?;
        let by = issuer(&caller);
        let verb = control.as_str_name().trim_start_matches("ROLLOUT_CONTROL_").to_ascii_lowercase();
        let kind = match control {
            RolloutControl::Pause => "RolloutPaused",
            RolloutControl::Resume => "RolloutResumed",
            RolloutControl::Abort => "RolloutAborted",
            _ => "RolloutRollbackStarted",
        };
        let why = if req.reason.is_empty() { String::new() } else { format!(": {}", req.reason) };
        let event = rollout::event(
            &r,
            kind,
            "",
            None,
            format!("{verb} by {by}{why}; now {}", rollout::phase_name(next)),
            Severity::Info,
            &by,
        );
        r.phase = next as i32;
        r.reason = format!("{verb} by {by}{why}");
        r.updated_time = Some(nodekeeper_common::time::now_timestamp());
        save(&self.0, &r, vec![event]).await?;
        tracing::info!(rollout = %req.name, control = %verb, by = %by, "rollout controlled");
        Ok(Response::new(r))
    }

    async fn pending_node_work(
        &self,
        request: Request<PendingNodeWorkRequest>,
    ) -> Result<Response<PendingNodeWorkResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, super::ACTORS, "do rollouts' node work")?;
        let cluster = request.into_inner().cluster;
        require_cluster(&caller, &cluster)?;
        let mut work = Vec::new();
        for r in self.0.store.list_rollouts(vec![cluster]).await.map_err(store_status)? {
            let spec = r.spec.clone().unwrap_or_default();
            let strategy = spec.strategy.unwrap_or_default();
            let timeout = strategy
                .node_timeout
                .or(Some(nodekeeper_common::time::to_duration(rollout::controller::DEFAULT_NODE_TIMEOUT)));
            for n in &r.nodes {
                let action = match n.phase() {
                    RolloutNodePhase::Draining if !n.drained => NodeWorkAction::Drain,
                    RolloutNodePhase::Uncordoning => NodeWorkAction::Uncordon,
                    _ => continue,
                };
                work.push(NodeWork {
                    rollout: spec.name.clone(),
                    node: n.node.clone(),
                    action: action as i32,
                    timeout,
                });
            }
        }
        Ok(Response::new(PendingNodeWorkResponse { work }))
    }

    async fn record_node_work(
        &self,
        request: Request<RecordNodeWorkRequest>,
    ) -> Result<Response<RecordNodeWorkResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, super::ACTORS, "do rollouts' node work")?;
        let req = request.into_inner();
        crate::validate::text("message", &req.message)?;
        let _one = self.0.rollouts.lock.lock().await;
        let not_found = || Status::not_found(format!("no rollout {}", req.rollout));
        let mut r = self.0.store.rollout(req.rollout.clone()).await.map_err(store_status)?.ok_or_else(not_found)?;
        let cluster = r.spec.as_ref().map(|s| s.cluster.clone()).unwrap_or_default();
        require_cluster(&caller, &cluster)?;
        let i = r
            .nodes
            .iter()
            .position(|n| n.node == req.node)
            .ok_or_else(|| Status::not_found(format!("node {} is not in rollout {}", req.node, req.rollout)))?;
        let by = issuer(&caller);
        let action = req.action();
        let n = &mut r.nodes[i];
        let (kind, message, severity) = match (action, n.phase()) {
            (NodeWorkAction::Drain, RolloutNodePhase::Draining) if !n.drained && req.success => {
                n.drained = true;
                ("RolloutNodeDrained", format!("{} drained: {}", n.node, req.message), Severity::Info)
            }
            (NodeWorkAction::Drain, RolloutNodePhase::Draining) if !n.drained => {
                n.phase = RolloutNodePhase::Uncordoning as i32;
                n.then = RolloutNodePhase::Failed as i32;
                n.reason = format!("drain failed: {}", req.message);
                n.started_time = Some(nodekeeper_common::time::now_timestamp());
                ("RolloutNodeFailed", format!("{} failed: {}; uncordon requested", n.node, n.reason), Severity::Warning)
            }
            (NodeWorkAction::Uncordon, RolloutNodePhase::Uncordoning) => {
                n.phase = n.then;
                if !req.success {
                    n.phase = RolloutNodePhase::Failed as i32;
                    n.reason = format!("uncordon failed: {}", req.message);
                }
                ("RolloutNodeUncordoned", format!("{}: {}", n.node, req.message), Severity::Info)
            }
            (_, phase) => {
                let phase = phase.as_str_name().trim_start_matches("ROLLOUT_NODE_PHASE_").to_ascii_lowercase();
                return Err(Status::failed_precondition(format!(
                    "node {} of rollout {} is {phase}: no {} is awaited",
                    req.node,
                    req.rollout,
                    action.as_str_name().trim_start_matches("NODE_WORK_ACTION_").to_ascii_lowercase()
                )));
            }
        };
        let wave = Some(r.nodes[i].wave + 1);
        let event = rollout::event(&r, kind, &req.node, wave, message, severity, &by);
        r.updated_time = Some(nodekeeper_common::time::now_timestamp());
        save(&self.0, &r, vec![event]).await?;
        Ok(Response::new(RecordNodeWorkResponse {}))
    }
}

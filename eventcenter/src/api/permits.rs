//! The rate-limit center's API (`crate::permits` decides). Remediators (subscriber
//! certificates) and admins acquire and release permits; only admins freeze, unfreeze and reset
//! breakers; readers list permits and guards of their clusters; detectors and admins report
//! business-health metrics for their clusters.

use nodekeeper_common::tls::Kind;
use nodekeeper_proto::v1::{
    AcquirePermitRequest, AcquirePermitResponse, FreezeRequest, FreezeResponse, GetGuardStateRequest, GuardState,
    ListPermitsRequest, ListPermitsResponse, Operation, ReleasePermitRequest, ReleasePermitResponse,
    ReportMetricRequest, ReportMetricResponse, ResetBreakerRequest, ResetBreakerResponse, UnfreezeRequest,
    UnfreezeResponse, permit_service_server,
};
use tonic::{Request, Response, Status};

use super::{Caller, Ctx, READERS, require, require_cluster, scope_clusters, store_status};
use crate::permits::Decision;
use crate::validate;

pub struct PermitApi(pub Ctx);

fn who(caller: &Caller) -> String {
    caller.as_ref().map_or_else(|| "insecure".to_owned(), |id| format!("{}/{}", id.kind.as_str(), id.name))
}

#[tonic::async_trait]
impl permit_service_server::PermitService for PermitApi {
    async fn acquire_permit(
        &self,
        request: Request<AcquirePermitRequest>,
    ) -> Result<Response<AcquirePermitResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, super::ACTORS, "acquire permits")?;
        let req = request.into_inner();
        validate::name(nodekeeper_common::names::cluster(&req.cluster))?;
        validate::name(nodekeeper_common::names::node(&req.node))?;
        require_cluster(&caller, &req.cluster)?;
        let op = req.operation();
        if op == Operation::Unspecified {
            return Err(Status::invalid_argument("name the operation the permit is for"));
        }
        let lease = nodekeeper_common::time::from_duration(req.lease.as_ref());
        let decision = self
            .0
            .permits
            .acquire(&self.0.store, &who(&caller), op, &req.cluster, &req.node, req.fault_id, lease)
            .await
            .map_err(store_status)?;
        Ok(Response::new(match decision {
            Decision::Granted(p) => {
                AcquirePermitResponse { granted: true, permit: Some(p), denied_reason: String::new() }
            }
            Decision::Denied(reason) => AcquirePermitResponse { granted: false, permit: None, denied_reason: reason },
        }))
    }

    async fn release_permit(
        &self,
        request: Request<ReleasePermitRequest>,
    ) -> Result<Response<ReleasePermitResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, super::ACTORS, "release permits")?;
        let req = request.into_inner();
        self.0.permits.sync(&self.0.store).await.map_err(store_status)?;
        if let Ok(p) = self.0.permits.check_any(&req.permit_id) {
            require_cluster(&caller, &p.cluster)?;
        }
        match self
            .0
            .permits
            .release(&self.0.store, &req.permit_id, req.success, &who(&caller))
            .await
            .map_err(store_status)?
        {
            Some(_) => Ok(Response::new(ReleasePermitResponse {})),
            None => Err(Status::not_found(format!("no active permit {:?}", req.permit_id))),
        }
    }

    async fn list_permits(
        &self,
        request: Request<ListPermitsRequest>,
    ) -> Result<Response<ListPermitsResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "list permits")?;
        let clusters = scope_clusters(&caller, request.into_inner().clusters)?;
        self.0.permits.sync(&self.0.store).await.map_err(store_status)?;
        Ok(Response::new(ListPermitsResponse { permits: self.0.permits.active(&clusters) }))
    }

    async fn freeze(&self, request: Request<FreezeRequest>) -> Result<Response<FreezeResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, &[Kind::Admin], "freeze")?;
        let req = request.into_inner();
        guard_scope(&caller, &req.cluster)?;
        let reason =
            if req.reason.is_empty() { "no reason given".to_owned() } else { req.reason.chars().take(500).collect() };
        self.0
            .permits
            .set_frozen(&self.0.store, &req.cluster, true, &reason, &who(&caller))
            .await
            .map_err(store_status)?;
        Ok(Response::new(FreezeResponse {}))
    }

    async fn unfreeze(&self, request: Request<UnfreezeRequest>) -> Result<Response<UnfreezeResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, &[Kind::Admin], "unfreeze")?;
        let req = request.into_inner();
        guard_scope(&caller, &req.cluster)?;
        self.0.permits.set_frozen(&self.0.store, &req.cluster, false, "", &who(&caller)).await.map_err(store_status)?;
        Ok(Response::new(UnfreezeResponse {}))
    }

    async fn reset_breaker(
        &self,
        request: Request<ResetBreakerRequest>,
    ) -> Result<Response<ResetBreakerResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, &[Kind::Admin], "reset breakers")?;
        let req = request.into_inner();
        validate::name(nodekeeper_common::names::cluster(&req.cluster))?;
        require_cluster(&caller, &req.cluster)?;
        self.0.permits.reset_breaker(&self.0.store, &req.cluster, &who(&caller)).await.map_err(store_status)?;
        Ok(Response::new(ResetBreakerResponse {}))
    }

    async fn get_guard_state(&self, request: Request<GetGuardStateRequest>) -> Result<Response<GuardState>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, READERS, "read the guards")?;
        let include_limits = request.get_ref().include_limits;
        self.0.permits.sync(&self.0.store).await.map_err(store_status)?;
        let (global_frozen, mut clusters) = self.0.permits.guards();
        let scope = scope_clusters(&caller, Vec::new())?;
        if !scope.is_empty() {
            clusters.retain(|g| scope.contains(&g.cluster));
        }
        let mut limits = Vec::new();
        if include_limits {
            for (cluster, nodes) in self.0.store.cluster_sizes().await.map_err(store_status)? {
                if scope.is_empty() || scope.contains(&cluster) {
                    limits.push(self.0.permits.limits(&cluster, nodes).await);
                }
            }
        }
        let (breaker_fault_share, window) = self.0.permits.breaker_rule();
        Ok(Response::new(GuardState {
            global_frozen,
            clusters,
            limits,
            breaker_fault_share,
            breaker_window: Some(nodekeeper_common::time::to_duration(window)),
        }))
    }

    async fn report_metric(
        &self,
        request: Request<ReportMetricRequest>,
    ) -> Result<Response<ReportMetricResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, &[Kind::Detector, Kind::Admin], "report business-health metrics")?;
        let req = request.into_inner();
        validate::name(nodekeeper_common::names::cluster(&req.cluster))?;
        require_cluster(&caller, &req.cluster)?;
        let valid_name = req.name.len() <= 200
            && req
                .name
                .chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
            && !req.name.is_empty();
        if !valid_name {
            return Err(Status::invalid_argument(format!(
                "metric name {:?}: expected [a-zA-Z_:][a-zA-Z0-9_:]*, at most 200 characters",
                req.name
            )));
        }
        if !req.value.is_finite() {
            return Err(Status::invalid_argument(format!(
                "metric {}: value {} is not a finite number",
                req.name, req.value
            )));
        }
        self.0.permits.report_metric(&req.cluster, &req.name, req.value);
        Ok(Response::new(ReportMetricResponse {}))
    }
}

/// A freeze names a cluster the caller covers, or "" (every cluster: only an admin of every
/// cluster).
fn guard_scope(caller: &Caller, cluster: &str) -> Result<(), Status> {
    if cluster.is_empty() {
        return require_cluster(caller, "*");
    }
    validate::name(nodekeeper_common::names::cluster(cluster))?;
    require_cluster(caller, cluster)
}

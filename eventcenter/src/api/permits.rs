//! The rate-limit center's API. The contract is fixed now; the behaviour arrives with the
//! remediation issue, and until then every call answers UNIMPLEMENTED so that no caller mistakes
//! silence for a granted permit.

use nodekeeper_proto::v1::{
    AcquirePermitRequest, AcquirePermitResponse, FreezeRequest, FreezeResponse, GetGuardStateRequest, GuardState,
    ListPermitsRequest, ListPermitsResponse, ReleasePermitRequest, ReleasePermitResponse, ResetBreakerRequest,
    ResetBreakerResponse, UnfreezeRequest, UnfreezeResponse, permit_service_server,
};
use tonic::{Request, Response, Status};

pub struct PermitApi;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("the rate-limit center is not part of this version of the event center"))
}

#[tonic::async_trait]
impl permit_service_server::PermitService for PermitApi {
    async fn acquire_permit(
        &self,
        _: Request<AcquirePermitRequest>,
    ) -> Result<Response<AcquirePermitResponse>, Status> {
        unimplemented()
    }
    async fn release_permit(
        &self,
        _: Request<ReleasePermitRequest>,
    ) -> Result<Response<ReleasePermitResponse>, Status> {
        unimplemented()
    }
    async fn list_permits(&self, _: Request<ListPermitsRequest>) -> Result<Response<ListPermitsResponse>, Status> {
        unimplemented()
    }
    async fn freeze(&self, _: Request<FreezeRequest>) -> Result<Response<FreezeResponse>, Status> {
        unimplemented()
    }
    async fn unfreeze(&self, _: Request<UnfreezeRequest>) -> Result<Response<UnfreezeResponse>, Status> {
        unimplemented()
    }
    async fn reset_breaker(&self, _: Request<ResetBreakerRequest>) -> Result<Response<ResetBreakerResponse>, Status> {
        unimplemented()
    }
    async fn get_guard_state(&self, _: Request<GetGuardStateRequest>) -> Result<Response<GuardState>, Status> {
        unimplemented()
    }
}

//! The local status listener: gRPC health (the detector probes it), `/metrics` in Prometheus text
//! format, and the LocalAgentService for callers on this node. One port, on 127.0.0.1 and the
//! node's address by default.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use nodekeeper_common::observation;
use nodekeeper_proto::v1::{
    AgentStatus, EmitRequest, EmitResponse, GetAgentStatusRequest, local_agent_service_server,
    local_agent_service_server::LocalAgentServiceServer,
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::connection::ConnState;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// Most observations one Emit call may carry.
const MAX_EMIT: usize = 1000;

#[derive(Clone)]
pub struct Local {
    pub node: String,
    pub cluster: String,
    pub boot_id: String,
    pub center: String,
    pub outbox: Outbox,
    pub metrics: Metrics,
    pub state: Arc<Mutex<ConnState>>,
}

fn loopback_only<T>(req: &Request<T>) -> Result<(), Status> {
    match req.remote_addr() {
        Some(a) if a.ip().is_loopback() => Ok(()),
        other => Err(Status::permission_denied(format!(
            "the local agent API answers callers on this node only (loopback), not {other:?}"
        ))),
    }
}

#[tonic::async_trait]
impl local_agent_service_server::LocalAgentService for Local {
    async fn emit(&self, request: Request<EmitRequest>) -> Result<Response<EmitResponse>, Status> {
        loopback_only(&request)?;
        let observations = request.into_inner().observations;
        if observations.len() > MAX_EMIT {
            return Err(Status::resource_exhausted(format!("at most {MAX_EMIT} observations per call")));
        }
        // The center's own check: what the agent acknowledges here, the center will take.
        for (i, o) in observations.iter().enumerate() {
            observation::validate(o)
                .map_err(|e| Status::invalid_argument(format!("observation {i}: {e}; nothing was stored")))?;
        }
        let sequences = self
            .outbox
            .push(observations)
            .await
            .map_err(|e| Status::internal(format!("storing in the outbox: {e}")))?;
        Ok(Response::new(EmitResponse { sequences }))
    }

    async fn get_status(&self, request: Request<GetAgentStatusRequest>) -> Result<Response<AgentStatus>, Status> {
        loopback_only(&request)?;
        let stats = self.outbox.stats();
        Ok(Response::new(AgentStatus {
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            boot_id: self.boot_id.clone(),
            connected: self.state.lock().expect("state lock").connected,
            center: self.center.clone(),
            outbox_depth: stats.depth,
            outbox_bytes: stats.bytes,
            outbox_dropped_total: stats.dropped_total,
            last_sequence: stats.last_sequence,
            acked_total: self.metrics.acked.get(),
            sent_total: self.metrics.sent.get(),
            rejected_total: stats.rejected_total,
        }))
    }
}

/// Binds the status listener on every address; a failure to bind is an error for the caller.
pub async fn bind(addrs: &[IpAddr], port: u16) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("status listener {addr}: {e}")))?;
        out.push(l);
    }
    Ok(out)
}

pub async fn serve(
    listeners: Vec<TcpListener>,
    local: Local,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LocalAgentServiceServer<Local>>().await;
    let metrics = local.metrics.clone();
    let outbox = local.outbox.clone();
    let routes = tonic::service::Routes::new(health_service)
        .add_service(LocalAgentServiceServer::new(local).max_decoding_message_size(1 << 20))
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
                let (content_type, body) = nodekeeper_common::metrics::negotiate(accept, metrics.render(&outbox));
                async move { ([(axum::http::header::CONTENT_TYPE, content_type)], body) }
            }),
        );
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes.into())
        .serve_with_incoming_shutdown(merge(listeners), cancel.cancelled_owned())
        .await
}

type Incoming = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send>>;

/// All listeners as one stream of connections.
fn merge(listeners: Vec<TcpListener>) -> Incoming {
    let mut merged: Incoming = Box::pin(tokio_stream::empty());
    for l in listeners {
        merged = Box::pin(merged.merge(TcpListenerStream::new(l)));
    }
    merged
}

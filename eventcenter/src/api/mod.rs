//! The gRPC services. Handlers validate, translate and delegate to the store, the liveness
//! tracker and subscriptions; they hold no state of their own.

pub mod agent;
pub mod events;
pub mod fleet;
pub mod permits;
pub mod report;

use std::sync::Arc;

use nodekeeper_proto::v1::{Category, Event, EventKind, Observation, Origin};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::config::Config;
use crate::liveness::Liveness;
use crate::store::{Store, StoreError};

/// What every handler shares.
#[derive(Clone)]
pub struct Ctx {
    pub store: Store,
    pub liveness: Arc<Liveness>,
    pub config: Arc<Config>,
    pub cancel: CancellationToken,
    /// Connections are mutual TLS: every request has a verified client identity.
    pub authenticated: bool,
}

pub fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "store error");
    match e {
        StoreError::Closed => Status::unavailable("event center is shutting down"),
        other => Status::internal(format!("store: {other}")),
    }
}

/// The stored form of a producer's observation.
pub fn to_event(cluster: &str, node: &str, o: Observation, origin: Origin) -> Event {
    let kind = if o.condition.is_some() { EventKind::Condition } else { EventKind::Observation };
    Event {
        cursor: String::new(),
        cluster: cluster.to_owned(),
        node: node.to_owned(),
        kind: kind as i32,
        r#type: o.r#type,
        reason: o.reason,
        message: o.message,
        severity: o.severity,
        category: if o.category == 0 { Category::Unspecified as i32 } else { o.category },
        action: o.action,
        condition: o.condition,
        attributes: o.attributes,
        time: o.time,
        received_time: None,
        origin: Some(origin),
        fault_id: 0,
        source: o.source,
    }
}

//! The gRPC services. Handlers validate, translate and delegate to the store, the liveness
//! tracker and subscriptions; they hold no state of their own.

pub mod agent;
pub mod components;
pub mod events;
pub mod fleet;
pub mod nodes;
pub mod permits;
pub mod report;
pub mod rollouts;

use std::sync::Arc;

use nodekeeper_common::tls::{self, Identity, Kind};
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
    pub limits: Arc<crate::limits::Limits>,
    pub sessions: Arc<agent::Sessions>,
    /// Detector replicas' votes, folded into verdicts.
    pub quorum: Arc<crate::quorum::Quorum>,
    /// The rate-limit center.
    pub permits: Arc<crate::permits::RateLimiter>,
    /// One change of the rollouts at a time (API and controller), and the controller's wake-up.
    pub rollouts: Arc<crate::rollout::Shared>,
}

/// What a caller may do, from its certificate. `None` on an insecure center: everything.
pub type Caller = Option<Identity>;

impl Ctx {
    /// The caller's verified identity (mutual TLS), or `None` when the center runs insecure.
    pub fn caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller, Status> {
        if !self.authenticated {
            return Ok(None);
        }
        tls::peer_identity(req).map(Some).inspect_err(|s| tracing::warn!(reason = s.message(), "request refused"))
    }
}

/// PERMISSION_DENIED with the reason, logged.
pub fn deny(id: &Identity, why: String) -> Status {
    tracing::warn!(kind = id.kind.as_str(), name = %id.name, reason = %why, "permission denied");
    Status::permission_denied(why)
}

/// Who did it, as events record it: "<kind> <name>" from the certificate, "insecure" without TLS.
pub fn issuer(caller: &Caller) -> String {
    caller.as_ref().map_or_else(|| "insecure".to_owned(), |id| format!("{} {}", id.kind.as_str(), id.name))
}

/// The caller must be one of `kinds`.
pub fn require(caller: &Caller, kinds: &[Kind], what: &str) -> Result<(), Status> {
    match caller {
        Some(id) if !kinds.contains(&id.kind) => {
            Err(deny(id, format!("a {} certificate may not {what}", id.kind.as_str())))
        }
        _ => Ok(()),
    }
}

/// The clusters a read may cover: the requested ones if the caller may see them all, or, when
/// none are requested, the caller's own (empty = every cluster).
pub fn scope_clusters(caller: &Caller, requested: Vec<String>) -> Result<Vec<String>, Status> {
    let Some(id) = caller else { return Ok(requested) };
    if id.covers("*") {
        return Ok(requested);
    }
    if requested.is_empty() {
        return Ok(id.clusters.clone());
    }
    if let Some(c) = requested.iter().find(|c| !id.covers(c)) {
        return Err(deny(id, format!("{} {} may not read cluster {c}", id.kind.as_str(), id.name)));
    }
    Ok(requested)
}

/// The caller may act on `cluster`.
pub fn require_cluster(caller: &Caller, cluster: &str) -> Result<(), Status> {
    match caller {
        Some(id) if !id.covers(cluster) => {
            Err(deny(id, format!("{} {} may not act on cluster {cluster}", id.kind.as_str(), id.name)))
        }
        _ => Ok(()),
    }
}

/// Readers of events and fleet state.
pub const READERS: &[Kind] = &[Kind::Subscriber, Kind::Detector, Kind::Admin];
/// Who acts on a cluster's nodes: its remediators (subscriber certificates) and admins.
pub const ACTORS: &[Kind] = &[Kind::Subscriber, Kind::Admin];

/// The status a client gets for a store error: retryable codes where retrying helps, and never
/// the server's paths. A full disk is logged by the disk reserve, once per change, not per call.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Closed => Status::unavailable("event center is shutting down"),
        StoreError::Full { .. } => Status::resource_exhausted(e.to_string()),
        other => {
            tracing::error!(error = %other, "store error");
            Status::internal(other.for_client())
        }
    }
}

/// The stored form of a producer's observation.
///
/// Severity, category and action values this contract version does not define (a newer producer
/// may send them) are stored as UNSPECIFIED, with the number kept in the attribute
/// `unknown_<field>`: every reader (fault folding, severity filters, the CLI, subscribers' JSON)
/// meets only values it knows, and a number nobody can interpret never ranks above CRITICAL.
pub fn to_event(cluster: &str, node: &str, mut o: Observation, origin: Origin) -> Event {
    use nodekeeper_proto::v1::{RecommendedAction, Severity};
    let kind = if o.condition.is_some() { EventKind::Condition } else { EventKind::Observation };
    known::<Severity>(&mut o.severity, "severity", &mut o.attributes);
    known::<Category>(&mut o.category, "category", &mut o.attributes);
    known::<RecommendedAction>(&mut o.action, "action", &mut o.attributes);
    Event {
        cursor: String::new(),
        cluster: cluster.to_owned(),
        node: node.to_owned(),
        kind: kind as i32,
        r#type: o.r#type,
        reason: o.reason,
        message: o.message,
        severity: o.severity,
        category: o.category,
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

/// Sets an enum value the contract does not define to UNSPECIFIED (0), keeping the number in the
/// attribute `unknown_<field>`.
fn known<E: TryFrom<i32>>(value: &mut i32, field: &str, attributes: &mut std::collections::HashMap<String, String>) {
    if E::try_from(*value).is_err() {
        attributes.insert(format!("unknown_{field}"), std::mem::take(value).to_string());
    }
}

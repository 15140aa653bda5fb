//! Reports from other producers, idempotent by (producer, report id).

use nodekeeper_common::names;
use nodekeeper_proto::v1::{
    ActionResult, Category, EventKind, Origin, RecordActionsRequest, RecordActionsResponse, ReportRequest,
    ReportResponse, ReportResult, report_service_server,
};
use tonic::{Request, Response, Status};

use nodekeeper_common::tls::Kind;

use super::{ACTORS, Caller, Ctx, deny, issuer, require, require_cluster, store_status, to_event};
use crate::cursor;
use crate::store::{Identity, NewEvent};
use crate::validate;

pub struct ReportApi(pub Ctx);

#[tonic::async_trait]
impl report_service_server::ReportService for ReportApi {
    async fn report(&self, request: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, &[Kind::Detector, Kind::Admin], "report about nodes")?;
        let mut req = request.into_inner();
        req.producer = producer(&caller, req.producer)?;
        let limits = &self.0.config.limits;
        self.0.limits.admit(&caller, req.reports.len())?;
        if req.reports.len() > limits.max_batch {
            return Err(Status::resource_exhausted(format!(
                "{} reports in one request, at most {} allowed",
                req.reports.len(),
                limits.max_batch
            )));
        }
        let mut events = Vec::with_capacity(req.reports.len());
        let mut ids = Vec::with_capacity(req.reports.len());
        // Detector verdicts are votes: stored as evidence, folded by the quorum.
        let mut votes = Vec::new();
        for (i, r) in req.reports.into_iter().enumerate() {
            validate::name(names::report_id(&r.report_id))
                .map_err(|s| Status::invalid_argument(format!("report {i}: {}", s.message())))?;
            validate::name(names::cluster(&r.cluster))
                .map_err(|s| Status::invalid_argument(format!("report {i}: {}", s.message())))?;
            validate::name(names::node(&r.node))
                .map_err(|s| Status::invalid_argument(format!("report {i}: {}", s.message())))?;
            require_cluster(&caller, &r.cluster)?;
            let mut o =
                r.observation.ok_or_else(|| Status::invalid_argument(format!("report {i} has no observation")))?;
            validate::observation(&o, &|| format!("report {i}"))?;
            let detector = caller.as_ref().is_none_or(|id| id.kind == Kind::Detector);
            if detector && let Some(c) = o.condition.take_if(|c| crate::quorum::VERDICTS.contains(&c.r#type.as_str())) {
                let holds = c.status() == nodekeeper_proto::v1::ConditionStatus::True;
                votes.push((r.cluster.clone(), r.node.clone(), c.r#type.clone(), holds, o.message.clone()));
                o.attributes.insert("verdict".into(), c.r#type.clone());
                o.attributes.insert("holds".into(), holds.to_string());
                o.r#type = crate::store::DETECTOR_VOTE.into();
            }
            let origin = Origin {
                producer: req.producer.clone(),
                boot_id: String::new(),
                sequence: 0,
                report_id: r.report_id.clone(),
            };
            ids.push(r.report_id.clone());
            events.push(NewEvent::new(
                Identity::report(&req.producer, &r.report_id),
                to_event(&r.cluster, &r.node, o, origin),
            ));
        }
        let appended = self.0.store.append(events).await.map_err(store_status)?;
        if self.0.store.shared() {
            // Replicas: the leader folds every replica's votes (`quorum::follow`).
            votes.clear();
        }
        let quorum = self.0.config.detectors.quorum;
        let folded: Vec<NewEvent> = votes
            .into_iter()
            .filter_map(|(cluster, node, verdict, holds, message)| {
                let vote = crate::quorum::Vote {
                    cluster: &cluster,
                    node: &node,
                    verdict: &verdict,
                    producer: &req.producer,
                    holds,
                    message: &message,
                };
                self.0.quorum.vote(vote, quorum)
            })
            .collect();
        if !folded.is_empty() {
            self.0.store.append(folded).await.map_err(store_status)?;
        }
        let results = ids
            .into_iter()
            .zip(appended)
            .map(|(report_id, a)| ReportResult { report_id, cursor: cursor::format(a.cursor), duplicate: a.duplicate })
            .collect();
        Ok(Response::new(ReportResponse { results }))
    }

    async fn record_actions(
        &self,
        request: Request<RecordActionsRequest>,
    ) -> Result<Response<RecordActionsResponse>, Status> {
        let caller = self.0.caller(&request)?;
        require(&caller, ACTORS, "record actions")?;
        let req = request.into_inner();
        // A person's CLI claims no producer: without TLS it has no name but "insecure".
        let claimed = if req.producer.is_empty() && caller.is_none() { issuer(&caller) } else { req.producer };
        let producer = producer(&caller, claimed)?;
        self.0.limits.admit(&caller, req.actions.len())?;
        let max = self.0.config.limits.max_batch;
        if req.actions.len() > max {
            return Err(Status::resource_exhausted(format!(
                "{} actions in one request, at most {max} allowed",
                req.actions.len()
            )));
        }
        let mut events = Vec::with_capacity(req.actions.len());
        let mut ids = Vec::with_capacity(req.actions.len());
        for (i, a) in req.actions.into_iter().enumerate() {
            let what = |s: Status| Status::invalid_argument(format!("action {i}: {}", s.message()));
            validate::name(names::report_id(&a.action_id)).map_err(what)?;
            validate::name(names::cluster(&a.cluster)).map_err(what)?;
            if !a.node.is_empty() {
                validate::name(names::node(&a.node)).map_err(what)?;
            }
            require_cluster(&caller, &a.cluster)?;
            let mut action = a.action.ok_or_else(|| Status::invalid_argument(format!("action {i} is empty")))?;
            if action.condition.is_some() {
                return Err(Status::invalid_argument(format!(
                    "action {i} sets a condition: an action cannot, report it instead"
                )));
            }
            validate::observation(&action, &|| format!("action {i}"))?;
            action.attributes.insert("issuer".into(), issuer(&caller));
            let origin = Origin { producer: producer.clone(), report_id: a.action_id.clone(), ..Default::default() };
            let mut event = to_event(&a.cluster, &a.node, action, origin);
            event.kind = EventKind::Action as i32;
            event.category = Category::Action as i32;
            events.push(NewEvent::new(Identity::report(&producer, &a.action_id), event));
            ids.push(a.action_id);
        }
        let appended = self.0.store.append(events).await.map_err(store_status)?;
        let results = ids
            .into_iter()
            .zip(appended)
            .map(|(action_id, a)| ActionResult { action_id, cursor: cursor::format(a.cursor), duplicate: a.duplicate })
            .collect();
        Ok(Response::new(RecordActionsResponse { results }))
    }
}

/// The producer is who the certificate says, never what the message claims.
fn producer(caller: &Caller, claimed: String) -> Result<String, Status> {
    let producer = match caller {
        Some(id) if !claimed.is_empty() && claimed != id.name => {
            return Err(deny(id, format!("{} may not act as producer {claimed}", id.name)));
        }
        Some(id) => id.name.clone(),
        None => claimed,
    };
    validate::name(names::producer(&producer))?;
    Ok(producer)
}

//! Reports from other producers, idempotent by (producer, report id).

use nodekeeper_common::names;
use nodekeeper_proto::v1::{Origin, ReportRequest, ReportResponse, ReportResult, report_service_server};
use tonic::{Request, Response, Status};

use nodekeeper_common::tls::Kind;

use super::{Ctx, deny, require, require_cluster, store_status, to_event};
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
        // The producer is who the certificate says, never what the message claims.
        if let Some(id) = &caller {
            if !req.producer.is_empty() && req.producer != id.name {
                return Err(deny(id, format!("{} may not report as producer {}", id.name, req.producer)));
            }
            req.producer = id.name.clone();
        }
        let limits = &self.0.config.limits;
        validate::name(names::producer(&req.producer))?;
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
                o.r#type = "DetectorVote".into();
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
}

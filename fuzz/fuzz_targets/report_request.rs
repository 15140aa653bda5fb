//! A report request as the Report RPC receives it: decoded, then every report validated.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodekeeper_common::names;
use nodekeeper_eventcenter::config::LimitsConfig;
use nodekeeper_eventcenter::validate;
use nodekeeper_proto::v1::ReportRequest;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = ReportRequest::decode(data) else { return };
    let limits = LimitsConfig::default();
    drop(names::producer(&req.producer));
    for r in &req.reports {
        drop(names::report_id(&r.report_id));
        drop(names::cluster(&r.cluster));
        drop(names::node(&r.node));
        if let Some(o) = &r.observation {
            drop(validate::observation(o, &|| "report".to_owned()));
        }
    }
});

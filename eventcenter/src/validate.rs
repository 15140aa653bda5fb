//! Checks on what producers send, before anything reaches the store. Each failure is an
//! INVALID_ARGUMENT status naming the field and why.

use nodekeeper_common::names;
use std::collections::HashMap;

use nodekeeper_proto::v1::{ConditionStatus, FaultState, Hello, Observation, ObservationBatch, RecordStepRequest};
use tonic::Status;

use crate::config::LimitsConfig;

pub fn name(r: Result<(), names::NameError>) -> Result<(), Status> {
    r.map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Validates one observation; `what` names it in errors (e.g. "observation 3").
pub fn observation(o: &Observation, limits: &LimitsConfig, what: &dyn Fn() -> String) -> Result<(), Status> {
    let bad = |msg: String| Status::invalid_argument(format!("{}: {msg}", what()));
    names::event_type(&o.r#type).map_err(|e| bad(e.to_string()))?;
    names::reason(&o.reason).map_err(|e| bad(e.to_string()))?;
    if o.message.len() > limits.max_text_bytes {
        return Err(bad(format!("message is {} bytes, at most {} allowed", o.message.len(), limits.max_text_bytes)));
    }
    attributes(&o.attributes, limits).map_err(bad)?;
    if o.source.len() > 128 {
        return Err(bad("source is longer than 128 bytes".into()));
    }
    if let Some(c) = &o.condition {
        names::event_type(&c.r#type).map_err(|e| bad(format!("condition: {e}")))?;
        names::reason(&c.reason).map_err(|e| bad(format!("condition: {e}")))?;
        if c.message.len() > limits.max_text_bytes {
            return Err(bad("condition message too long".into()));
        }
        match ConditionStatus::try_from(c.status) {
            Ok(ConditionStatus::True | ConditionStatus::False | ConditionStatus::Unknown) => {}
            _ => return Err(bad(format!("condition {} has no valid status", c.r#type))),
        }
        if c.r#type != o.r#type {
            return Err(bad(format!("condition type {} differs from the observation type {}", c.r#type, o.r#type)));
        }
    }
    Ok(())
}

/// At most `max_attributes`, each with a key of 1 to 128 bytes and a value within `max_text_bytes`.
fn attributes(a: &HashMap<String, String>, limits: &LimitsConfig) -> Result<(), String> {
    if a.len() > limits.max_attributes {
        return Err(format!("{} attributes, at most {} allowed", a.len(), limits.max_attributes));
    }
    match a.iter().find(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > limits.max_text_bytes) {
        Some((k, _)) => {
            Err(format!("attribute {:?} has an empty or oversize key or value", k.chars().take(40).collect::<String>()))
        }
        None => Ok(()),
    }
}

/// A remediation step: an id, a step name of 1 to 64 bytes, a message and attributes within the
/// limits, and a state a step may move a fault to.
pub fn step(s: &RecordStepRequest, limits: &LimitsConfig) -> Result<(), Status> {
    name(names::report_id(&s.step_id))?;
    let bad = |msg: String| Status::invalid_argument(format!("step {:?}: {msg}", s.step_id));
    if s.step.is_empty() || s.step.len() > 64 {
        return Err(bad("the step name must be 1 to 64 bytes".into()));
    }
    if s.message.len() > limits.max_text_bytes {
        return Err(bad(format!("message is {} bytes, at most {} allowed", s.message.len(), limits.max_text_bytes)));
    }
    attributes(&s.attributes, limits).map_err(bad)?;
    if matches!(s.state(), FaultState::Open | FaultState::Resolved) {
        return Err(bad(
            "a step may move a fault to isolated, recovering or escalated; it opens and resolves with its condition"
                .into(),
        ));
    }
    Ok(())
}

/// A hello names a valid node, cluster and boot id.
pub fn hello(h: &Hello) -> Result<(), Status> {
    name(names::node(&h.node))?;
    name(names::cluster(&h.cluster))?;
    name(names::boot_id(&h.boot_id))?;
    if h.agent_version.len() > 64 {
        return Err(Status::invalid_argument("agent_version is longer than 64 bytes"));
    }
    Ok(())
}

/// A batch is within the limits, its sequences positive and increasing, every observation valid.
/// Returns its last sequence.
pub fn batch(batch: &ObservationBatch, limits: &LimitsConfig) -> Result<u64, Status> {
    if batch.observations.len() > limits.max_batch {
        return Err(Status::resource_exhausted(format!(
            "batch {} has {} observations, at most {} allowed",
            batch.batch_id,
            batch.observations.len(),
            limits.max_batch
        )));
    }
    let mut last = 0;
    for (i, o) in batch.observations.iter().enumerate() {
        if o.sequence <= last {
            return Err(Status::invalid_argument(format!(
                "batch {}: observation {i} has sequence {}, sequences must be positive and increasing",
                batch.batch_id, o.sequence
            )));
        }
        last = o.sequence;
        observation(o, limits, &|| format!("batch {} observation {i}", batch.batch_id))?;
    }
    Ok(last)
}

/// A component status report: names checked, text bounded, at most 256 components.
pub fn component_status(r: &nodekeeper_proto::v1::ComponentStatusReport, max_text: usize) -> Result<(), Status> {
    if r.components.len() > 256 {
        return Err(Status::invalid_argument(format!(
            "{} components in one status report; at most 256",
            r.components.len()
        )));
    }
    for c in &r.components {
        name(names::component(&c.name))?;
        let text = c.desired_version.len() + c.installed_version.len() + c.last_error.len();
        if text > max_text {
            return Err(Status::invalid_argument(format!(
                "status of component {:?}: {text} bytes of text, at most {max_text}",
                c.name
            )));
        }
    }
    Ok(())
}

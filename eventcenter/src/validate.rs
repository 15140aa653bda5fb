//! Checks on what producers send, before anything reaches the store. Each failure is an
//! INVALID_ARGUMENT status naming the field and why.

use nodekeeper_common::{names, observation};
use nodekeeper_proto::v1::{FaultState, Hello, Observation, ObservationBatch, RecordStepRequest, Rejection};
use tonic::Status;

pub fn name(r: Result<(), names::NameError>) -> Result<(), Status> {
    r.map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Validates one observation with the contract's check shared with the agent
/// (`nodekeeper_common::observation`); `what` names it in errors (e.g. "report 3").
pub fn observation(o: &Observation, what: &dyn Fn() -> String) -> Result<(), Status> {
    observation::validate(o).map_err(|msg| Status::invalid_argument(format!("{}: {msg}", what())))
}

/// A remediation step: an id, a step name of 1 to 64 bytes, a message and attributes within the
/// limits, and a state a step may move a fault to.
pub fn step(s: &RecordStepRequest) -> Result<(), Status> {
    name(names::report_id(&s.step_id))?;
    let bad = |msg: String| Status::invalid_argument(format!("step {:?}: {msg}", s.step_id));
    if s.step.is_empty() || s.step.len() > 64 {
        return Err(bad("the step name must be 1 to 64 bytes".into()));
    }
    text("message", &s.message).map_err(|e| bad(e.message().to_owned()))?;
    observation::attributes(&s.attributes).map_err(bad)?;
    if matches!(s.state(), FaultState::Open | FaultState::Resolved) {
        return Err(bad(
            "a step may move a fault to isolated, recovering or escalated; it opens and resolves with its condition"
                .into(),
        ));
    }
    Ok(())
}

/// Node labels as Kubernetes allows them: at most 256, keys of 1 to 317 bytes (a 253-byte prefix,
/// "/", a 63-byte name), values of at most 63 bytes.
pub fn labels(labels: &std::collections::HashMap<String, String>) -> Result<(), Status> {
    if labels.len() > 256 {
        return Err(Status::invalid_argument(format!("labels: {} given, at most 256 allowed", labels.len())));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > 317 || v.len() > 63 {
            return Err(Status::invalid_argument(format!(
                "label {k:?}: keys must be 1 to 317 bytes and values at most 63 bytes"
            )));
        }
    }
    Ok(())
}

/// A free text within the contract's limit.
pub fn text(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > observation::MAX_TEXT_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes, at most {} allowed",
            value.len(),
            observation::MAX_TEXT_BYTES
        )));
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

/// A batch checked: the observations to store, and those refused one by one.
#[derive(Debug, Default)]
pub struct Checked {
    pub valid: Vec<Observation>,
    pub rejected: Vec<Rejection>,
    /// The batch's last sequence.
    pub last: u64,
}

/// A batch is within `max_batch` and its sequences are positive and increasing, or it is refused
/// whole (a broken producer, not a bad observation). Each observation that fails its own check,
/// or whose sequence is beyond what the store holds, is refused alone: the rest are stored, so no
/// single observation can block the ones after it.
pub fn batch(batch: ObservationBatch, max_batch: usize) -> Result<Checked, Status> {
    if batch.observations.len() > max_batch {
        return Err(Status::resource_exhausted(format!(
            "batch {} has {} observations, at most {max_batch} allowed",
            batch.batch_id,
            batch.observations.len(),
        )));
    }
    let mut checked = Checked::default();
    for (i, o) in batch.observations.into_iter().enumerate() {
        if o.sequence <= checked.last {
            return Err(Status::invalid_argument(format!(
                "batch {}: observation {i} has sequence {}, sequences must be positive and increasing",
                batch.batch_id, o.sequence
            )));
        }
        checked.last = o.sequence;
        let verdict = if o.sequence > observation::MAX_SEQUENCE {
            Err(format!("sequence {} is beyond the highest a store holds ({})", o.sequence, observation::MAX_SEQUENCE))
        } else {
            observation::validate(&o)
        };
        match verdict {
            Ok(()) => checked.valid.push(o),
            Err(reason) => checked.rejected.push(Rejection { sequence: o.sequence, reason }),
        }
    }
    Ok(checked)
}

/// A component status report: names checked, text bounded, at most 256 components.
pub fn component_status(r: &nodekeeper_proto::v1::ComponentStatusReport) -> Result<(), Status> {
    let max_text = observation::MAX_TEXT_BYTES;
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

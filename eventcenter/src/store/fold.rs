//! How a condition event folds into its node's condition and its fault, decided apart from any
//! database so that every store engine folds alike: given what is stored (the node's condition of
//! that type, its open fault), the new stored condition and what becomes of the fault.

use nodekeeper_proto::v1::{Condition, ConditionStatus, Event, Fault, FaultState, NodeCondition};

/// What to store after a condition event.
pub(crate) struct Folded {
    pub condition: NodeCondition,
    pub fault: FaultChange,
}

pub(crate) enum FaultChange {
    /// A new fault (its `id` is 0: the store assigns it, then sets the event's `fault_id`).
    Open(Fault),
    /// The open fault, updated (seen again, or resolved).
    Update(Fault),
    None,
}

/// Folds `event` (a condition event stored at `cursor`): sets its condition's transition time
/// (the center's: kept while the status stays) and, for an update, its `fault_id`.
pub(crate) fn fold(event: &mut Event, before: Option<Condition>, open: Option<Fault>, cursor: u64) -> Option<Folded> {
    let mut condition = event.condition.clone()?;
    let producer = event.origin.as_ref().map(|o| o.producer.clone()).unwrap_or_default();
    let received = event.received_time;
    condition.last_transition_time = match before {
        Some(b) if b.status == condition.status && b.last_transition_time.is_some() => b.last_transition_time,
        _ => condition.last_transition_time.or(event.time).or(received),
    };
    event.condition = Some(condition.clone());
    let node_condition = NodeCondition {
        cluster: event.cluster.clone(),
        node: event.node.clone(),
        condition: Some(condition.clone()),
        producer,
        updated_time: received,
    };
    let status = ConditionStatus::try_from(condition.status).unwrap_or(ConditionStatus::Unspecified);
    let time = event.time.or(received);
    let fault = match (status, open) {
        (ConditionStatus::True, None) => FaultChange::Open(Fault {
            id: 0,
            cluster: event.cluster.clone(),
            node: event.node.clone(),
            r#type: condition.r#type.clone(),
            state: FaultState::Open as i32,
            severity: event.severity,
            category: event.category,
            action: event.action,
            reason: event.reason.clone(),
            message: event.message.clone(),
            count: 1,
            first_seen_time: time,
            last_seen_time: time,
            resolved_time: None,
            boot_id: event.origin.as_ref().map(|o| o.boot_id.clone()).unwrap_or_default(),
            opened_cursor: cursor.to_string(),
            resolution: String::new(),
        }),
        (ConditionStatus::True | ConditionStatus::Unknown, Some(mut fault)) => {
            fault.count += 1;
            fault.last_seen_time = time;
            if !event.message.is_empty() {
                fault.message = event.message.clone();
            }
            if !event.reason.is_empty() {
                fault.reason = event.reason.clone();
            }
            fault.severity = fault.severity.max(event.severity);
            event.fault_id = fault.id;
            FaultChange::Update(fault)
        }
        (ConditionStatus::False, Some(mut fault)) => {
            fault.count += 1;
            fault.last_seen_time = time;
            fault.resolved_time = time;
            fault.state = FaultState::Resolved as i32;
            event.fault_id = fault.id;
            FaultChange::Update(fault)
        }
        _ => FaultChange::None,
    };
    Some(Folded { condition: node_condition, fault })
}

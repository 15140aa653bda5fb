//! Readiness gates: what must hold before a node takes pods, when it joins (onboarding: the
//! remediator removes the startup taint only then) and when it is released after a repair. The
//! built-in gates come first, then each condition the configured O&M operators report:
//!
//! - "agent connected": the node's agent is alive (heartbeats within its grace);
//! - "components converged": every desired component at its version, for the newest desired
//!   generation (a node with nothing desired passes);
//! - "no open fault": no fault of the node is open, except those of its gate conditions (an
//!   operator's condition, True when ready, opens a fault like any True condition);
//! - "condition <type>": the condition was reported and is True (one nobody reported is not).

use nodekeeper_proto::v1::{ConditionStatus, Gate, Liveness, Node, NodeComponents};

use crate::config::ReadinessGates;
use crate::selector;

/// The gate conditions the configuration gives this node, in configuration order.
pub fn gate_conditions<'a>(node: &Node, rules: &'a [ReadinessGates]) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for rule in rules {
        let cluster = rule.cluster == "*" || rule.cluster == node.cluster;
        if cluster && (rule.selector.is_empty() || selector::matches(&rule.selector, &node.labels)) {
            for c in &rule.conditions {
                if !out.contains(&c.as_str()) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The node's gates, in order. `components`: what ListComponents says of the node (None:
/// nothing desired or reported); `open_faults`: the types of its open faults.
pub fn gates(
    node: &Node,
    components: Option<&NodeComponents>,
    open_faults: &[String],
    rules: &[ReadinessGates],
) -> Vec<Gate> {
    let gate = |name: &str, reason: Option<String>| Gate {
        name: name.to_owned(),
        holds: reason.is_none(),
        reason: reason.unwrap_or_default(),
    };
    let conditions = gate_conditions(node, rules);
    let mut out = Vec::new();
    let agent = if node.decommissioned_time.is_some() {
        Some("the node is decommissioned".to_owned())
    } else if node.liveness() != Liveness::Alive {
        Some("no heartbeat from its agent within its grace".to_owned())
    } else {
        None
    };
    out.push(gate("agent connected", agent));
    let converged = components.filter(|c| c.desired_generation > 0 && !c.converged).map(|c| {
        let behind: Vec<String> = c
            .components
            .iter()
            .filter(|s| s.installed_version != s.desired_version || !s.last_error.is_empty())
            .map(|s| {
                let installed = if s.installed_version.is_empty() { "none" } else { &s.installed_version };
                format!("{} at {installed}, desired {}", s.name, s.desired_version)
            })
            .collect();
        if c.reported_generation != c.desired_generation {
            format!("the node reported generation {}, desired is {}", c.reported_generation, c.desired_generation)
        } else if behind.is_empty() {
            format!("not every component converged at generation {}", c.desired_generation)
        } else {
            behind.join("; ")
        }
    });
    out.push(gate("components converged", converged));
    let open: Vec<&str> =
        open_faults.iter().map(String::as_str).filter(|t| !conditions.contains(t)).collect::<Vec<_>>();
    out.push(gate("no open fault", (!open.is_empty()).then(|| format!("open: {}", open.join(", ")))));
    for kind in conditions {
        let reported = node.conditions.iter().filter_map(|c| c.condition.as_ref()).find(|c| c.r#type == kind);
        let reason = match reported {
            None => Some("not reported".to_owned()),
            Some(c) if c.status() == ConditionStatus::True => None,
            Some(c) => {
                let status = c.status().as_str_name().trim_start_matches("CONDITION_STATUS_").to_owned();
                let why = if c.reason.is_empty() { String::new() } else { format!(" ({})", c.reason) };
                Some(format!("{status}{why}"))
            }
        };
        out.push(gate(&format!("condition {kind}"), reason));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{ComponentPhase, ComponentStatus, Condition, NodeCondition};

    fn rule(cluster: &str, selector: &str, conditions: &[&str]) -> ReadinessGates {
        ReadinessGates {
            cluster: cluster.into(),
            selector: selector.into(),
            conditions: conditions.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn node(conditions: &[(&str, ConditionStatus)]) -> Node {
        Node {
            name: "n1".into(),
            cluster: "c1".into(),
            liveness: Liveness::Alive as i32,
            labels: [("pool".to_owned(), "gpu".to_owned())].into(),
            conditions: conditions
                .iter()
                .map(|(t, s)| NodeCondition {
                    condition: Some(Condition { r#type: t.to_string(), status: *s as i32, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn failing(gates: &[Gate]) -> Vec<(String, String)> {
        gates.iter().filter(|g| !g.holds).map(|g| (g.name.clone(), g.reason.clone())).collect()
    }

    #[test]
    fn each_gate_says_why_it_does_not_hold() {
        let rules = [rule("*", "", &["LogsReady"]), rule("c1", "pool=gpu", &["GpuReady"]), rule("c2", "", &["X"])];
        let mut n = node(&[("GpuReady", ConditionStatus::False)]);
        n.liveness = Liveness::Lost as i32;
        let components = NodeComponents {
            desired_generation: 3,
            reported_generation: 3,
            components: vec![ComponentStatus {
                name: "kubelet".into(),
                installed_version: "1.30.1".into(),
                desired_version: "1.31.0".into(),
                phase: ComponentPhase::Installing as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let g = gates(&n, Some(&components), &["KernelDeadlock".into(), "GpuReady".into()], &rules);
        let names: Vec<&str> = g.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            ["agent connected", "components converged", "no open fault", "condition LogsReady", "condition GpuReady"]
        );
        assert_eq!(
            failing(&g),
            [
                ("agent connected".into(), "no heartbeat from its agent within its grace".into()),
                ("components converged".into(), "kubelet at 1.30.1, desired 1.31.0".into()),
                ("no open fault".into(), "open: KernelDeadlock".into()),
                ("condition LogsReady".into(), "not reported".into()),
                ("condition GpuReady".into(), "FALSE".into()),
            ]
        );
    }

    #[test]
    fn a_node_passes_when_every_gate_holds() {
        let rules = [rule("c1", "pool=gpu", &["GpuReady"]), rule("c1", "pool=cpu", &["CpuReady"])];
        let n = node(&[("GpuReady", ConditionStatus::True)]);
        let converged =
            NodeComponents { desired_generation: 2, reported_generation: 2, converged: true, ..Default::default() };
        let g = gates(&n, Some(&converged), &["GpuReady".into()], &rules);
        assert_eq!(failing(&g), []);
        assert_eq!(g.len(), 4, "the cpu pool's condition is not this node's gate");
    }
}

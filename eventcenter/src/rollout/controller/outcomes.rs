//! What became of the nodes in flight (changed, failed, rolled back), the bake's faults, the
//! failure budget, and the fleet rollback.

use std::time::{Duration, SystemTime};

use nodekeeper_common::time::{from_duration, timestamp_to_unix_ms, to_timestamp, to_unix_ms};
use nodekeeper_proto::v1::{
    ComponentPhase, ComponentSpec, ComponentStatusReport, DesiredState, Rollout, RolloutFailureAction, RolloutNode,
    RolloutNodePhase as NodePhase, RolloutPhase as Phase, Severity,
};
use prost::Message;

use super::{DEFAULT_NODE_TIMEOUT, Pass, components, node_event, since, strategy};
use crate::api::components::desired_version;
use crate::rollout::Size;

impl Pass<'_> {
    /// Outcomes of the nodes in flight: commanded (changing or rolling back), or waiting for
    /// their drain or uncordon past `node_timeout`.
    pub(super) fn observe(&mut self, r: &mut Rollout) {
        let s = strategy(r);
        let timeout = from_duration(s.node_timeout.as_ref()).unwrap_or(DEFAULT_NODE_TIMEOUT);
        let wanted: Vec<ComponentSpec> = components(r).to_vec();
        for i in 0..r.nodes.len() {
            let n = &r.nodes[i];
            let phase = n.phase();
            let late = since(n.started_time.as_ref(), self.now) > timeout;
            let limit = humantime::format_duration(timeout);
            let verdict = match phase {
                NodePhase::Draining if late => Some(Err(format!("not drained within {limit}"))),
                NodePhase::Uncordoning if late => {
                    let n = &mut r.nodes[i];
                    n.phase = NodePhase::Failed as i32;
                    n.reason = format!("not uncordoned within {limit}: it may still be cordoned");
                    let msg = format!("{} failed: {}", n.node, n.reason);
                    self.events.push(node_event(r, &r.nodes[i], "RolloutNodeFailed", msg, Severity::Warning));
                    self.dirty = true;
                    continue;
                }
                NodePhase::Changing | NodePhase::RollingBack if !self.facts.nodes.contains_key(&n.node) => {
                    Some(Err("the node left the fleet (decommissioned)".to_owned()))
                }
                NodePhase::Changing | NodePhase::RollingBack => {
                    let generation = self.facts.desired.own(&n.node).map(|(g, _)| g).unwrap_or(0);
                    let report = self.facts.statuses.get(&n.node).filter(|s| s.generation >= generation);
                    report
                        .and_then(|s| outcome(s, &wanted, phase == NodePhase::RollingBack))
                        .or_else(|| late.then(|| Err(format!("did not converge within {limit}"))))
                }
                _ => None,
            };
            let back = phase == NodePhase::RollingBack;
            match verdict {
                None => continue,
                Some(Ok(())) if back => {
                    r.nodes[i].phase = NodePhase::RolledBack as i32;
                    let msg = format!("{} rolled back in {}", n_name(r, i), took(r, i, self.now));
                    self.events.push(node_event(r, &r.nodes[i], "RolloutNodeRolledBack", msg, Severity::Info));
                    self.dirty = true;
                }
                Some(Ok(())) => {
                    let msg = format!("{} changed in {}", n_name(r, i), took(r, i, self.now));
                    self.events.push(node_event(r, &r.nodes[i], "RolloutNodeChanged", msg, Severity::Info));
                    self.finish(r, i, NodePhase::Changed, s.drain);
                }
                Some(Err(why)) => {
                    let n = &mut r.nodes[i];
                    n.reason = if back { format!("rollback failed: {why}") } else { why };
                    let msg = format!("{} failed: {}", n.node, n.reason);
                    self.events.push(node_event(r, &r.nodes[i], "RolloutNodeFailed", msg, Severity::Warning));
                    self.finish(r, i, NodePhase::Failed, s.drain && !back);
                }
            }
        }
    }

    /// A node of the wave in progress that changed and then has a fault open while the wave
    /// bakes failed.
    pub(super) fn bake_faults(&mut self, r: &mut Rollout) {
        let baked = r.bake_until.as_ref().is_some_and(|t| timestamp_to_unix_ms(t) <= to_unix_ms(self.now));
        if baked {
            return;
        }
        let wave = r.wave;
        let mut failed = Vec::new();
        for (i, n) in r.nodes.iter_mut().enumerate() {
            if n.wave != wave || n.phase() != NodePhase::Changed {
                continue;
            }
            if let Some(types) = self.facts.open.get(&n.node).filter(|t| !t.is_empty()) {
                n.phase = NodePhase::Failed as i32;
                n.reason = format!("a fault opened after its change: {}", types.join(", "));
                failed.push(i);
            }
        }
        for i in failed {
            let n = &r.nodes[i];
            self.events.push(node_event(
                r,
                n,
                "RolloutNodeFailed",
                format!("{} failed: {}", n.node, n.reason),
                Severity::Warning,
            ));
            self.dirty = true;
        }
    }

    /// More nodes failed than the budget allows: halt or roll back. True when it did.
    pub(super) fn over_budget(&mut self, r: &mut Rollout) -> bool {
        let s = strategy(r);
        let counted = r.nodes.iter().filter(|n| n.phase() != NodePhase::Skipped).count() as u64;
        let budget = Size::parse(if s.failure_budget.is_empty() { "0" } else { &s.failure_budget })
            .map(|b| b.of(counted))
            .unwrap_or(0);
        let failed: Vec<&RolloutNode> = r
            .nodes
            .iter()
            .filter(|n| {
                n.phase() == NodePhase::Failed || (n.phase() == NodePhase::Uncordoning && n.then() == NodePhase::Failed)
            })
            .collect();
        if failed.len() as u64 <= budget {
            return false;
        }
        let first: Vec<String> = failed.iter().take(3).map(|n| format!("{}: {}", n.node, n.reason)).collect();
        let why =
            format!("{} node(s) failed, more than the failure budget of {budget} ({})", failed.len(), first.join("; "));
        if s.on_failure() == RolloutFailureAction::Rollback {
            r.phase = Phase::RollingBack as i32;
            r.reason = why.clone();
            self.rollout_event(r, "RolloutRollbackStarted", format!("rolling back: {why}"), Severity::Warning);
            self.roll_back(r);
        } else {
            r.phase = Phase::Halted as i32;
            r.reason = why.clone();
            self.rollout_event(r, "RolloutHalted", format!("halted: {why}"), Severity::Warning);
        }
        true
    }

    /// Commands changed nodes back to their previous own rows, `max_parallel` at a time, the last
    /// wave first; rolled back when none is left.
    pub(super) fn roll_back(&mut self, r: &mut Rollout) {
        let s = strategy(r);
        self.abandon_draining(r, "the rollout is rolling back");
        // A node being changed on a drained rollout finishes (and is uncordoned) first.
        let busy = |p: NodePhase| {
            matches!(p, NodePhase::RollingBack | NodePhase::Uncordoning) || (s.drain && p == NodePhase::Changing)
        };
        let rolling = r.nodes.iter().filter(|n| busy(n.phase())).count();
        let slots = (s.max_parallel.max(1) as usize).saturating_sub(rolling);
        let mut todo: Vec<usize> = (0..r.nodes.len())
            .filter(|&i| {
                let n = &r.nodes[i];
                n.commanded
                    && !n.rollback_started
                    && !busy(n.phase())
                    && matches!(n.phase(), NodePhase::Changing | NodePhase::Changed | NodePhase::Failed)
            })
            .collect();
        if todo.is_empty() && rolling == 0 {
            let back = r.nodes.iter().filter(|n| n.phase() == NodePhase::RolledBack).count();
            let failed = r.nodes.iter().filter(|n| n.rollback_started && n.phase() == NodePhase::Failed).count();
            r.phase = Phase::RolledBack as i32;
            let msg = format!("rolled back: {back} node(s) back at their previous versions, {failed} failed to");
            self.rollout_event(r, "RolloutRolledBack", msg, Severity::Warning);
            return;
        }
        todo.sort_by(|&a, &b| r.nodes[b].wave.cmp(&r.nodes[a].wave).then(r.nodes[a].node.cmp(&r.nodes[b].node)));
        for i in todo.into_iter().take(slots) {
            let n = &mut r.nodes[i];
            let own = if n.had_own { n.previous_own.clone() } else { Vec::new() };
            self.desired
                .push((format!("node:{}", n.node), DesiredState { generation: 0, components: own }.encode_to_vec()));
            let was = phase_label(n.phase());
            n.phase = NodePhase::RollingBack as i32;
            n.rollback_started = true;
            n.started_time = Some(to_timestamp(self.now));
            let back: Vec<String> = n.previous.iter().map(|p| format!("{} {}", p.name, desired_version(p))).collect();
            let msg = format!(
                "{} ({was}): rolling back to {}",
                n.node,
                if back.is_empty() { "what it had".into() } else { back.join(", ") }
            );
            self.events.push(node_event(r, &r.nodes[i], "RolloutNodeRollingBack", msg, Severity::Warning));
            self.dirty = true;
        }
    }
}

fn n_name(r: &Rollout, i: usize) -> &str {
    &r.nodes[i].node
}

/// How long node `i` took since it was commanded, in whole seconds.
fn took(r: &Rollout, i: usize, now: SystemTime) -> String {
    humantime::format_duration(Duration::from_secs(since(r.nodes[i].started_time.as_ref(), now).as_secs())).to_string()
}

fn phase_label(p: NodePhase) -> String {
    p.as_str_name().trim_start_matches("ROLLOUT_NODE_PHASE_").to_ascii_lowercase().replace('_', " ")
}

/// What a node's report says of the rollout's components: None while they are still on their
/// way; Ok when all converged (at the rollout's versions, unless rolling back); Err when one
/// failed. Installed versions are as rpm has them ("0:2.0-1"), desired as given ("2.0-1").
fn outcome(report: &ComponentStatusReport, wanted: &[ComponentSpec], back: bool) -> Option<Result<(), String>> {
    let mut all = true;
    for w in wanted {
        let Some(c) = report.components.iter().find(|c| c.name == w.name) else {
            all = false;
            continue;
        };
        if c.phase() == ComponentPhase::Failed {
            let why = if c.last_error.is_empty() { "failed".to_owned() } else { c.last_error.clone() };
            return Some(Err(format!("{}: {why}", c.name)));
        }
        // The agent reports converged only when what is installed is what it was told.
        let at_version = back || c.desired_version == desired_version(w);
        all &= c.phase() == ComponentPhase::Converged && at_version;
    }
    all.then_some(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::ComponentStatus;

    pub(super) fn status(
        name: &str,
        desired: &str,
        installed: &str,
        phase: ComponentPhase,
        error: &str,
    ) -> ComponentStatus {
        ComponentStatus {
            name: name.into(),
            desired_version: desired.into(),
            installed_version: installed.into(),
            phase: phase as i32,
            last_error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    pub(super) fn a_node_changed_when_every_component_converged_at_the_rollouts_version() {
        let wanted = [ComponentSpec { name: "kubelet".into(), version: "2.0-1".into(), ..Default::default() }];
        let report = |c| ComponentStatusReport { generation: 5, components: vec![c] };
        let r = report(status("kubelet", "2.0-1", "1.0-1", ComponentPhase::Installing, ""));
        assert_eq!(outcome(&r, &wanted, false), None);
        let r = report(status("kubelet", "2.0-1", "0:2.0-1", ComponentPhase::Converged, ""));
        assert_eq!(outcome(&r, &wanted, false), Some(Ok(())));
        let r = report(status("kubelet", "2.0-1", "1.0-1", ComponentPhase::Failed, "health check failed"));
        assert_eq!(outcome(&r, &wanted, false), Some(Err("kubelet: health check failed".into())));
        // Rolling back: converged at whatever it had.
        let r = report(status("kubelet", "1.0-1", "0:1.0-1", ComponentPhase::Converged, ""));
        assert_eq!(outcome(&r, &wanted, true), Some(Ok(())));
        assert_eq!(outcome(&r, &wanted, false), None);
    }
}

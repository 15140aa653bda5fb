//! Membership, waves and their bakes, starting nodes (their own gates, windows, permits), and
//! completion.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nodekeeper_common::time::{from_duration, timestamp_to_unix_ms, to_timestamp, to_unix_ms};
use nodekeeper_proto::v1::{
    ComponentSpec, DesiredState, Node, Operation, Rollout, RolloutNode, RolloutNodePhase as NodePhase,
    RolloutPhase as Phase, Severity,
};
use prost::Message;

use super::{DEFAULT_NODE_TIMEOUT, Pass, PassError, components, holder, in_flight, node_event, strategy};
use crate::api::components::desired_version;
use crate::rollout::window;
use crate::selector;

impl Pass<'_> {
    /// Nodes that joined the selector go into the last wave; waiting ones that left are skipped.
    pub(super) fn membership(&mut self, r: &mut Rollout) {
        let spec = r.spec.clone().unwrap_or_default();
        let last = strategy(r).waves.len().saturating_sub(1) as u32;
        let planned: HashSet<String> = r.nodes.iter().map(|n| n.node.clone()).collect();
        let mut joined: Vec<&Node> = self
            .facts
            .nodes
            .values()
            .filter(|n| !planned.contains(&n.name) && selector::matches(&spec.selector, &n.labels))
            .collect();
        joined.sort_by(|a, b| a.name.cmp(&b.name));
        let mut events = Vec::new();
        for n in joined {
            r.nodes.push(RolloutNode {
                node: n.name.clone(),
                wave: last,
                phase: NodePhase::Waiting as i32,
                ..Default::default()
            });
            events.push((
                r.nodes.len() - 1,
                "RolloutNodeAdded",
                format!("{} joined the selector: in the last wave", n.name),
            ));
        }
        for (i, n) in r.nodes.iter_mut().enumerate() {
            if n.phase() != NodePhase::Waiting {
                continue;
            }
            let why = match self.facts.nodes.get(&n.node) {
                None => "it left the fleet (decommissioned)",
                Some(node) if !selector::matches(&spec.selector, &node.labels) => "it left the selector",
                Some(_) => continue,
            };
            n.phase = NodePhase::Skipped as i32;
            n.reason = why.to_owned();
            events.push((i, "RolloutNodeSkipped", format!("{} skipped: {why}", n.node)));
        }
        for (i, kind, msg) in events {
            self.events.push(node_event(r, &r.nodes[i], kind, msg, Severity::Info));
            self.dirty = true;
        }
    }

    /// Bakes a finished wave, starts the next, completes the rollout, or starts more nodes of the
    /// wave in progress. Returns when a bake ends, if one is under way.
    pub(super) async fn advance(&mut self, r: &mut Rollout) -> Result<Option<Instant>, PassError> {
        let s = strategy(r);
        // Guards and business gates, every pass: a bake goes on under them, but no wave starts.
        let cluster = r.spec.as_ref().map(|s| s.cluster.clone()).unwrap_or_default();
        if let Some(why) = self.ctx.permits.held_back(&self.ctx.store, &cluster, Operation::Upgrade).await? {
            self.wait(r, why);
            return Ok(None);
        }
        loop {
            let wave = r.wave;
            if r.nodes.iter().any(|n| n.wave == wave && (n.phase() == NodePhase::Waiting || in_flight(n.phase()))) {
                break;
            }
            // A wave that took no node (no bigger than the one before) has nothing to bake.
            if r.bake_until.is_none() && !r.nodes.iter().any(|n| n.wave == wave) {
                match next_wave(r, wave, s.waves.len()) {
                    Some(next) => r.wave = next,
                    None => {
                        self.complete(r);
                        return Ok(None);
                    }
                }
                continue;
            }
            let bake = from_duration(s.bake.as_ref()).unwrap_or_default();
            let Some(until) = r.bake_until.as_ref().map(timestamp_to_unix_ms) else {
                let of = |p: NodePhase| r.nodes.iter().filter(|n| n.wave == wave && n.phase() == p).count();
                let msg = format!(
                    "wave {} of {} done: {} changed, {} failed, {} skipped; baking {}",
                    wave + 1,
                    s.waves.len(),
                    of(NodePhase::Changed),
                    of(NodePhase::Failed),
                    of(NodePhase::Skipped),
                    humantime::format_duration(bake)
                );
                r.bake_until = Some(to_timestamp(self.now + bake));
                self.rollout_event(r, "RolloutWaveChanged", msg, Severity::Info);
                if bake.is_zero() {
                    continue;
                }
                self.go_on(r);
                return Ok(Some(Instant::now() + bake));
            };
            let left = until - to_unix_ms(self.now);
            if left > 0 {
                self.go_on(r);
                return Ok(Some(Instant::now() + Duration::from_millis(left as u64)));
            }
            let Some(next) = next_wave(r, wave, s.waves.len()) else {
                self.complete(r);
                return Ok(None);
            };
            r.wave = next;
            r.bake_until = None;
            let count = r.nodes.iter().filter(|n| n.wave == r.wave).count();
            let msg = format!("wave {} of {} started: {count} node(s)", r.wave + 1, s.waves.len());
            self.rollout_event(r, "RolloutWaveStarted", msg, Severity::Info);
        }
        self.start_nodes(r, &s).await?;
        Ok(None)
    }

    /// Starts waiting nodes of the wave in progress, up to `max_parallel` changing at once.
    pub(super) async fn start_nodes(
        &mut self,
        r: &mut Rollout,
        s: &nodekeeper_proto::v1::RolloutStrategy,
    ) -> Result<(), PassError> {
        let spec = r.spec.clone().unwrap_or_default();
        let changing = r.nodes.iter().filter(|n| in_flight(n.phase())).count();
        let slots = (s.max_parallel.max(1) as usize).saturating_sub(changing);
        let wave = r.wave;
        let waiting: Vec<usize> = (0..r.nodes.len())
            .filter(|&i| r.nodes[i].wave == wave && r.nodes[i].phase() == NodePhase::Waiting)
            .collect();
        if waiting.is_empty() {
            self.go_on(r);
            return Ok(());
        }
        if !window::open(&s.windows, jiff::Timestamp::now()) {
            self.wait(r, "outside its maintenance windows".into());
            return Ok(());
        }
        if slots == 0 {
            self.go_on(r);
            return Ok(());
        }
        // Each node's own gates before it changes.
        let mut candidates: Vec<Node> =
            waiting.iter().filter_map(|&i| self.facts.nodes.get(&r.nodes[i].node).cloned()).collect();
        crate::api::nodes::fill_gates(self.ctx, &mut candidates).await?;
        let mut held = None;
        let mut ready = Vec::new();
        for c in &candidates {
            match c.gates.iter().find(|g| !g.holds && !is_operator_gate(&g.name)) {
                Some(g) => {
                    held.get_or_insert_with(|| format!("node {}: {}: {}", c.name, g.name, g.reason));
                }
                None if ready.len() < slots => ready.push((c.name.clone(), 0u64)),
                None => break,
            }
        }
        if ready.is_empty() {
            if let Some(why) = held {
                self.wait(r, why);
            }
            return Ok(());
        }
        self.forget_stale_permits(r).await?;
        let timeout = from_duration(s.node_timeout.as_ref()).unwrap_or(DEFAULT_NODE_TIMEOUT);
        let lease = timeout + Duration::from_secs(60);
        let (granted, denied) = self
            .ctx
            .permits
            .acquire_many(&self.ctx.store, &holder(&spec.name), Operation::Upgrade, &spec.cluster, &ready, Some(lease))
            .await?;
        if granted.is_empty() {
            self.wait(r, denied.unwrap_or_default());
            return Ok(());
        }
        let index: HashMap<String, usize> = r.nodes.iter().enumerate().map(|(i, n)| (n.node.clone(), i)).collect();
        for p in granted {
            let i = index[&p.node];
            if s.drain {
                let n = &mut r.nodes[i];
                n.phase = NodePhase::Draining as i32;
                n.started_time = Some(to_timestamp(self.now));
                let msg = format!("{}: cordon and drain requested (upgrade permit {})", n.node, p.id);
                n.permit_id = p.id;
                self.events.push(node_event(r, &r.nodes[i], "RolloutNodeDraining", msg, Severity::Info));
                self.dirty = true;
            } else {
                self.command(r, i, p.id);
            }
        }
        self.go_on(r);
        Ok(())
    }

    /// Nothing holds the rollout back any more: a waiting one goes on.
    pub(super) fn go_on(&mut self, r: &mut Rollout) {
        if r.phase() == Phase::Waiting {
            r.phase = Phase::Progressing as i32;
            let was = std::mem::take(&mut r.reason);
            self.rollout_event(r, "RolloutContinued", format!("going on: no longer waiting ({was})"), Severity::Info);
        }
    }

    /// Permits this rollout holds that no node of it refers to (granted before a crash of the
    /// center and never recorded): released, so the nodes can ask again at once.
    pub(super) async fn forget_stale_permits(&mut self, r: &Rollout) -> Result<(), PassError> {
        let spec = r.spec.as_ref().expect("a stored rollout has its spec");
        let ours = holder(&spec.name);
        let known: HashSet<&str> = r.nodes.iter().map(|n| n.permit_id.as_str()).collect();
        let stale: Vec<(String, bool)> = self
            .ctx
            .permits
            .active(std::slice::from_ref(&spec.cluster))
            .into_iter()
            .filter(|p| p.holder == ours && !known.contains(p.id.as_str()))
            .map(|p| (p.id, false))
            .collect();
        if !stale.is_empty() {
            self.ctx.permits.release_many(&self.ctx.store, &stale, &ours).await?;
        }
        Ok(())
    }

    /// Gives node `i` its own row with the rollout's components on top.
    pub(super) fn command(&mut self, r: &mut Rollout, i: usize, permit_id: String) {
        let wanted = components(r).to_vec();
        let labels = self.facts.nodes.get(&r.nodes[i].node).map(|n| n.labels.clone()).unwrap_or_default();
        let own = self.facts.desired.own(&r.nodes[i].node).map(|(_, s)| s.to_vec());
        let before = self.facts.desired.effective(&r.nodes[i].node, &labels);
        let n = &mut r.nodes[i];
        n.had_own = own.is_some();
        n.previous_own = own.unwrap_or_default();
        n.previous = before.components.iter().filter(|c| wanted.iter().any(|w| w.name == c.name)).cloned().collect();
        let specs = overlay(&n.previous_own, &wanted);
        self.desired
            .push((format!("node:{}", n.node), DesiredState { generation: 0, components: specs }.encode_to_vec()));
        n.phase = NodePhase::Changing as i32;
        n.commanded = true;
        n.started_time = Some(to_timestamp(self.now));
        n.reason.clear();
        let change: Vec<String> = wanted
            .iter()
            .map(|w| {
                let from = n.previous.iter().find(|p| p.name == w.name).map(desired_version).unwrap_or("none");
                format!("{} {from} → {}", w.name, desired_version(w))
            })
            .collect();
        let msg = format!("{}: changing {} (upgrade permit {permit_id})", n.node, change.join(", "));
        n.permit_id = permit_id;
        self.events.push(node_event(r, &r.nodes[i], "RolloutNodeStarted", msg, Severity::Info));
        self.dirty = true;
    }

    /// Waits on a gate: the phase and reason change (and are recorded) only when they differ.
    pub(super) fn wait(&mut self, r: &mut Rollout, why: String) {
        if r.phase() == Phase::Waiting && r.reason == why {
            return;
        }
        r.phase = Phase::Waiting as i32;
        r.reason = why.clone();
        self.rollout_event(r, "RolloutWaiting", format!("waiting: {why}"), Severity::Info);
    }

    /// The last wave baked: the rollout's versions become the selector's desired state, and the
    /// nodes' own rows lose the rollout's components (a failed node keeps what it ran before).
    pub(super) fn complete(&mut self, r: &mut Rollout) {
        let spec = r.spec.clone().unwrap_or_default();
        let Ok(target) = selector::target(&spec.selector) else { return };
        let current: Vec<ComponentSpec> =
            self.facts.desired.selector_row(&target).map(<[_]>::to_vec).unwrap_or_default();
        let specs = overlay(&current, &spec.components);
        self.desired.push((target, DesiredState { generation: 0, components: specs }.encode_to_vec()));
        for n in &r.nodes {
            if !n.commanded || !matches!(n.phase(), NodePhase::Changed | NodePhase::Failed) {
                continue;
            }
            let mut own: Vec<ComponentSpec> =
                n.previous_own.iter().filter(|c| !spec.components.iter().any(|w| w.name == c.name)).cloned().collect();
            if n.phase() == NodePhase::Failed {
                own.extend(n.previous.iter().cloned());
            }
            self.desired
                .push((format!("node:{}", n.node), DesiredState { generation: 0, components: own }.encode_to_vec()));
        }
        let of = |p: NodePhase| r.nodes.iter().filter(|n| n.phase() == p).count();
        let msg = format!(
            "completed: {} changed, {} failed (kept at their previous versions), {} skipped; the nodes matching {} now desire {}",
            of(NodePhase::Changed),
            of(NodePhase::Failed),
            of(NodePhase::Skipped),
            spec.selector,
            spec.components.iter().map(|c| format!("{} {}", c.name, desired_version(c))).collect::<Vec<_>>().join(", ")
        );
        r.phase = Phase::Completed as i32;
        r.reason.clear();
        self.rollout_event(r, "RolloutCompleted", msg, Severity::Info);
    }
}

/// The first wave after `wave` that has nodes.
fn next_wave(r: &Rollout, wave: u32, waves: usize) -> Option<u32> {
    (wave + 1..waves as u32).find(|w| r.nodes.iter().any(|n| n.wave == *w))
}

/// An operator's gate condition (`condition <type>`): it says whether a node may take pods, not
/// whether it may change, so a rollout does not wait on it.
fn is_operator_gate(name: &str) -> bool {
    name.starts_with("condition ")
}

/// `base` with `top` replacing components of the same name and adding the others.
fn overlay(base: &[ComponentSpec], top: &[ComponentSpec]) -> Vec<ComponentSpec> {
    let mut out: Vec<ComponentSpec> = base.iter().filter(|b| !top.iter().any(|t| t.name == b.name)).cloned().collect();
    out.extend(top.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn spec(name: &str, version: &str) -> ComponentSpec {
        ComponentSpec { name: name.into(), package: name.into(), version: version.into(), ..Default::default() }
    }

    #[test]
    pub(super) fn overlay_replaces_by_name() {
        let got = overlay(&[spec("kubelet", "1"), spec("containerd", "1")], &[spec("kubelet", "2")]);
        let names: Vec<(String, String)> = got.into_iter().map(|c| (c.name, c.version)).collect();
        assert_eq!(names, [("containerd".into(), "1".into()), ("kubelet".into(), "2".into())]);
    }
}

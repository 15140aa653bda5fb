//! The rollout controller: a task of the center that drives every running rollout from the
//! center's own state, one pass a second (at once when a person creates or controls a rollout,
//! and at the moment a bake ends).
//!
//! A pass over one rollout, under the lock the API takes for its changes:
//! 1. **observe** the nodes commanded: converged at the rollout's versions → changed; a component
//!    failed (the agent rolled it back) or no convergence within `node_timeout` → failed; a node
//!    that changed and then has a fault open while its wave bakes → failed;
//! 2. **failure budget**: more failed nodes than the budget → `halt` or `rollback`;
//! 3. **membership**: nodes that joined the selector go into the last wave; waiting nodes that
//!    left it (or the fleet) are skipped;
//! 4. **advance**: a wave whose nodes are all done bakes, then the next starts; the last one
//!    baked completes the rollout (its versions become the selector's desired state, so new nodes
//!    get them). New nodes start only while no guard or business gate holds changes back (a
//!    freeze, the breaker, an Alertmanager alert, a reported metric), inside a maintenance
//!    window, when the node's own gates hold (agent connected, components converged, no open
//!    fault), and with an `upgrade` permit each; otherwise the rollout waits, with the reason, and
//!    goes on by itself when it holds again;
//! 5. **commit**: the rollout's new state, its events and the desired components of the nodes
//!    it commands are one transaction, so a restart of the center resumes at the same point: no
//!    node commanded twice, none skipped. Permits are released and the nodes sent their new
//!    desired state after it.
//!
//! A node is changed by giving it an own desired-components row (its previous own row with the
//! rollout's components on top); a rollback writes its previous own row back. The rollback takes
//! no permit (it is the way back to what ran before) and goes `max_parallel` nodes at a time,
//! the last wave first.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::{from_duration, timestamp_to_unix_ms, to_timestamp, to_unix_ms};
use nodekeeper_proto::v1::{
    ComponentPhase, ComponentSpec, ComponentStatusReport, DesiredState, Node, Operation, Rollout, RolloutFailureAction,
    RolloutNode, RolloutNodePhase as NodePhase, RolloutPhase as Phase, Severity,
};
use prost::Message;

use super::{Size, event, window};
use crate::api::Ctx;
use crate::api::components::{Desired, desired_version, push_many};
use crate::selector;
use crate::store::NewEvent;

/// Between passes when nothing wakes the controller sooner.
pub const PASS: Duration = Duration::from_secs(1);
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(600);
/// Who the controller's own decisions are recorded as.
const BY: &str = "center rollout controller";

/// Runs until the center stops.
pub async fn run(ctx: Ctx) {
    let mut names: Vec<String> = Vec::new();
    let mut relist = true;
    loop {
        if relist {
            match ctx.store.list_rollouts(vec![]).await {
                Ok(all) => {
                    names = all
                        .iter()
                        .filter(|r| wants_passes(r))
                        .filter_map(|r| r.spec.as_ref())
                        .map(|s| s.name.clone())
                        .collect()
                }
                Err(e) => tracing::warn!(error = %e, "rollouts not read; trying again"),
            }
            relist = false;
        }
        let mut next = Instant::now() + PASS;
        let mut done = HashSet::new();
        for name in &names {
            match pass(&ctx, name).await {
                Ok(Outcome { active: false, .. }) => {
                    done.insert(name.clone());
                }
                Ok(Outcome { wake: Some(at), .. }) => next = next.min(at),
                Ok(_) => {}
                Err(e) => tracing::warn!(rollout = %name, error = %e, "rollout pass failed; trying again"),
            }
        }
        names.retain(|n| !done.contains(n));
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = ctx.rollouts.changed.notified() => relist = true,
        }
    }
}

/// The rollout still needs passes: running, paused (its commanded nodes are still watched), or
/// with nodes changing.
fn wants_passes(r: &Rollout) -> bool {
    matches!(r.phase(), Phase::Pending | Phase::Progressing | Phase::Waiting | Phase::RollingBack | Phase::Paused)
        || r.nodes.iter().any(|n| matches!(n.phase(), NodePhase::Changing | NodePhase::RollingBack))
}

struct Outcome {
    active: bool,
    /// When the next pass is due if sooner than `PASS` (a bake ending).
    wake: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PassError(String);

impl From<crate::store::StoreError> for PassError {
    fn from(e: crate::store::StoreError) -> Self {
        PassError(e.to_string())
    }
}

impl From<tonic::Status> for PassError {
    fn from(s: tonic::Status) -> Self {
        PassError(s.message().to_owned())
    }
}

async fn pass(ctx: &Ctx, name: &str) -> Result<Outcome, PassError> {
    let _one = ctx.rollouts.lock.lock().await;
    let Some(mut r) = ctx.store.rollout(name.to_owned()).await? else {
        return Ok(Outcome { active: false, wake: None });
    };
    if !wants_passes(&r) {
        return Ok(Outcome { active: false, wake: None });
    }
    let cluster = r.spec.as_ref().map(|s| s.cluster.clone()).unwrap_or_default();
    let nodes = ctx.store.list_nodes(vec![cluster.clone()], false).await?;
    let statuses = ctx.store.component_statuses(vec![cluster.clone()], None).await?;
    let open = ctx.store.open_fault_types(vec![cluster.clone()], None).await?;
    let rows = ctx.store.desired_components(cluster.clone()).await?;
    let facts = Facts {
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        statuses: statuses.into_iter().map(|(_, n, s)| (n, s)).collect(),
        open: open.into_iter().map(|((_, n), t)| (n, t)).collect(),
        desired: Desired::new(&rows),
    };
    let mut p = Pass { ctx, facts, now: SystemTime::now(), events: Vec::new(), desired: Vec::new(), dirty: false };
    let wake = p.drive(&mut r).await?;
    let release: Vec<(String, bool)> = r
        .nodes
        .iter_mut()
        .filter(|n| n.phase() != NodePhase::Changing && !n.permit_id.is_empty())
        .map(|n| {
            p.dirty = true;
            (std::mem::take(&mut n.permit_id), n.phase() == NodePhase::Changed)
        })
        .collect();
    let commanded: Vec<String> =
        p.desired.iter().filter_map(|(t, _)| t.strip_prefix("node:").map(str::to_owned)).collect();
    let completed = r.phase() == Phase::Completed && p.dirty;
    if p.dirty || !p.events.is_empty() {
        r.updated_time = Some(to_timestamp(p.now));
        let body = r.encode_to_vec();
        ctx.store.put_rollout(name.to_owned(), cluster.clone(), body, p.events, p.desired).await?;
    }
    if !release.is_empty() {
        let holder = holder(name);
        if let Err(e) = ctx.permits.release_many(&ctx.store, &release, &holder).await {
            tracing::warn!(rollout = name, error = %e, "upgrade permits not released; their leases end them");
        }
    }
    // The nodes commanded, or on completion every node of the selector, get their desired state.
    let selector = r.spec.as_ref().map(|s| s.selector.clone()).unwrap_or_default();
    let targets: Vec<(&str, &HashMap<String, String>)> = p
        .facts
        .nodes
        .values()
        .filter(|n| if completed { selector::matches(&selector, &n.labels) } else { commanded.contains(&n.name) })
        .map(|n| (n.name.as_str(), &n.labels))
        .collect();
    if !targets.is_empty() {
        push_many(ctx, &cluster, &targets).await?;
    }
    Ok(Outcome { active: wants_passes(&r), wake })
}

fn holder(name: &str) -> String {
    format!("rollout/{name}")
}

/// What a pass reads of the cluster once.
struct Facts<'a> {
    nodes: HashMap<String, Node>,
    statuses: HashMap<String, ComponentStatusReport>,
    open: HashMap<String, Vec<String>>,
    desired: Desired<'a>,
}

struct Pass<'a> {
    ctx: &'a Ctx,
    facts: Facts<'a>,
    now: SystemTime,
    events: Vec<NewEvent>,
    /// Desired components written with the rollout (target, encoded DesiredState).
    desired: Vec<(String, Vec<u8>)>,
    dirty: bool,
}

fn strategy(r: &Rollout) -> nodekeeper_proto::v1::RolloutStrategy {
    r.spec.as_ref().and_then(|s| s.strategy.clone()).unwrap_or_default()
}

fn components(r: &Rollout) -> &[ComponentSpec] {
    r.spec.as_ref().map(|s| s.components.as_slice()).unwrap_or_default()
}

fn node_event(r: &Rollout, n: &RolloutNode, kind: &str, message: String, severity: Severity) -> NewEvent {
    event(r, kind, &n.node, Some(n.wave + 1), message, severity, BY)
}

fn since(t: Option<&prost_types::Timestamp>, now: SystemTime) -> Duration {
    let ms = t.map(timestamp_to_unix_ms).unwrap_or(0);
    Duration::from_millis((to_unix_ms(now) - ms).max(0) as u64)
}

impl Pass<'_> {
    async fn drive(&mut self, r: &mut Rollout) -> Result<Option<Instant>, PassError> {
        if r.phase() == Phase::Pending {
            r.phase = Phase::Progressing as i32;
            let first = r.nodes.iter().filter(|n| n.wave == 0).count();
            let waves = strategy(r).waves.len();
            self.rollout_event(
                r,
                "RolloutStarted",
                format!("started: wave 1 of {waves}, {first} node(s)"),
                Severity::Info,
            );
        }
        self.observe(r);
        match r.phase() {
            Phase::Progressing | Phase::Waiting => {
                self.bake_faults(r);
                if self.over_budget(r) {
                    return Ok(None);
                }
                self.membership(r);
                self.advance(r).await
            }
            Phase::RollingBack => {
                self.roll_back(r);
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn rollout_event(&mut self, r: &Rollout, kind: &str, message: String, severity: Severity) {
        self.events.push(event(r, kind, "", None, message, severity, BY));
        self.dirty = true;
    }

    /// Outcomes of the nodes commanded (changing or rolling back).
    fn observe(&mut self, r: &mut Rollout) {
        let timeout = from_duration(strategy(r).node_timeout.as_ref()).unwrap_or(DEFAULT_NODE_TIMEOUT);
        let wanted: Vec<ComponentSpec> = components(r).to_vec();
        let mut events = Vec::new();
        for i in 0..r.nodes.len() {
            let n = &r.nodes[i];
            let phase = n.phase();
            if !matches!(phase, NodePhase::Changing | NodePhase::RollingBack) {
                continue;
            }
            let back = phase == NodePhase::RollingBack;
            let verdict = if !self.facts.nodes.contains_key(&n.node) {
                Some(Err("the node left the fleet (decommissioned)".to_owned()))
            } else {
                let generation = self.facts.desired.own(&n.node).map(|(g, _)| g).unwrap_or(0);
                let report = self.facts.statuses.get(&n.node).filter(|s| s.generation >= generation);
                report.and_then(|s| outcome(s, &wanted, back)).or_else(|| {
                    (since(n.started_time.as_ref(), self.now) > timeout)
                        .then(|| Err(format!("did not converge within {}", humantime::format_duration(timeout))))
                })
            };
            let n = &mut r.nodes[i];
            match verdict {
                None => continue,
                Some(Ok(())) => {
                    n.phase = if back { NodePhase::RolledBack } else { NodePhase::Changed } as i32;
                    let (kind, what) =
                        if back { ("RolloutNodeRolledBack", "rolled back") } else { ("RolloutNodeChanged", "changed") };
                    let took = humantime::format_duration(Duration::from_secs(
                        since(n.started_time.as_ref(), self.now).as_secs(),
                    ));
                    let msg = format!("{} {what} in {took}", n.node);
                    events.push((i, kind, msg, Severity::Info));
                }
                Some(Err(why)) => {
                    n.phase = NodePhase::Failed as i32;
                    n.reason = if back { format!("rollback failed: {why}") } else { why };
                    let msg = format!("{} failed: {}", n.node, n.reason);
                    events.push((i, "RolloutNodeFailed", msg, Severity::Warning));
                }
            }
        }
        for (i, kind, msg, severity) in events {
            self.events.push(node_event(r, &r.nodes[i], kind, msg, severity));
            self.dirty = true;
        }
    }

    /// A node of the wave in progress that changed and then has a fault open while the wave
    /// bakes failed.
    fn bake_faults(&mut self, r: &mut Rollout) {
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
    fn over_budget(&mut self, r: &mut Rollout) -> bool {
        let s = strategy(r);
        let counted = r.nodes.iter().filter(|n| n.phase() != NodePhase::Skipped).count() as u64;
        let budget = Size::parse(if s.failure_budget.is_empty() { "0" } else { &s.failure_budget })
            .map(|b| b.of(counted))
            .unwrap_or(0);
        let failed: Vec<&RolloutNode> = r.nodes.iter().filter(|n| n.phase() == NodePhase::Failed).collect();
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

    /// Nodes that joined the selector go into the last wave; waiting ones that left are skipped.
    fn membership(&mut self, r: &mut Rollout) {
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
    async fn advance(&mut self, r: &mut Rollout) -> Result<Option<Instant>, PassError> {
        let s = strategy(r);
        // Guards and business gates, every pass: a bake goes on under them, but no wave starts.
        let cluster = r.spec.as_ref().map(|s| s.cluster.clone()).unwrap_or_default();
        if let Some(why) = self.ctx.permits.held_back(&self.ctx.store, &cluster, Operation::Upgrade).await? {
            self.wait(r, why);
            return Ok(None);
        }
        loop {
            let wave = r.wave;
            let waiting = r.nodes.iter().any(|n| n.wave == wave && n.phase() == NodePhase::Waiting);
            let changing = r.nodes.iter().any(|n| n.wave == wave && n.phase() == NodePhase::Changing);
            if waiting || changing {
                break;
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
            if wave as usize + 1 >= s.waves.len() {
                self.complete(r);
                return Ok(None);
            }
            r.wave += 1;
            r.bake_until = None;
            let count = r.nodes.iter().filter(|n| n.wave == r.wave).count();
            let msg = format!("wave {} of {} started: {count} node(s)", r.wave + 1, s.waves.len());
            self.rollout_event(r, "RolloutWaveStarted", msg, Severity::Info);
        }
        self.start_nodes(r, &s).await?;
        Ok(None)
    }

    /// Starts waiting nodes of the wave in progress, up to `max_parallel` changing at once.
    async fn start_nodes(
        &mut self,
        r: &mut Rollout,
        s: &nodekeeper_proto::v1::RolloutStrategy,
    ) -> Result<(), PassError> {
        let spec = r.spec.clone().unwrap_or_default();
        let changing = r.nodes.iter().filter(|n| n.phase() == NodePhase::Changing).count();
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
            self.command(r, index[&p.node], p.id);
        }
        self.go_on(r);
        Ok(())
    }

    /// Nothing holds the rollout back any more: a waiting one goes on.
    fn go_on(&mut self, r: &mut Rollout) {
        if r.phase() == Phase::Waiting {
            r.phase = Phase::Progressing as i32;
            let was = std::mem::take(&mut r.reason);
            self.rollout_event(r, "RolloutContinued", format!("going on: no longer waiting ({was})"), Severity::Info);
        }
    }

    /// Permits this rollout holds that no node of it refers to (granted before a crash of the
    /// center and never recorded): released, so the nodes can ask again at once.
    async fn forget_stale_permits(&mut self, r: &Rollout) -> Result<(), PassError> {
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
    fn command(&mut self, r: &mut Rollout, i: usize, permit_id: String) {
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
    fn wait(&mut self, r: &mut Rollout, why: String) {
        if r.phase() == Phase::Waiting && r.reason == why {
            return;
        }
        r.phase = Phase::Waiting as i32;
        r.reason = why.clone();
        self.rollout_event(r, "RolloutWaiting", format!("waiting: {why}"), Severity::Info);
    }

    /// The last wave baked: the rollout's versions become the selector's desired state, and the
    /// nodes' own rows lose the rollout's components (a failed node keeps what it ran before).
    fn complete(&mut self, r: &mut Rollout) {
        let spec = r.spec.clone().unwrap_or_default();
        let Ok(target) = selector::target(&spec.selector) else { return };
        let current: Vec<ComponentSpec> =
            self.facts.desired.selector_row(&target).map(<[_]>::to_vec).unwrap_or_default();
        let specs = overlay(&current, &spec.components);
        self.desired.push((target, DesiredState { generation: 0, components: specs }.encode_to_vec()));
        for n in &r.nodes {
            if n.started_time.is_none() || !matches!(n.phase(), NodePhase::Changed | NodePhase::Failed) {
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

    /// Commands changed nodes back to their previous own rows, `max_parallel` at a time, the last
    /// wave first; rolled back when none is left.
    fn roll_back(&mut self, r: &mut Rollout) {
        let s = strategy(r);
        let rolling = r.nodes.iter().filter(|n| n.phase() == NodePhase::RollingBack).count();
        let slots = (s.max_parallel.max(1) as usize).saturating_sub(rolling);
        let mut todo: Vec<usize> = (0..r.nodes.len())
            .filter(|&i| {
                let n = &r.nodes[i];
                n.started_time.is_some()
                    && !n.rollback_started
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

fn phase_label(p: NodePhase) -> String {
    p.as_str_name().trim_start_matches("ROLLOUT_NODE_PHASE_").to_ascii_lowercase().replace('_', " ")
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

    fn spec(name: &str, version: &str) -> ComponentSpec {
        ComponentSpec { name: name.into(), package: name.into(), version: version.into(), ..Default::default() }
    }

    fn status(name: &str, desired: &str, installed: &str, phase: ComponentPhase, error: &str) -> ComponentStatus {
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
    fn a_node_changed_when_every_component_converged_at_the_rollouts_version() {
        let wanted = [spec("kubelet", "2.0-1")];
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

    #[test]
    fn overlay_replaces_by_name() {
        let got = overlay(&[spec("kubelet", "1"), spec("containerd", "1")], &[spec("kubelet", "2")]);
        let names: Vec<(String, String)> = got.into_iter().map(|c| (c.name, c.version)).collect();
        assert_eq!(names, [("containerd".into(), "1".into()), ("kubelet".into(), "2".into())]);
    }
}

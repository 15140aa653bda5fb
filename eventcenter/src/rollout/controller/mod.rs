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
//! The steps live beside this file: `outcomes.rs` (what became of the nodes in flight, the failure
//! budget, the rollback) and `waves.rs` (membership, waves and bakes, starting nodes, completion).
//!
//! A node is changed by giving it an own desired-components row (its previous own row with the
//! rollout's components on top); a rollback writes its previous own row back. The rollback takes
//! no permit (it is the way back to what ran before) and goes `max_parallel` nodes at a time,
//! the last wave first.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::{timestamp_to_unix_ms, to_timestamp, to_unix_ms};
use nodekeeper_proto::v1::{
    ComponentSpec, ComponentStatusReport, Node, Rollout, RolloutNode, RolloutNodePhase as NodePhase,
    RolloutPhase as Phase, Severity,
};
use prost::Message;

mod outcomes;
mod waves;

use super::event;
use crate::api::Ctx;
use crate::api::components::{Desired, push_many};
use crate::selector;
use crate::store::NewEvent;

/// Between passes when nothing wakes the controller sooner.
pub const PASS: Duration = Duration::from_secs(1);
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(600);
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
        || r.nodes.iter().any(|n| in_flight(n.phase()) || n.phase() == NodePhase::RollingBack)
}

/// A node between its permit and its outcome.
fn in_flight(p: NodePhase) -> bool {
    matches!(p, NodePhase::Draining | NodePhase::Changing | NodePhase::Uncordoning)
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
        .filter(|n| !matches!(n.phase(), NodePhase::Draining | NodePhase::Changing) && !n.permit_id.is_empty())
        .map(|n| {
            p.dirty = true;
            let changed = n.phase() == NodePhase::Changed
                || (n.phase() == NodePhase::Uncordoning && n.then() == NodePhase::Changed);
            (std::mem::take(&mut n.permit_id), changed)
        })
        .collect();
    let commanded: HashSet<String> =
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
                self.command_drained(r);
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
            Phase::Paused => Ok(None),
            _ => {
                // Halted, aborted: nodes waiting to be drained are given back.
                self.abandon_draining(r, "the rollout stopped");
                Ok(None)
            }
        }
    }

    /// Nodes drained since the last pass are changed now (their permit was taken before).
    fn command_drained(&mut self, r: &mut Rollout) {
        let drained: Vec<usize> =
            (0..r.nodes.len()).filter(|&i| r.nodes[i].phase() == NodePhase::Draining && r.nodes[i].drained).collect();
        for i in drained {
            let permit = std::mem::take(&mut r.nodes[i].permit_id);
            self.command(r, i, permit);
        }
    }

    /// Nodes waiting to be drained are uncordoned instead, then skipped.
    fn abandon_draining(&mut self, r: &mut Rollout, why: &str) {
        for i in 0..r.nodes.len() {
            if r.nodes[i].phase() == NodePhase::Draining {
                let n = &mut r.nodes[i];
                n.reason = why.to_owned();
                self.finish(r, i, NodePhase::Skipped, true);
            }
        }
    }

    /// Node `i` takes phase `then`, through uncordoning first when it was cordoned for the
    /// rollout (`drain`: the rollout drains nodes).
    fn finish(&mut self, r: &mut Rollout, i: usize, then: NodePhase, drain: bool) {
        let n = &mut r.nodes[i];
        if drain && matches!(n.phase(), NodePhase::Draining | NodePhase::Changing) {
            n.phase = NodePhase::Uncordoning as i32;
            n.then = then as i32;
            n.started_time = Some(to_timestamp(self.now));
            let msg = format!("{}: uncordon requested", n.node);
            self.events.push(node_event(r, &r.nodes[i], "RolloutNodeUncordoning", msg, Severity::Info));
        } else {
            n.phase = then as i32;
        }
        self.dirty = true;
    }

    fn rollout_event(&mut self, r: &Rollout, kind: &str, message: String, severity: Severity) {
        self.events.push(event(r, kind, "", None, message, severity, BY));
        self.dirty = true;
    }
}

//! Rollouts: each one's phase, waves and nodes by phase, the reason it waits, its timeline (gate
//! decisions included), and pause, resume and abort (through a confirmation).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use maud::html;
use nodekeeper_proto::v1::{
    GetRolloutRequest, ListRolloutsRequest, RolloutNodePhase, RolloutPhase,
    rollout_service_client::RolloutServiceClient,
};

use crate::layout;
use crate::{Fragment, Page, Shared};

fn phase(p: RolloutPhase) -> String {
    layout::name(p.as_str_name(), "ROLLOUT_PHASE_")
}

pub async fn list(State(app): State<Shared>, Query(f): Query<Fragment>) -> Page {
    let rollouts = RolloutServiceClient::new(app.ch.clone())
        .max_decoding_message_size(256 << 20)
        .list_rollouts(ListRolloutsRequest::default())
        .await?
        .into_inner()
        .rollouts;
    let body = html! {
        @if rollouts.is_empty() { p { "No rollout yet (" code { "nodekeeper rollouts create" } ")." } } @else {
            table {
                caption { "Rollouts" }
                thead { tr { th scope="col" { "name" } th scope="col" { "cluster" } th scope="col" { "phase" } th scope="col" { "wave" } th scope="col" { "nodes changed" } th scope="col" { "why" } } }
                tbody {
                    @for r in &rollouts {
                        @let spec = r.spec.clone().unwrap_or_default();
                        @let changed = r.nodes.iter().filter(|n| n.phase() == RolloutNodePhase::Changed).count();
                        tr {
                            td { a href=(format!("/rollouts/{}", spec.name)) { (spec.name) } }
                            td { (spec.cluster) }
                            td { (phase(r.phase())) }
                            td { (r.wave + 1) " of " (spec.strategy.as_ref().map_or(0, |s| s.waves.len())) }
                            td { (changed) " of " (r.nodes.len()) }
                            td { (r.reason) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::respond(f.only_main(), "Rollouts", "all=1", body))
}

pub async fn show(State(app): State<Shared>, Path(name): Path<String>, Query(f): Query<Fragment>) -> Page {
    let r = RolloutServiceClient::new(app.ch.clone())
        .max_decoding_message_size(256 << 20)
        .get_rollout(GetRolloutRequest { name: name.clone() })
        .await?
        .into_inner();
    let rollout = r.rollout.unwrap_or_default();
    let spec = rollout.spec.clone().unwrap_or_default();
    let strategy = spec.strategy.clone().unwrap_or_default();
    // wave → node phase → count
    let mut waves: BTreeMap<u32, BTreeMap<String, usize>> = BTreeMap::new();
    for n in &rollout.nodes {
        *waves
            .entry(n.wave)
            .or_default()
            .entry(layout::name(n.phase().as_str_name(), "ROLLOUT_NODE_PHASE_"))
            .or_default() += 1;
    }
    let p = rollout.phase();
    let over = matches!(p, RolloutPhase::Completed | RolloutPhase::RolledBack | RolloutPhase::Aborted);
    let body = html! {
        dl class="fields" {
            dt { "cluster" } dd { (spec.cluster) }
            dt { "selector" } dd { (spec.selector) }
            dt { "phase" } dd { (phase(p)) @if !rollout.reason.is_empty() { ": " (rollout.reason) } }
            dt { "components" } dd { (spec.components.iter().map(|c| format!("{} {}", c.name, c.version)).collect::<Vec<_>>().join(", ")) }
            dt { "created by" } dd { (rollout.created_by) " at " (layout::time(rollout.created_time.as_ref())) }
            @if rollout.bake_until.is_some() { dt { "baking until" } dd { (layout::time(rollout.bake_until.as_ref())) } }
        }
        @if !over {
            p class="actions" {
                @if p == RolloutPhase::Paused {
                    a class="button" href=(format!("/confirm?action=resume&rollout={name}")) { "Resume…" }
                } @else {
                    a class="button" href=(format!("/confirm?action=pause&rollout={name}")) { "Pause…" }
                }
                " "
                a class="button danger" href=(format!("/confirm?action=abort&rollout={name}")) { "Abort…" }
            }
        }
        h2 { "Waves" }
        table {
            caption { "Nodes of each wave by phase" }
            thead { tr { th scope="col" { "wave" } th scope="col" { "size" } th scope="col" { "nodes by phase" } } }
            tbody {
                @for (i, size) in strategy.waves.iter().enumerate() {
                    tr class=[(i as u32 == rollout.wave && !over).then_some("current")] {
                        td { (i + 1) }
                        td { (size) }
                        td { (waves.get(&(i as u32)).map(|m| m.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")).unwrap_or_default()) }
                    }
                }
            }
        }
        h2 { "Timeline" }
        (layout::timeline(&r.events, true, false))
    };
    let live = format!("cluster={}", spec.cluster);
    Ok(layout::respond(f.only_main(), &format!("Rollout {name}"), &live, body))
}

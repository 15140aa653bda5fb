//! The fleet overview: per cluster, its nodes by state, open faults by type and severity, its
//! guards, rollouts in progress, and every node as a cell of a dense map coloured by health.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::extract::{Query, State};
use maud::{Markup, html};
use nodekeeper_proto::v1::{
    GetGuardStateRequest, ListFaultsRequest, ListNodesRequest, ListRolloutsRequest, Liveness, Node, RolloutPhase,
    fleet_service_client::FleetServiceClient, permit_service_client::PermitServiceClient,
    rollout_service_client::RolloutServiceClient,
};

use crate::layout::{self, UNRESOLVED};
use crate::{Fragment, Page, Shared};

/// A node's health as the map shows it, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    Lost,
    Isolated,
    Fault,
    Onboarding,
    Healthy,
}

impl Health {
    pub fn of(n: &Node, faulty: bool) -> Health {
        if n.liveness() == Liveness::Lost {
            Health::Lost
        } else if n.kubernetes_labels.get("nodekeeper.io/isolated").is_some_and(|v| v == "true") {
            Health::Isolated
        } else if faulty {
            Health::Fault
        } else if n.onboarding {
            Health::Onboarding
        } else {
            Health::Healthy
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Health::Lost => "lost",
            Health::Isolated => "isolated",
            Health::Fault => "fault",
            Health::Onboarding => "onboarding",
            Health::Healthy => "healthy",
        }
    }
}

#[derive(Default)]
struct Cluster<'a> {
    nodes: Vec<(&'a Node, Health)>,
    /// (type, severity) → open faults.
    faults: BTreeMap<(String, String), u32>,
    frozen: bool,
    breaker: Option<String>,
    rollouts: Vec<(String, String)>,
}

pub async fn page(State(app): State<Shared>, Query(f): Query<Fragment>) -> Page {
    let mut fleet = FleetServiceClient::new(app.ch.clone()).max_decoding_message_size(256 << 20);
    let nodes = fleet.list_nodes(ListNodesRequest::default()).await?.into_inner().nodes;
    let faults = fleet
        .list_faults(ListFaultsRequest {
            states: UNRESOLVED.iter().map(|s| *s as i32).collect(),
            limit: 10_000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .faults;
    let guards =
        PermitServiceClient::new(app.ch.clone()).get_guard_state(GetGuardStateRequest::default()).await?.into_inner();
    let rollouts = RolloutServiceClient::new(app.ch.clone())
        .max_decoding_message_size(256 << 20)
        .list_rollouts(ListRolloutsRequest::default())
        .await?
        .into_inner()
        .rollouts;

    let faulty: HashSet<(&str, &str)> = faults.iter().map(|f| (f.cluster.as_str(), f.node.as_str())).collect();
    let mut clusters: BTreeMap<&str, Cluster<'_>> = BTreeMap::new();
    for n in &nodes {
        let h = Health::of(n, faulty.contains(&(n.cluster.as_str(), n.name.as_str())));
        clusters.entry(&n.cluster).or_default().nodes.push((n, h));
    }
    for f in &faults {
        let c = clusters.entry(&f.cluster).or_default();
        *c.faults.entry((f.r#type.clone(), layout::severity(f.severity))).or_default() += 1;
    }
    for g in &guards.clusters {
        let c = clusters.entry(&g.cluster).or_default();
        c.frozen = g.frozen;
        c.breaker = g.breaker_tripped.then(|| g.reason.clone());
    }
    for r in &rollouts {
        let Some(spec) = &r.spec else { continue };
        if !matches!(r.phase(), RolloutPhase::Completed | RolloutPhase::RolledBack | RolloutPhase::Aborted) {
            let phase = layout::name(r.phase().as_str_name(), "ROLLOUT_PHASE_");
            clusters.entry(&spec.cluster).or_default().rollouts.push((spec.name.clone(), phase));
        }
    }
    let body = html! {
        @if guards.global_frozen {
            p class="banner" role="alert" { "Every cluster is frozen: no permit for disruptive operations is granted. " a href="/guards" { "Guards" } }
        }
        @if clusters.is_empty() {
            p { "No node has registered yet." }
        }
        @for (name, c) in &clusters {
            (cluster(name, c))
        }
    };
    Ok(layout::respond(f.only_main(), "Fleet", "all=1", body))
}

fn cluster(name: &str, c: &Cluster<'_>) -> Markup {
    let mut counts: HashMap<Health, usize> = HashMap::new();
    for (_, h) in &c.nodes {
        *counts.entry(*h).or_default() += 1;
    }
    let count = |h: Health| counts.get(&h).copied().unwrap_or(0);
    let alive = c.nodes.len() - count(Health::Lost);
    let id = format!("cluster-{name}");
    html! {
        section aria-labelledby=(id) {
            h2 id=(id) { "Cluster " (name) }
            dl class="counts" {
                div { dt { "nodes" } dd data-count="nodes" { (c.nodes.len()) } }
                div { dt { "alive" } dd data-count="alive" { (alive) } }
                div { dt { "lost" } dd data-count="lost" { (count(Health::Lost)) } }
                div { dt { "isolated" } dd data-count="isolated" { (count(Health::Isolated)) } }
                div { dt { "with an open fault" } dd data-count="fault" { (count(Health::Fault)) } }
                div { dt { "waiting on onboarding gates" } dd data-count="onboarding" { (count(Health::Onboarding)) } }
            }
            p class="guards" {
                @if c.frozen { strong { "Frozen." } " " }
                @if let Some(why) = &c.breaker { strong { "Breaker tripped: " } (why) " " }
                @if !c.frozen && c.breaker.is_none() { "Permits: granted as the policies allow. " }
                a href="/guards" { "Guards" }
            }
            @if !c.rollouts.is_empty() {
                p { "Rollouts in progress: "
                    @for (i, (r, phase)) in c.rollouts.iter().enumerate() {
                        @if i > 0 { ", " }
                        a href=(format!("/rollouts/{r}")) { (r) } " (" (phase) ")"
                    }
                }
            }
            @if c.faults.is_empty() {
                p { "No open fault." }
            } @else {
                table {
                    caption { "Open faults by type and severity" }
                    thead { tr { th scope="col" { "type" } th scope="col" { "severity" } th scope="col" { "open" } } }
                    tbody {
                        @for ((t, sev), n) in &c.faults {
                            tr {
                                td { a href=(format!("/faults?cluster={name}&type={t}")) { (t) } }
                                td { (sev) }
                                td { (n) }
                            }
                        }
                    }
                }
            }
            h3 { "Nodes" }
            p class="legend" {
                @for h in [Health::Healthy, Health::Onboarding, Health::Fault, Health::Isolated, Health::Lost] {
                    span class=(format!("key {}", h.word())) {} " " (h.word()) " "
                }
            }
            // One link per node, worst first; the title names the node and its state.
            div class="map" {
                @for (n, h) in sorted(&c.nodes) {
                    a class=(h.word()) href=(layout::node_href(name, &n.name)) title=(format!("{} {}", n.name, h.word())) {}
                }
            }
        }
    }
}

fn sorted<'a>(nodes: &'a [(&'a Node, Health)]) -> Vec<(&'a Node, Health)> {
    let mut v = nodes.to_vec();
    v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.name.cmp(&b.0.name)));
    v
}

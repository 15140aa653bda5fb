//! The guards of risky operations: freezes and breakers per cluster and why, each cluster's permit
//! policies with their use and business gates with their verdicts, permits in flight, and freeze,
//! unfreeze and breaker reset (through a confirmation).

use axum::extract::{Query, State};
use maud::html;
use nodekeeper_proto::v1::{
    GetGuardStateRequest, ListPermitsRequest, Operation, permit_service_client::PermitServiceClient,
};

use crate::layout;
use crate::{Fragment, Page, Shared};

pub async fn page(State(app): State<Shared>, Query(f): Query<Fragment>) -> Page {
    let mut permits = PermitServiceClient::new(app.ch.clone());
    let guards = permits.get_guard_state(GetGuardStateRequest { include_limits: true }).await?.into_inner();
    let held = permits.list_permits(ListPermitsRequest::default()).await?.into_inner().permits;
    let body = html! {
        p { "Every cluster: "
            @if guards.global_frozen {
                strong { "frozen" } " " a class="button" href="/confirm?action=unfreeze" { "Unfreeze every cluster…" }
            } @else {
                "not frozen " a class="button" href="/confirm?action=freeze" { "Freeze every cluster…" }
            }
        }
        @if guards.clusters.is_empty() { p { "No cluster has been frozen or had its breaker trip." } } @else {
            table {
                caption { "Clusters" }
                thead { tr { th scope="col" { "cluster" } th scope="col" { "freeze" } th scope="col" { "breaker" } th scope="col" { "why, since" } th scope="col" { "actions" } } }
                tbody {
                    @for g in &guards.clusters {
                        tr {
                            td { (g.cluster) }
                            td { (if g.frozen { "frozen" } else { "—" }) }
                            td { (if g.breaker_tripped { "tripped" } else { "closed" }) }
                            td { (g.reason) " " (layout::time(g.since_time.as_ref())) }
                            td {
                                @if g.frozen {
                                    a href=(format!("/confirm?action=unfreeze&cluster={}", g.cluster)) { "Unfreeze " (g.cluster) "…" }
                                } @else {
                                    a href=(format!("/confirm?action=freeze&cluster={}", g.cluster)) { "Freeze " (g.cluster) "…" }
                                }
                                @if g.breaker_tripped {
                                    " " a href=(format!("/confirm?action=reset-breaker&cluster={}", g.cluster)) { "Reset the breaker of " (g.cluster) "…" }
                                }
                            }
                        }
                    }
                }
            }
        }
        p { "The breaker of a cluster trips when faults open on more than "
            (format!("{:.0}%", guards.breaker_fault_share * 100.0)) " of its nodes within "
            (layout::duration(guards.breaker_window.as_ref())) "; then only releases are granted until a person resets it." }
        @for l in &guards.limits {
            h2 id=(format!("limits-{}", l.cluster)) { "Limits of cluster " (l.cluster) " (" (l.nodes) (if l.nodes == 1 { " node)" } else { " nodes)" }) }
            @if l.policies.is_empty() { p { "No permit policy applies." } } @else {
                table data-limits=(l.cluster) {
                    caption { "Permit policies of " (l.cluster) " and their use now" }
                    thead { tr { th scope="col" { "operation" } th scope="col" { "policy" } th scope="col" { "in flight" } th scope="col" { "granted in window" } th scope="col" { "max share" } th scope="col" { "one more now" } } }
                    tbody {
                        @for p in &l.policies {
                            tr class=(if p.denies.is_empty() { "" } else { "denies" }) {
                                td { (layout::name(p.operation().as_str_name(), "OPERATION_")) }
                                td { (if p.policy_cluster == "*" { "every cluster" } else { "this cluster" }) }
                                td { (p.in_flight) " / " (limit(p.max_in_flight)) }
                                td { (p.granted_in_window) " / " (limit(p.max_per_window)) " in " (layout::duration(p.window.as_ref())) }
                                td { @if let Some(s) = p.max_share { (format!("{:.0}%", s * 100.0)) } @else { "—" } }
                                td { @if p.denies.is_empty() { "granted" } @else { strong { "denied: " } (p.denies) } }
                            }
                        }
                    }
                }
            }
            @if l.gates.is_empty() { p { "No business gate applies." } } @else {
                ul class="gates" {
                    @for g in &l.gates {
                        li class=(if g.denies { "fails" } else { "holds" }) {
                            "Business gate " (g.gate) ": " strong { (g.state) }
                            @if !g.reason.is_empty() { " — " (g.reason) }
                            @if g.denies { " (denies disruptive operations)" }
                        }
                    }
                }
            }
        }
        h2 { "Permits in flight" }
        @if held.is_empty() { p { "None." } } @else {
            table {
                caption { "Permits held now" }
                thead { tr { th scope="col" { "operation" } th scope="col" { "cluster" } th scope="col" { "node" } th scope="col" { "holder" } th scope="col" { "granted" } th scope="col" { "lease until" } } }
                tbody {
                    @for p in &held {
                        tr {
                            td { (layout::name(Operation::try_from(p.operation).unwrap_or_default().as_str_name(), "OPERATION_")) }
                            td { (p.cluster) }
                            td { a href=(layout::node_href(&p.cluster, &p.node)) { (p.node) } }
                            td { (p.holder) }
                            td { (layout::time(p.granted_time.as_ref())) }
                            td { (layout::time(p.lease_expiry_time.as_ref())) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::respond(f.only_main(), "Guards", "all=1", body))
}

fn limit(max: Option<u32>) -> String {
    max.map_or_else(|| "no limit".to_owned(), |m| m.to_string())
}

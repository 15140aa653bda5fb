//! The guards of risky operations: freezes and breakers per cluster and why, permits in flight,
//! and freeze, unfreeze and breaker reset (through a confirmation).

use axum::extract::{Query, State};
use maud::html;
use nodekeeper_proto::v1::{
    GetGuardStateRequest, ListPermitsRequest, Operation, permit_service_client::PermitServiceClient,
};

use crate::layout;
use crate::{Fragment, Page, Shared};

pub async fn page(State(app): State<Shared>, Query(f): Query<Fragment>) -> Page {
    let mut permits = PermitServiceClient::new(app.ch.clone());
    let guards = permits.get_guard_state(GetGuardStateRequest {}).await?.into_inner();
    let held = permits.list_permits(ListPermitsRequest::default()).await?.into_inner().permits;
    let body = html! {
        p { "Every cluster: "
            @if guards.global_frozen {
                strong { "frozen" } " " a class="button" href="/confirm?action=unfreeze" { "Unfreeze every cluster…" }
            } @else {
                "not frozen " a class="button" href="/confirm?action=freeze" { "Freeze every cluster…" }
            }
        }
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

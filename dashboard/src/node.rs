//! One node: liveness, readiness gates, its faults (each a link to its timeline), its recent
//! events, conditions, components desired against installed, and inventory.

use axum::extract::{Path, Query, State};
use maud::html;
use nodekeeper_proto::v1::{
    ComponentPhase, ConditionStatus, EventFilter, GetNodeRequest, ListComponentsRequest, ListEventsRequest,
    ListFaultsRequest, event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient,
};

use crate::layout;
use crate::{Fragment, Page, Shared};

/// How many of the node's newest events the page shows.
const RECENT: u32 = 30;

pub async fn page(
    State(app): State<Shared>,
    Path((cluster, node)): Path<(String, String)>,
    Query(f): Query<Fragment>,
) -> Page {
    let mut fleet = FleetServiceClient::new(app.ch.clone());
    let n = fleet.get_node(GetNodeRequest { cluster: cluster.clone(), node: node.clone() }).await?.into_inner();
    let components = fleet
        .list_components(ListComponentsRequest { clusters: vec![cluster.clone()], nodes: vec![node.clone()] })
        .await?
        .into_inner()
        .nodes
        .into_iter()
        .next();
    let faults = fleet
        .list_faults(ListFaultsRequest {
            clusters: vec![cluster.clone()],
            nodes: vec![node.clone()],
            limit: 50,
            ..Default::default()
        })
        .await?
        .into_inner()
        .faults;
    let recent = EventServiceClient::new(app.ch.clone())
        .list_events(ListEventsRequest {
            filter: Some(EventFilter {
                clusters: vec![cluster.clone()],
                nodes: vec![node.clone()],
                ..Default::default()
            }),
            limit: RECENT,
            newest_first: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let liveness = layout::name(n.liveness().as_str_name(), "LIVENESS_");
    let inv = n.inventory.clone().unwrap_or_default();
    let body = html! {
        p { a href="/" { "Fleet" } " › cluster " (cluster) }
        h2 { "State" }
        dl class="fields" {
            dt { "liveness" } dd { (liveness) @if n.connected { " (agent connected)" } }
            dt { "last heartbeat" } dd { (layout::time(n.last_heartbeat_time.as_ref())) }
            dt { "boot id" } dd { (n.boot_id) }
            dt { "agent version" } dd { (n.agent_version) }
            dt { "registered" } dd { (layout::time(n.registered_time.as_ref())) }
            @if n.onboarding { dt { "onboarding" } dd { "waiting for its readiness gates (startup taint)" } }
            @if n.decommissioned_time.is_some() { dt { "decommissioned" } dd { (layout::time(n.decommissioned_time.as_ref())) } }
        }
        h2 { "Readiness gates" }
        @if n.gates.is_empty() { p { "None reported." } } @else {
            ul class="gates" {
                @for g in &n.gates {
                    li class=(if g.holds { "holds" } else { "fails" }) {
                        (g.name) ": " @if g.holds { "holds" } @else { "does not hold: " (g.reason) }
                    }
                }
            }
        }
        h2 { "Faults" }
        @if faults.is_empty() { p { "None." } } @else {
            table {
                caption { "The node's faults, newest first" }
                thead { tr { th scope="col" { "id" } th scope="col" { "type" } th scope="col" { "state" } th scope="col" { "severity" } th scope="col" { "last seen" } th scope="col" { "message" } } }
                tbody {
                    @for fault in &faults {
                        tr {
                            td { a href=(format!("/faults/{}", fault.id)) { "fault " (fault.id) } }
                            td { (fault.r#type) }
                            td { (layout::fault_state(fault.state)) }
                            td { (layout::severity(fault.severity)) }
                            td { (layout::time(fault.last_seen_time.as_ref())) }
                            td { (fault.message) }
                        }
                    }
                }
            }
        }
        h2 { "Recent events" }
        @if recent.is_empty() { p { "None." } } @else {
            p { "The newest " (recent.len()) " of the node's events, newest first." }
            (layout::timeline(&recent, false, true))
        }
        h2 { "Conditions" }
        @if n.conditions.is_empty() { p { "None." } } @else {
            table {
                caption { "Conditions the agent and other producers report" }
                thead { tr { th scope="col" { "type" } th scope="col" { "status" } th scope="col" { "reason" } th scope="col" { "message" } th scope="col" { "by" } th scope="col" { "updated" } } }
                tbody {
                    @for c in &n.conditions {
                        @let cond = c.condition.clone().unwrap_or_default();
                        tr {
                            td { (cond.r#type) }
                            td { (layout::name(ConditionStatus::try_from(cond.status).unwrap_or_default().as_str_name(), "CONDITION_STATUS_")) }
                            td { (cond.reason) }
                            td { (cond.message) }
                            td { (c.producer) }
                            td { (layout::time(c.updated_time.as_ref())) }
                        }
                    }
                }
            }
        }
        h2 { "Components" }
        @match &components {
            Some(nc) if !nc.components.is_empty() => {
                p { "Desired generation " (nc.desired_generation) ", last reported " (nc.reported_generation) ": "
                    (if nc.converged { "converged" } else { "not converged" }) "." }
                table {
                    caption { "Desired against installed" }
                    thead { tr { th scope="col" { "component" } th scope="col" { "desired" } th scope="col" { "installed" } th scope="col" { "phase" } th scope="col" { "last error" } } }
                    tbody {
                        @for c in &nc.components {
                            tr {
                                td { (c.name) }
                                td { (c.desired_version) }
                                td { (c.installed_version) }
                                td { (layout::name(ComponentPhase::try_from(c.phase).unwrap_or_default().as_str_name(), "COMPONENT_PHASE_")) }
                                td { (c.last_error) }
                            }
                        }
                    }
                }
            }
            _ => p { "No desired components." },
        }
        h2 { "Inventory" }
        dl class="fields" {
            dt { "hostname" } dd { (inv.hostname) }
            dt { "operating system" } dd { (inv.os_name) " " (inv.os_version) }
            dt { "kernel" } dd { (inv.kernel_version) }
            dt { "CPU" } dd { (inv.cpu_count) " × " (inv.cpu_model) }
            dt { "memory" } dd { (inv.memory_bytes / (1 << 20)) " MiB" }
            dt { "iSCSI initiator" } dd { (inv.iscsi_initiator_name) }
            dt { "addresses" } dd { (inv.interfaces.iter().flat_map(|i| i.addresses.iter().map(move |a| format!("{} {a}", i.name))).collect::<Vec<_>>().join(", ")) }
            dt { "labels" } dd { (n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")) }
        }
    };
    let live = format!("cluster={cluster}&node={node}");
    Ok(layout::respond(f.only_main(), &format!("Node {node}"), &live, body))
}

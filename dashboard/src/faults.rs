//! Faults, filtered by cluster, type, state and severity; one fault's timeline with every
//! remediation step, permit and command, as `nodekeeper faults show` has it.

use axum::extract::{Path, Query, State};
use maud::html;
use nodekeeper_proto::v1::{FaultState, GetFaultRequest, ListFaultsRequest, fleet_service_client::FleetServiceClient};

use crate::layout::{self, UNRESOLVED};
use crate::{Fragment, Page, Shared};

#[derive(serde::Deserialize, Default)]
pub struct Filter {
    #[serde(default)]
    cluster: String,
    #[serde(default, rename = "type")]
    kind: String,
    /// "unresolved" (default), "all", or one state's name.
    #[serde(default)]
    state: String,
    /// The least severity shown ("info", "warning", "error", "critical").
    #[serde(default)]
    severity: String,
    #[serde(default)]
    fragment: Option<String>,
}

const STATES: [&str; 7] = ["unresolved", "all", "open", "isolated", "recovering", "resolved", "escalated"];
const SEVERITIES: [&str; 5] = ["", "info", "warning", "error", "critical"];

pub async fn list(State(app): State<Shared>, Query(q): Query<Filter>) -> Page {
    let states: Vec<i32> = match q.state.as_str() {
        "" | "unresolved" => UNRESOLVED.iter().map(|s| *s as i32).collect(),
        "all" => vec![],
        s => {
            vec![FaultState::from_str_name(&format!("FAULT_STATE_{}", s.to_ascii_uppercase())).map_or(-1, |s| s as i32)]
        }
    };
    let faults = FleetServiceClient::new(app.ch.clone())
        .list_faults(ListFaultsRequest {
            clusters: (!q.cluster.is_empty()).then(|| q.cluster.clone()).into_iter().collect(),
            states,
            types: (!q.kind.is_empty()).then(|| q.kind.clone()).into_iter().collect(),
            limit: 500,
            ..Default::default()
        })
        .await?
        .into_inner()
        .faults;
    let least = SEVERITIES.iter().position(|s| *s == q.severity).unwrap_or(0) as i32;
    let shown: Vec<_> = faults.iter().filter(|f| least == 0 || f.severity >= least).collect();
    let state = if q.state.is_empty() { "unresolved" } else { q.state.as_str() };
    let body = html! {
        form method="get" action="/faults" class="filter" {
            label for="f-cluster" { "cluster" } input id="f-cluster" name="cluster" value=(q.cluster);
            label for="f-type" { "type" } input id="f-type" name="type" value=(q.kind);
            label for="f-state" { "state" }
            select id="f-state" name="state" {
                @for s in STATES { option value=(s) selected[s == state] { (s) } }
            }
            label for="f-severity" { "at least" }
            select id="f-severity" name="severity" {
                @for s in SEVERITIES { option value=(s) selected[s == q.severity] { (if s.is_empty() { "any severity" } else { s }) } }
            }
            button type="submit" { "Filter" }
        }
        @if shown.is_empty() { p { "No fault matches." } } @else {
            table {
                caption { (shown.len()) " faults, newest first" }
                thead { tr { th scope="col" { "id" } th scope="col" { "cluster" } th scope="col" { "node" } th scope="col" { "type" } th scope="col" { "state" } th scope="col" { "severity" } th scope="col" { "last seen" } th scope="col" { "message" } } }
                tbody {
                    @for f in &shown {
                        tr {
                            td { a href=(format!("/faults/{}", f.id)) { "fault " (f.id) } }
                            td { (f.cluster) }
                            td { a href=(layout::node_href(&f.cluster, &f.node)) { (f.node) } }
                            td { (f.r#type) }
                            td { (layout::fault_state(f.state)) }
                            td { (layout::severity(f.severity)) }
                            td { (layout::time(f.last_seen_time.as_ref())) }
                            td { (f.message) }
                        }
                    }
                }
            }
        }
    };
    let live = if q.cluster.is_empty() { "all=1".to_owned() } else { format!("cluster={}", q.cluster) };
    Ok(layout::respond(q.fragment.is_some(), "Faults", &live, body))
}

pub async fn show(State(app): State<Shared>, Path(id): Path<u64>, Query(f): Query<Fragment>) -> Page {
    let r = FleetServiceClient::new(app.ch.clone()).get_fault(GetFaultRequest { id }).await?.into_inner();
    let fault = r.fault.unwrap_or_default();
    let body = html! {
        dl class="fields" {
            dt { "node" } dd { a href=(layout::node_href(&fault.cluster, &fault.node)) { (fault.node) } " (cluster " (fault.cluster) ")" }
            dt { "type" } dd { (fault.r#type) }
            dt { "state" } dd { (layout::fault_state(fault.state)) }
            dt { "severity" } dd { (layout::severity(fault.severity)) }
            dt { "first seen" } dd { (layout::time(fault.first_seen_time.as_ref())) }
            dt { "last seen" } dd { (layout::time(fault.last_seen_time.as_ref())) }
            @if fault.resolved_time.is_some() { dt { "resolved" } dd { (layout::time(fault.resolved_time.as_ref())) " " (fault.resolution) } }
            dt { "message" } dd { (fault.message) }
        }
        h2 { "Timeline" }
        (layout::timeline(&r.events, false, false))
    };
    let live = format!("cluster={}&node={}", fault.cluster, fault.node);
    Ok(layout::respond(f.only_main(), &format!("Fault {id}"), &live, body))
}

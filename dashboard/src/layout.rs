//! The page shell (title, navigation, live status) and small helpers shared by the pages.

use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use nodekeeper_proto::v1::{Event, FaultState, Severity};

/// A whole page: `live` is the query `/live` follows for it (empty: the page is not live).
pub fn page(title: &str, live: &str, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · nodekeeper" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    nav aria-label="Sections" {
                        a href="/" { "Fleet" }
                        a href="/faults" { "Faults" }
                        a href="/rollouts" { "Rollouts" }
                        a href="/guards" { "Guards" }
                    }
                    @if !live.is_empty() {
                        p id="live-status" class="live" role="status" aria-live="polite" { "live" }
                    }
                }
                main id="main" data-live=[(!live.is_empty()).then_some(live)] {
                    h1 { (title) }
                    (main)
                }
            }
        }
    }
}

/// Markup as an HTML response.
pub fn html(m: Markup) -> Response {
    axum::response::Html(m.into_string()).into_response()
}

/// The page, or only its main part for the live refresh (the same markup `page` puts in main).
pub fn respond(only_main: bool, title: &str, live: &str, main: Markup) -> Response {
    if only_main { self::html(html! { h1 { (title) } (main) }) } else { self::html(page(title, live, main)) }
}

pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(nodekeeper_common::time::rfc3339).unwrap_or_else(|| "—".into())
}

/// An enum value's name without its prefix, lower case: `FAULT_STATE_OPEN` → "open".
pub fn name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase().replace('_', " ")
}

pub fn severity(s: i32) -> String {
    name(Severity::try_from(s).unwrap_or_default().as_str_name(), "SEVERITY_")
}

pub fn fault_state(s: i32) -> String {
    name(FaultState::try_from(s).unwrap_or_default().as_str_name(), "FAULT_STATE_")
}

/// Faults not yet over.
pub const UNRESOLVED: [FaultState; 4] =
    [FaultState::Open, FaultState::Isolated, FaultState::Recovering, FaultState::Escalated];

/// A node's page.
pub fn node_href(cluster: &str, node: &str) -> String {
    format!("/nodes/{cluster}/{node}")
}

/// A duration as people write it ("10m"), or "—".
pub fn duration(d: Option<&prost_types::Duration>) -> String {
    nodekeeper_common::time::from_duration(d).map_or_else(|| "—".into(), |d| humantime::format_duration(d).to_string())
}

/// Events as a timeline, in the order given: when, type, the remediation step, node (when asked),
/// message, producer, and the fault it belongs to (when asked).
pub fn timeline(events: &[Event], with_node: bool, with_fault: bool) -> Markup {
    html! {
        ol class="timeline" {
            @for e in events {
                @let by = e.origin.as_ref().map(|o| o.producer.as_str()).unwrap_or("");
                li {
                    time { (time(e.time.as_ref())) } " "
                    strong { (e.r#type) }
                    @if let Some(step) = e.attributes.get("step") { " " (step) }
                    @if with_node && !e.node.is_empty() { " " a href=(node_href(&e.cluster, &e.node)) { (e.node) } }
                    " — " (e.message)
                    @if !by.is_empty() { " (" (by) ")" }
                    @if with_fault && e.fault_id != 0 { " " a href=(format!("/faults/{}", e.fault_id)) { "fault " (e.fault_id) } }
                }
            }
        }
    }
}

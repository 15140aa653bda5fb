//! Actions: a confirmation page that says what will happen, then the action through the center,
//! which allows it or not for the operator's identity and records it with that identity as the
//! issuer. A post must carry this process's token and come from this origin.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use maud::html;
use nodekeeper_proto::v1::{
    ControlRolloutRequest, FreezeRequest, ResetBreakerRequest, RolloutControl, UnfreezeRequest,
    permit_service_client::PermitServiceClient, rollout_service_client::RolloutServiceClient,
};

use crate::layout;
use crate::{Error, Page, Shared};

#[derive(serde::Deserialize)]
pub struct Action {
    action: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    rollout: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    token: String,
}

impl Action {
    /// What it does, in words, and where to go back to; None for an unknown action.
    fn describe(&self) -> Option<(String, String)> {
        let scope =
            if self.cluster.is_empty() { "every cluster".to_owned() } else { format!("cluster {}", self.cluster) };
        let back_rollout = format!("/rollouts/{}", self.rollout);
        Some(match self.action.as_str() {
            "freeze" => (
                format!("Freeze {scope}: no permit for a disruptive operation is granted until it is unfrozen."),
                "/guards".into(),
            ),
            "unfreeze" => {
                (format!("Unfreeze {scope}: permits are granted again as the policies allow."), "/guards".into())
            }
            "reset-breaker" if !self.cluster.is_empty() => {
                (format!("Reset the breaker of {scope}: disruptive operations are granted again."), "/guards".into())
            }
            "pause" if !self.rollout.is_empty() => {
                (format!("Pause rollout {}: no further node starts until it is resumed.", self.rollout), back_rollout)
            }
            "resume" if !self.rollout.is_empty() => (format!("Resume rollout {}.", self.rollout), back_rollout),
            "abort" if !self.rollout.is_empty() => (
                format!(
                    "Abort rollout {}: no further node changes; nodes already changed keep their versions.",
                    self.rollout
                ),
                back_rollout,
            ),
            _ => return None,
        })
    }
}

pub async fn confirm(State(app): State<Shared>, Query(a): Query<Action>) -> Page {
    let Some((what, back)) = a.describe() else {
        return Err(Error(StatusCode::BAD_REQUEST, format!("unknown action {:?}", a.action)));
    };
    let body = html! {
        p { (what) }
        p { "It is done as " strong { (app.identity) } " and recorded with that identity." }
        form method="post" action="/act" {
            input type="hidden" name="action" value=(a.action);
            input type="hidden" name="cluster" value=(a.cluster);
            input type="hidden" name="rollout" value=(a.rollout);
            input type="hidden" name="token" value=(app.token);
            p {
                label for="reason" { "Why (recorded with it)" }
                input id="reason" name="reason" required autocomplete="off";
            }
            button type="submit" { "Confirm" }
            " "
            a href=(back) { "Cancel" }
        }
    };
    Ok(layout::html(layout::page("Confirm", "", body)))
}

pub async fn act(State(app): State<Shared>, headers: HeaderMap, axum::Form(a): axum::Form<Action>) -> Page {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()).unwrap_or("");
    let same_origin = app.hosts.iter().any(|h| origin == format!("http://{h}"));
    if a.token != app.token || !same_origin {
        return Err(Error(StatusCode::FORBIDDEN, "this action did not come from this dashboard's own page".into()));
    }
    let Some((_, back)) = a.describe() else {
        return Err(Error(StatusCode::BAD_REQUEST, format!("unknown action {:?}", a.action)));
    };
    let mut permits = PermitServiceClient::new(app.ch.clone());
    let mut rollouts = RolloutServiceClient::new(app.ch.clone());
    let control = |c: RolloutControl| ControlRolloutRequest {
        name: a.rollout.clone(),
        control: c as i32,
        reason: a.reason.clone(),
    };
    let done = match a.action.as_str() {
        "freeze" => {
            permits.freeze(FreezeRequest { cluster: a.cluster.clone(), reason: a.reason.clone() }).await?;
            "frozen"
        }
        "unfreeze" => {
            permits.unfreeze(UnfreezeRequest { cluster: a.cluster.clone() }).await?;
            "unfrozen"
        }
        "reset-breaker" => {
            permits.reset_breaker(ResetBreakerRequest { cluster: a.cluster.clone() }).await?;
            "breaker reset"
        }
        "pause" => {
            rollouts.control_rollout(control(RolloutControl::Pause)).await?;
            "paused"
        }
        "resume" => {
            rollouts.control_rollout(control(RolloutControl::Resume)).await?;
            "resumed"
        }
        _ => {
            rollouts.control_rollout(control(RolloutControl::Abort)).await?;
            "aborted"
        }
    };
    tracing::info!(action = %a.action, cluster = %a.cluster, rollout = %a.rollout, identity = %app.identity, "dashboard action done");
    let body = html! {
        p role="status" { "Done: " (done) "." }
        p { a href=(back) { "Back" } }
    };
    Ok(layout::html(layout::page("Done", "", body)))
}

//! Alertmanager's v2 API, both ways: the center posts its ops alerts (a tripped breaker, an
//! escalated fault) and asks which alerts fire for the business-health gates.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::AlertmanagerConfig;

pub struct Alertmanager {
    alerts: reqwest::Url,
    http: reqwest::Client,
}

/// An alert as Alertmanager's `POST /api/v2/alerts` takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    #[serde(serialize_with = "rfc3339")]
    pub starts_at: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub ends_at: SystemTime,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// reqwest's error with its causes ("error sending request" alone says little).
fn describe(e: reqwest::Error) -> String {
    let mut s = format!("Alertmanager: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

#[derive(Deserialize)]
struct GettableAlert {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Alertmanager {
    /// None when no URL is configured.
    pub fn new(cfg: &AlertmanagerConfig) -> Result<Option<Self>, String> {
        let Some(url) = &cfg.url else { return Ok(None) };
        let base = reqwest::Url::parse(url).map_err(|e| format!("alertmanager.url {url:?}: {e}"))?;
        let alerts = base.join("api/v2/alerts").map_err(|e| format!("alertmanager.url {url:?}: {e}"))?;
        nodekeeper_common::tls::install_default_provider();
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("nodekeeper-eventcenter/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client for Alertmanager: {e}"))?;
        Ok(Some(Self { alerts, http }))
    }

    /// The names (`alertname`) of the active, unsilenced, uninhibited alerts matching every
    /// matcher (Alertmanager's own syntax, e.g. `severity="critical"`).
    pub async fn firing(&self, matchers: &[String]) -> Result<Vec<String>, String> {
        let mut url = self.alerts.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("active", "true").append_pair("silenced", "false").append_pair("inhibited", "false");
            for m in matchers {
                q.append_pair("filter", m);
            }
        }
        let response = self.http.get(url).send().await.map_err(describe)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("Alertmanager answered {status}: {}", body.trim()));
        }
        let alerts: Vec<GettableAlert> =
            response.json().await.map_err(|e| format!("Alertmanager's answer is not a list of alerts: {e}"))?;
        Ok(alerts.into_iter().map(|a| a.labels.get("alertname").cloned().unwrap_or_default()).collect())
    }

    pub async fn post(&self, alerts: &[PostableAlert]) -> Result<(), String> {
        let response = self.http.post(self.alerts.clone()).json(alerts).send().await.map_err(describe)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("Alertmanager answered {status}: {}", body.trim()));
        }
        Ok(())
    }
}

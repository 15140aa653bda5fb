//! Alertmanager's v2 API, both ways: the center posts its ops alerts and asks which alerts fire
//! for the business-health gates. Also generic webhooks, which get Alertmanager's webhook payload.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

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

/// Alertmanager's webhook payload (version 4), without its grouping fields: what receivers
/// written for Alertmanager already read.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookPayload<'a> {
    version: &'static str,
    receiver: &'static str,
    status: &'static str,
    alerts: Vec<WebhookAlert<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookAlert<'a> {
    status: &'static str,
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    #[serde(serialize_with = "rfc3339")]
    starts_at: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    ends_at: SystemTime,
}

/// Alerts as delivered: each one's labels, and whether it was firing.
type Delivered = Vec<(BTreeMap<String, String>, bool)>;

/// Generic JSON webhooks: each gets the alerts when what fires or resolves changed, and again
/// every `repeat` while anything fires.
#[derive(Clone)]
pub struct Webhooks {
    urls: Vec<reqwest::Url>,
    http: reqwest::Client,
    repeat: Duration,
    /// What was last delivered to every URL, and when.
    last: Option<(Delivered, SystemTime)>,
}

impl Webhooks {
    /// None when no URL is configured.
    pub fn new(urls: &[String], repeat: Duration, timeout: Duration) -> Result<Option<Self>, String> {
        if urls.is_empty() {
            return Ok(None);
        }
        let urls = urls
            .iter()
            .map(|u| reqwest::Url::parse(u).map_err(|e| format!("alerts.webhooks {u:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self { urls, http: client(timeout)?, repeat, last: None }))
    }

    pub async fn post(&mut self, alerts: &[PostableAlert], now: SystemTime) -> Result<(), String> {
        let mut key: Vec<_> = alerts.iter().map(|a| (a.labels.clone(), a.ends_at > now)).collect();
        key.sort();
        let any_firing = key.iter().any(|(_, firing)| *firing);
        if let Some((last, at)) = &self.last
            && *last == key
            && (!any_firing || now.duration_since(*at).unwrap_or_default() < self.repeat)
        {
            return Ok(());
        }
        let payload = WebhookPayload {
            version: "4",
            receiver: "nodekeeper-eventcenter",
            status: if any_firing { "firing" } else { "resolved" },
            alerts: alerts
                .iter()
                .map(|a| WebhookAlert {
                    status: if a.ends_at > now { "firing" } else { "resolved" },
                    labels: &a.labels,
                    annotations: &a.annotations,
                    starts_at: a.starts_at,
                    ends_at: a.ends_at,
                })
                .collect(),
        };
        for url in &self.urls {
            let response =
                self.http.post(url.clone()).json(&payload).send().await.map_err(|e| describe("webhook", e))?;
            if !response.status().is_success() {
                return Err(format!("webhook {url} answered {}", response.status()));
            }
        }
        self.last = Some((key, now));
        Ok(())
    }
}

fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    nodekeeper_common::tls::install_default_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("nodekeeper-eventcenter/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client for alerts: {e}"))
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// reqwest's error with its causes ("error sending request" alone says little).
fn describe(what: &str, e: reqwest::Error) -> String {
    format!("{what}: {}", nodekeeper_common::errors::chain(&e))
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
        Ok(Some(Self { alerts, http: client(cfg.timeout)? }))
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
        let response = self.http.get(url).send().await.map_err(|e| describe("Alertmanager", e))?;
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
        let response =
            self.http.post(self.alerts.clone()).json(alerts).send().await.map_err(|e| describe("Alertmanager", e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("Alertmanager answered {status}: {}", body.trim()));
        }
        Ok(())
    }
}

//! Business-health gates: disruptive permits are denied in a cluster while an Alertmanager alert
//! matching a gate fires there, or while a metric reported to the center is outside its range.
//! An unknown state (Alertmanager not answering, no fresh value) denies unless the gate says
//! `when_unknown = "allow"`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::alertmanager::Alertmanager;
use nodekeeper_proto::v1::GateVerdict;

use crate::config::GateConfig;

type Answer = Result<Vec<String>, String>;

pub struct Gates {
    gates: Vec<GateConfig>,
    alertmanager: Option<Arc<Alertmanager>>,
    query_interval: Duration,
    /// Alertmanager's last answer per (gate, cluster), with when it was asked. Held across a
    /// query so that concurrent decisions wait for one answer instead of asking again.
    answers: tokio::sync::Mutex<HashMap<(usize, String), (Instant, Answer)>>,
    /// Reported values by (cluster, metric).
    metrics: Mutex<HashMap<(String, String), (f64, Instant)>>,
}

impl Gates {
    pub fn new(gates: Vec<GateConfig>, alertmanager: Option<Arc<Alertmanager>>, query_interval: Duration) -> Self {
        Self { gates, alertmanager, query_interval, answers: Default::default(), metrics: Default::default() }
    }

    pub fn report_metric(&self, cluster: &str, name: &str, value: f64) {
        self.metrics
            .lock()
            .expect("metrics lock")
            .insert((cluster.to_owned(), name.to_owned()), (value, Instant::now()));
    }

    /// Why disruptive operations are denied in `cluster` now, if a gate is closed.
    pub async fn closed(&self, cluster: &str) -> Option<String> {
        for (i, g) in self.applying(cluster) {
            match self.verdict(i, g, cluster).await {
                Verdict::Open => {}
                Verdict::Closed(why) => return Some(format!("business health: {why}")),
                Verdict::Unknown(why) if g.when_unknown == "allow" => {
                    tracing::warn!(cluster, reason = %why, "business health unknown; the gate allows");
                }
                Verdict::Unknown(why) => return Some(format!("business health unknown: {why}")),
            }
        }
        None
    }

    /// Every gate that applies to `cluster`, with its verdict now (for the guards' view).
    pub async fn verdicts(&self, cluster: &str) -> Vec<GateVerdict> {
        let mut out = Vec::new();
        for (i, g) in self.applying(cluster) {
            let (state, reason, denies) = match self.verdict(i, g, cluster).await {
                Verdict::Open => ("open", String::new(), false),
                Verdict::Closed(why) => ("closed", why, true),
                Verdict::Unknown(why) => ("unknown", why, g.when_unknown != "allow"),
            };
            out.push(GateVerdict { gate: describe(g), state: state.into(), reason, denies });
        }
        out
    }

    fn applying<'a>(&'a self, cluster: &'a str) -> impl Iterator<Item = (usize, &'a GateConfig)> + 'a {
        self.gates.iter().enumerate().filter(move |(_, g)| g.cluster == "*" || g.cluster == cluster)
    }

    async fn verdict(&self, i: usize, g: &GateConfig, cluster: &str) -> Verdict {
        match &g.metric {
            Some(metric) => self.metric_verdict(g, metric, cluster),
            None => self.alert_verdict(i, g, cluster).await,
        }
    }

    fn metric_verdict(&self, g: &GateConfig, metric: &str, cluster: &str) -> Verdict {
        let value = self.metrics.lock().expect("metrics lock").get(&(cluster.to_owned(), metric.to_owned())).copied();
        let Some((value, at)) = value.filter(|(_, at)| at.elapsed() <= g.max_age) else {
            return Verdict::Unknown(format!(
                "no value of {metric} for cluster {cluster} within {}",
                humantime::format_duration(g.max_age)
            ));
        };
        let age = humantime::format_duration(Duration::from_secs(at.elapsed().as_secs()));
        match (g.min, g.max) {
            (Some(min), _) if value < min => {
                Verdict::Closed(format!("{metric} = {value} in cluster {cluster} ({age} ago), below {min}"))
            }
            (_, Some(max)) if value > max => {
                Verdict::Closed(format!("{metric} = {value} in cluster {cluster} ({age} ago), above {max}"))
            }
            _ => Verdict::Open,
        }
    }

    async fn alert_verdict(&self, i: usize, g: &GateConfig, cluster: &str) -> Verdict {
        let Some(am) = &self.alertmanager else { return Verdict::Unknown("no alertmanager.url".into()) };
        let matchers: Vec<String> = g.alerts.iter().map(|m| m.replace("{cluster}", cluster)).collect();
        let mut answers = self.answers.lock().await;
        let key = (i, cluster.to_owned());
        let fresh = answers.get(&key).filter(|(at, _)| at.elapsed() < self.query_interval);
        let answer = match fresh {
            Some((_, a)) => a.clone(),
            None => {
                let a = am.firing(&matchers).await;
                if let Err(e) = &a {
                    tracing::warn!(cluster, error = %e, "cannot ask Alertmanager for the business-health gate");
                }
                answers.insert(key, (Instant::now(), a.clone()));
                a
            }
        };
        match answer {
            Ok(names) if names.is_empty() => Verdict::Open,
            Ok(names) => Verdict::Closed(format!(
                "{} alert(s) firing matching {{{}}}: {}",
                names.len(),
                matchers.join(", "),
                names.join(", ")
            )),
            Err(e) => Verdict::Unknown(e),
        }
    }
}

/// What a gate checks, in words.
fn describe(g: &GateConfig) -> String {
    let unknown = if g.when_unknown == "allow" { "; unknown allows" } else { "; unknown denies" };
    match (&g.metric, g.min, g.max) {
        (Some(m), Some(min), Some(max)) => format!("{m} between {min} and {max}{unknown}"),
        (Some(m), Some(min), None) => format!("{m} at least {min}{unknown}"),
        (Some(m), None, Some(max)) => format!("{m} at most {max}{unknown}"),
        (Some(m), None, None) => format!("{m} reported{unknown}"),
        (None, ..) => format!("no alert firing matching {{{}}}{unknown}", g.alerts.join(", ")),
    }
}

enum Verdict {
    Open,
    Closed(String),
    Unknown(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric_gate(min: Option<f64>, max: Option<f64>, when_unknown: &str) -> GateConfig {
        GateConfig {
            cluster: "*".into(),
            alerts: Vec::new(),
            metric: Some("pod_creation_success_rate".into()),
            min,
            max,
            max_age: Duration::from_secs(60),
            when_unknown: when_unknown.into(),
        }
    }

    #[tokio::test]
    async fn a_metric_outside_its_range_closes_the_gate_and_a_missing_one_is_unknown() {
        let gates = Gates::new(vec![metric_gate(Some(0.99), Some(1.0), "deny")], None, Duration::from_secs(1));
        let why = gates.closed("c1").await.unwrap();
        assert!(why.starts_with("business health unknown: no value of pod_creation_success_rate"), "{why}");
        gates.report_metric("c1", "pod_creation_success_rate", 0.93);
        let why = gates.closed("c1").await.unwrap();
        assert!(why.contains("= 0.93 in cluster c1") && why.contains("below 0.99"), "{why}");
        gates.report_metric("c1", "pod_creation_success_rate", 1.5);
        assert!(gates.closed("c1").await.unwrap().contains("above 1"));
        gates.report_metric("c1", "pod_creation_success_rate", 0.995);
        assert_eq!(gates.closed("c1").await, None);
        // Another cluster's value says nothing about c2.
        assert!(gates.closed("c2").await.is_some());
        // The guards' view tells each gate's verdict.
        let c2 = gates.verdicts("c2").await;
        assert_eq!(c2.len(), 1);
        assert_eq!(c2[0].gate, "pod_creation_success_rate between 0.99 and 1; unknown denies");
        assert_eq!((c2[0].state.as_str(), c2[0].denies), ("unknown", true));
        let c1 = gates.verdicts("c1").await;
        assert_eq!((c1[0].state.as_str(), c1[0].denies, c1[0].reason.as_str()), ("open", false, ""));
        gates.report_metric("c1", "pod_creation_success_rate", 0.5);
        let c1 = gates.verdicts("c1").await;
        assert_eq!((c1[0].state.as_str(), c1[0].denies), ("closed", true));
        assert!(c1[0].reason.contains("below 0.99"), "{:?}", c1[0]);
    }

    #[tokio::test]
    async fn when_unknown_allow_lets_operations_through_and_other_clusters_gates_do_not_apply() {
        let gates = Gates::new(vec![metric_gate(Some(0.99), None, "allow")], None, Duration::from_secs(1));
        assert_eq!(gates.closed("c1").await, None);
        let v = gates.verdicts("c1").await;
        assert_eq!(
            (v[0].gate.as_str(), v[0].state.as_str(), v[0].denies),
            ("pod_creation_success_rate at least 0.99; unknown allows", "unknown", false)
        );
        let mut only_c2 = metric_gate(Some(0.99), None, "deny");
        only_c2.cluster = "c2".into();
        let gates = Gates::new(vec![only_c2], None, Duration::from_secs(1));
        assert_eq!(gates.closed("c1").await, None);
        assert!(gates.closed("c2").await.is_some());
    }
}

//! Ops alerts to Alertmanager: one per tripped breaker (`NodekeeperBreakerTripped`) and one per
//! escalated fault (`NodekeeperFaultEscalated`). What fires is derived from the center's state each
//! round, so a restarted center sends what still holds. Firing alerts are sent again every
//! `resend_interval` and say they end after three of those: Alertmanager resolves on its own what
//! a stopped center no longer sends. An alert whose cause ended is sent once more, resolved.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nodekeeper_common::time::timestamp_to_unix_ms;
use nodekeeper_proto::v1::FaultState;
use tokio_util::sync::CancellationToken;

use crate::alertmanager::{Alertmanager, PostableAlert};
use crate::permits::RateLimiter;
use crate::store::{FaultFilter, Store};

fn time(t: Option<&prost_types::Timestamp>) -> SystemTime {
    let ms = t.map(timestamp_to_unix_ms).unwrap_or(0).max(0) as u64;
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn alert(labels: &[(&str, &str)], summary: String, starts_at: SystemTime, ends_at: SystemTime) -> PostableAlert {
    PostableAlert {
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        annotations: BTreeMap::from([("summary".to_owned(), summary)]),
        starts_at,
        ends_at,
    }
}

/// The alerts that fire now, each lasting until `ends_at` unless sent again.
async fn firing(permits: &RateLimiter, store: &Store, ends_at: SystemTime) -> Vec<PostableAlert> {
    let mut out = Vec::new();
    for g in permits.guards().1.into_iter().filter(|g| g.breaker_tripped) {
        out.push(alert(
            &[("alertname", "NodekeeperBreakerTripped"), ("cluster", &g.cluster), ("severity", "critical")],
            format!("the remediation breaker of cluster {} tripped: {}", g.cluster, g.reason),
            time(g.since_time.as_ref()),
            ends_at,
        ));
    }
    let escalated = FaultFilter { states: vec![FaultState::Escalated as i32], limit: 10_000, ..Default::default() };
    match store.list_faults(escalated).await {
        Ok(faults) => {
            for f in faults {
                out.push(alert(
                    &[
                        ("alertname", "NodekeeperFaultEscalated"),
                        ("cluster", &f.cluster),
                        ("node", &f.node),
                        ("fault_id", &f.id.to_string()),
                        ("fault", &f.r#type),
                        ("severity", "critical"),
                    ],
                    format!("fault {} ({}) on node {} needs a person: {}", f.id, f.r#type, f.node, f.message),
                    time(f.last_seen_time.as_ref()),
                    ends_at,
                ));
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read escalated faults for alerts"),
    }
    out
}

/// Sends the ops alerts every `resend_interval`, and at once when `changed` is notified.
pub async fn run(
    am: Arc<Alertmanager>,
    permits: Arc<RateLimiter>,
    store: Store,
    resend_interval: Duration,
    cancel: CancellationToken,
) {
    // Sent and not yet resolved, by labels.
    let mut sent: HashMap<BTreeMap<String, String>, PostableAlert> = HashMap::new();
    let mut tick = tokio::time::interval(resend_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = permits.changed.notified() => {}
        }
        let now = SystemTime::now();
        let now_firing = firing(&permits, &store, now + resend_interval * 3).await;
        let mut batch = now_firing.clone();
        for (labels, a) in &sent {
            if !now_firing.iter().any(|f| &f.labels == labels) {
                batch.push(PostableAlert { ends_at: now, ..a.clone() });
            }
        }
        if batch.is_empty() {
            continue;
        }
        match am.post(&batch).await {
            Ok(()) => {
                let resolved = batch.len() - now_firing.len();
                tracing::debug!(firing = now_firing.len(), resolved, "alerts sent to Alertmanager");
                sent = now_firing.into_iter().map(|a| (a.labels.clone(), a)).collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, alerts = batch.len(), "cannot send alerts; will retry");
                tick.reset_after(resend_interval.min(Duration::from_secs(5)));
            }
        }
    }
}

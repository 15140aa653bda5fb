//! Ops alerts: a tripped breaker (`NodekeeperBreakerTripped`), an escalated fault
//! (`NodekeeperFaultEscalated`), a cluster losing heartbeats from many nodes at once
//! (`NodekeeperHeartbeatLoss`), a durable consumer falling behind (`NodekeeperSubscriberLag`) and
//! the store's disk within its reserve (`NodekeeperStoreDiskLow`), a rollout halted or rolled back
//! (`NodekeeperRolloutHalted`, `NodekeeperRolloutRolledBack`).
//! What fires is derived from the center's state each round, so a restarted center sends what
//! still holds. Alertmanager gets every firing alert again each `resend_interval`, each saying it
//! ends after three of those: Alertmanager resolves on its own what a stopped center no longer
//! sends. An alert whose cause ended is sent once more, resolved. Generic webhooks get the same
//! alerts as Alertmanager's webhook payload when the set changes (and every
//! `webhook_repeat_interval` while anything fires).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nodekeeper_common::time::timestamp_to_unix_ms;
use nodekeeper_proto::v1::{FaultState, Rollout, RolloutPhase};
use tokio_util::sync::CancellationToken;

use crate::alertmanager::Webhooks;
use crate::alertmanager::{Alertmanager, PostableAlert};
use crate::config::AlertsConfig;
use crate::liveness::Liveness;
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

/// What the alerts are derived from.
#[derive(Clone)]
pub struct Sources {
    pub permits: Arc<RateLimiter>,
    pub store: Store,
    pub liveness: Arc<Liveness>,
    pub config: AlertsConfig,
}

/// The alerts that fire now, each lasting until `ends_at` unless sent again. Alerts without a
/// time of their own start `now`. None when the store could not be read: a round that does not
/// know must not resolve what it failed to read.
async fn firing(src: &Sources, now: SystemTime, ends_at: SystemTime) -> Option<Vec<PostableAlert>> {
    let mut out = Vec::new();
    if let Err(err) = src.permits.sync(&src.store).await {
        tracing::warn!(error = %err, "cannot read the guards for the ops alerts");
        return None;
    }
    for g in src.permits.guards().1.into_iter().filter(|g| g.breaker_tripped) {
        out.push(alert(
            &[("alertname", "NodekeeperBreakerTripped"), ("cluster", &g.cluster), ("severity", "critical")],
            format!("the remediation breaker of cluster {} tripped: {}", g.cluster, g.reason),
            time(g.since_time.as_ref()),
            ends_at,
        ));
    }
    let escalated = FaultFilter { states: vec![FaultState::Escalated as i32], limit: 10_000, ..Default::default() };
    match src.store.list_faults(escalated).await {
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
        Err(e) => {
            tracing::error!(error = %e, "cannot read escalated faults for alerts");
            return None;
        }
    }
    let disk = src.store.disk();
    if disk.low {
        out.push(alert(
            &[("alertname", "NodekeeperStoreDiskLow"), ("severity", "critical")],
            format!(
                "the event center's store disk has {} bytes free, below its reserve of {}: new events are refused (agents keep theirs) until space is freed",
                disk.free, disk.reserve
            ),
            now,
            ends_at,
        ));
    }
    let cfg = &src.config;
    let census = match src.store.census().await {
        Ok(stored) => stored.unwrap_or_else(|| src.liveness.census()),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the nodes' liveness for alerts");
            return None;
        }
    };
    for (cluster, c) in census {
        if c.lost >= cfg.heartbeat_loss_min_nodes && c.lost as f64 > cfg.heartbeat_loss_share * c.nodes as f64 {
            out.push(alert(
                &[("alertname", "NodekeeperHeartbeatLoss"), ("cluster", &cluster), ("severity", "critical")],
                format!(
                    "{} of {} nodes of cluster {cluster} lost their heartbeat: a network partition, the center's own connectivity, or a fleet-wide agent failure",
                    c.lost, c.nodes
                ),
                now,
                ends_at,
            ));
        }
    }
    match src.store.list_rollouts(vec![]).await {
        Ok(rollouts) => out.extend(rollout_alerts(&rollouts, now, ends_at)),
        Err(e) => {
            tracing::error!(error = %e, "cannot read rollouts for alerts");
            return None;
        }
    }
    match src.store.list_consumers().await {
        Ok(consumers) => {
            for c in consumers.into_iter().filter(|c| c.lag > cfg.subscriber_lag_events) {
                let (owner, name) = crate::store::consumer_parts(&c.name);
                let mut labels =
                    vec![("alertname", "NodekeeperSubscriberLag"), ("consumer", name), ("severity", "warning")];
                // An empty label is no label to Alertmanager; an insecure center has no owners.
                if !owner.is_empty() {
                    labels.push(("owner", owner));
                }
                out.push(alert(
                    &labels,
                    format!(
                        "durable consumer {name} of {owner} is {} events behind (acknowledged cursor {})",
                        c.lag, c.acked_cursor
                    ),
                    now,
                    ends_at,
                ));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read consumers for alerts");
            return None;
        }
    }
    Some(out)
}

/// Sends the ops alerts every `resend_interval`, and at once when `changed` is notified.
pub async fn run(
    am: Option<Arc<Alertmanager>>,
    mut webhooks: Option<Webhooks>,
    src: Sources,
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
            _ = src.permits.changed.notified() => {}
        }
        let now = SystemTime::now();
        let Some(mut now_firing) = firing(&src, now, now + resend_interval * 3).await else {
            continue;
        };
        // An alert keeps the start it was first sent with.
        for a in &mut now_firing {
            if let Some(prev) = sent.get(&a.labels) {
                a.starts_at = a.starts_at.min(prev.starts_at);
            }
        }
        let mut batch = now_firing.clone();
        for (labels, a) in &sent {
            if !now_firing.iter().any(|f| &f.labels == labels) {
                batch.push(PostableAlert { ends_at: now, ..a.clone() });
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut failed = None;
        if let Some(am) = &am
            && let Err(e) = am.post(&batch).await
        {
            failed = Some(e);
        }
        if let Some(w) = &mut webhooks
            && let Err(e) = w.post(&batch, now).await
        {
            failed = Some(e);
        }
        match failed {
            None => {
                let resolved = batch.len() - now_firing.len();
                tracing::debug!(firing = now_firing.len(), resolved, "alerts sent");
                sent = now_firing.into_iter().map(|a| (a.labels.clone(), a)).collect();
            }
            Some(e) => {
                tracing::warn!(error = %e, alerts = batch.len(), "cannot send alerts; will retry");
                tick.reset_after(resend_interval.min(Duration::from_secs(5)));
            }
        }
    }
}

/// How long a rolled-back rollout keeps its alert firing (nobody acknowledges an alert here).
const ROLLED_BACK_ALERT: Duration = Duration::from_secs(3600);

/// `NodekeeperRolloutHalted` while a rollout is halted (until a person aborts or rolls it back),
/// `NodekeeperRolloutRolledBack` while one rolls back and for an hour after.
fn rollout_alerts(rollouts: &[Rollout], now: SystemTime, ends_at: SystemTime) -> Vec<PostableAlert> {
    let mut out = Vec::new();
    for r in rollouts {
        let spec = r.spec.clone().unwrap_or_default();
        let updated = time(r.updated_time.as_ref());
        let name = match r.phase() {
            RolloutPhase::Halted => "NodekeeperRolloutHalted",
            RolloutPhase::RollingBack => "NodekeeperRolloutRolledBack",
            RolloutPhase::RolledBack if now.duration_since(updated).unwrap_or_default() < ROLLED_BACK_ALERT => {
                "NodekeeperRolloutRolledBack"
            }
            _ => continue,
        };
        out.push(alert(
            &[("alertname", name), ("cluster", &spec.cluster), ("rollout", &spec.name), ("severity", "warning")],
            format!(
                "rollout {} of cluster {} is {}: {}",
                spec.name,
                spec.cluster,
                crate::rollout::phase_name(r.phase()),
                r.reason
            ),
            updated,
            ends_at,
        ));
    }
    out
}

//! The guards over every decision: freezes (global or per cluster) and each cluster's circuit
//! breaker, tripped by the share of its nodes with new faults and reset only by a person.

use std::collections::HashSet;
use std::time::Duration;

use nodekeeper_common::time::{self as nktime, timestamp_to_unix_ms};
use nodekeeper_proto::v1::{ClusterGuard, Operation, Severity};
use prost::Message;

use super::{RateLimiter, event, now_ms};
use crate::store::{Store, StoreError};

impl RateLimiter {
    /// The guard that forbids `op` in `cluster`, if any: (reason class, reason).
    pub(super) fn blocked(&self, cluster: &str, op: Operation) -> Option<(&'static str, String)> {
        if op == Operation::Release {
            return None;
        }
        let st = self.state.lock().expect("permits lock");
        if let Some(g) = st.guards.get("").filter(|g| g.frozen) {
            return Some(("frozen", format!("frozen (global): {}", g.reason)));
        }
        let g = st.guards.get(cluster)?;
        if g.frozen {
            return Some(("frozen", format!("frozen: {}", g.reason)));
        }
        if g.breaker_tripped {
            return Some(("breaker", format!("breaker tripped: {}", g.reason)));
        }
        None
    }

    /// Trips the cluster's breaker if faults opened on more than the configured share of its
    /// nodes within the window.
    pub(super) async fn check_breaker(&self, store: &Store, cluster: &str) -> Result<(), StoreError> {
        // A reset (or an unfreeze) starts the count afresh: the faults it acknowledged do not
        // trip the breaker again.
        let counted_from = {
            let st = self.state.lock().expect("permits lock");
            let g = st.guards.get(cluster);
            if g.is_some_and(|g| g.breaker_tripped) {
                return Ok(());
            }
            g.filter(|g| g.reason.is_empty()).and_then(|g| g.since_time.as_ref()).map(timestamp_to_unix_ms).unwrap_or(0)
        };
        let nodes = store.count_nodes(cluster.to_owned()).await?;
        if nodes == 0 {
            return Ok(());
        }
        let since = (now_ms() - self.config.breaker_window.as_millis() as i64).max(counted_from);
        let faults = store
            .list_faults(crate::store::FaultFilter {
                clusters: vec![cluster.to_owned()],
                limit: 100_000,
                ..Default::default()
            })
            .await?;
        let faulty: HashSet<&str> = faults
            .iter()
            .filter(|f| f.first_seen_time.as_ref().is_some_and(|t| timestamp_to_unix_ms(t) >= since))
            .map(|f| f.node.as_str())
            .collect();
        let share = faulty.len() as f64 / nodes as f64;
        if share <= self.config.breaker_fault_share {
            return Ok(());
        }
        let reason = format!(
            "faults opened on {} of {} nodes ({:.0}%) within {}, above {:.0}%",
            faulty.len(),
            nodes,
            share * 100.0,
            humantime::format_duration(self.config.breaker_window),
            self.config.breaker_fault_share * 100.0
        );
        tracing::warn!(cluster, reason = %reason, "breaker tripped");
        let mut g = self.state.lock().expect("permits lock").guards.get(cluster).cloned().unwrap_or_default();
        g.cluster = cluster.to_owned();
        g.breaker_tripped = true;
        g.reason = reason.clone();
        g.since_time = Some(nktime::now_timestamp());
        let e = event(cluster, "", "BreakerTripped", reason, Severity::Critical, vec![]);
        store.put_guard(cluster.to_owned(), g.encode_to_vec(), vec![e]).await?;
        self.state.lock().expect("permits lock").guards.insert(cluster.to_owned(), g);
        self.changed.notify_one();
        Ok(())
    }

    pub fn breaker_rule(&self) -> (f64, Duration) {
        (self.config.breaker_fault_share, self.config.breaker_window)
    }

    /// Freezes or unfreezes a cluster ("" for every cluster).
    pub async fn set_frozen(
        &self,
        store: &Store,
        cluster: &str,
        frozen: bool,
        reason: &str,
        by: &str,
    ) -> Result<(), StoreError> {
        let _deciding = self.deciding(store).await?;
        let mut g = self.state.lock().expect("permits lock").guards.get(cluster).cloned().unwrap_or_default();
        g.cluster = cluster.to_owned();
        g.frozen = frozen;
        if frozen || !g.breaker_tripped {
            g.reason = reason.to_owned();
            g.since_time = Some(nktime::now_timestamp());
        }
        let scope = if cluster.is_empty() { "every cluster".to_owned() } else { format!("cluster {cluster}") };
        let (kind, message) = if frozen {
            ("Frozen", format!("{scope} frozen by {by}: {reason}"))
        } else {
            ("Unfrozen", format!("{scope} unfrozen by {by}"))
        };
        store
            .put_guard(
                cluster.to_owned(),
                g.encode_to_vec(),
                vec![event(cluster, "", kind, message, Severity::Warning, vec![("by", by.to_owned())])],
            )
            .await?;
        self.state.lock().expect("permits lock").guards.insert(cluster.to_owned(), g);
        Ok(())
    }

    pub async fn reset_breaker(&self, store: &Store, cluster: &str, by: &str) -> Result<(), StoreError> {
        let _deciding = self.deciding(store).await?;
        let mut g = self.state.lock().expect("permits lock").guards.get(cluster).cloned().unwrap_or_default();
        g.cluster = cluster.to_owned();
        g.breaker_tripped = false;
        g.reason = String::new();
        g.since_time = Some(nktime::now_timestamp());
        let e = event(
            cluster,
            "",
            "BreakerReset",
            format!("breaker of cluster {cluster} reset by {by}"),
            Severity::Warning,
            vec![("by", by.to_owned())],
        );
        store.put_guard(cluster.to_owned(), g.encode_to_vec(), vec![e]).await?;
        self.state.lock().expect("permits lock").guards.insert(cluster.to_owned(), g);
        self.changed.notify_one();
        Ok(())
    }

    pub fn guards(&self) -> (bool, Vec<ClusterGuard>) {
        let st = self.state.lock().expect("permits lock");
        let global = st.guards.get("").is_some_and(|g| g.frozen);
        let mut v: Vec<ClusterGuard> =
            st.guards.iter().filter(|(k, _)| !k.is_empty()).map(|(_, g)| g.clone()).collect();
        v.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        (global, v)
    }
}

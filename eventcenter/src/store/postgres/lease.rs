//! A lease in the database for work that must run on one replica at a time (breaker evaluation,
//! ops alerts, detector quorum, retention, the rollout controller): leader election with the
//! semantics of Kubernetes' (lease duration, renew deadline, retry period), on the database
//! server's clock.
//!
//! A contender tries every `retry_period`: it takes the lease when it is free or expired, renews
//! it when it holds it. It leads from a successful try until `renew_deadline` after the start of
//! its last successful renewal (measured on its own monotonic clock, and shorter than
//! `lease_duration`, which the server counts from a later instant): so it stops leading before
//! anyone else can take the lease, even when it cannot reach the database to learn it lost.
//! Stopping gracefully gives the lease up at once.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::pg;
use crate::store::{Result, StoreError};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.retry_period < self.renew_deadline && self.renew_deadline < self.lease_duration {
            Ok(())
        } else {
            Err("lease: expected retry_period < renew_deadline < lease_duration".into())
        }
    }
}

/// One contender for a named lease. `leading()` is `Some(epoch)` while it leads.
pub struct Lease {
    leading: watch::Receiver<Option<u64>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Starts contending for `name` as `holder` (unique per replica).
    pub fn contend(pool: deadpool_postgres::Pool, name: &str, holder: &str, config: LeaseConfig) -> Result<Lease> {
        config.validate().map_err(|message| StoreError::Postgres { message })?;
        let (tx, leading) = watch::channel(None);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(contend(pool, name.to_owned(), holder.to_owned(), config, tx, stopped));
        Ok(Lease { leading, stop: Some(stop), task })
    }

    /// The epoch of the lease while this contender leads.
    pub fn leading(&self) -> watch::Receiver<Option<u64>> {
        self.leading.clone()
    }

    /// Stops leading and gives the lease up, so another replica takes it at its next try.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropped without `release` (the process dying): the lease runs out on its own.
        self.task.abort();
    }
}

/// One try: the lease's epoch if `holder` holds it now.
async fn try_hold(pool: &deadpool_postgres::Pool, name: &str, holder: &str, duration: Duration) -> Result<Option<u64>> {
    let client = pool.get().await.map_err(|e| StoreError::Postgres { message: e.to_string() })?;
    let row = client
        .query_opt(
            "INSERT INTO leases AS l (name, holder, expires_at, epoch)
             VALUES ($1, $2, now() + $3 * interval '1 millisecond', 1)
             ON CONFLICT (name) DO UPDATE SET
                 holder = excluded.holder,
                 expires_at = excluded.expires_at,
                 epoch = l.epoch + CASE WHEN l.holder = excluded.holder THEN 0 ELSE 1 END
             WHERE l.holder = excluded.holder OR l.expires_at < now()
             RETURNING epoch",
            &[&name, &holder, &(duration.as_millis() as f64)],
        )
        .await
        .map_err(pg)?;
    Ok(row.map(|r| r.get::<_, i64>(0) as u64))
}

async fn contend(
    pool: deadpool_postgres::Pool,
    name: String,
    holder: String,
    config: LeaseConfig,
    leading: watch::Sender<Option<u64>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    // Until when this contender may act as the leader (None: it does not lead).
    let mut until: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let attempt =
            tokio::time::timeout(config.renew_deadline, try_hold(&pool, &name, &holder, config.lease_duration));
        match attempt.await {
            Ok(Ok(Some(epoch))) => {
                until = Some(started + config.renew_deadline);
                if *leading.borrow() != Some(epoch) {
                    tracing::info!(lease = %name, holder = %holder, epoch, "leading");
                    leading.send_replace(Some(epoch));
                }
            }
            Ok(Ok(None)) => until = None,
            Ok(Err(e)) => tracing::warn!(lease = %name, error = %e, "cannot renew the lease"),
            Err(_) => tracing::warn!(lease = %name, "renewing the lease took longer than the renew deadline"),
        }
        if until.is_none_or(|u| Instant::now() >= u) && leading.borrow().is_some() {
            tracing::warn!(lease = %name, holder = %holder, "no longer leading");
            leading.send_replace(None);
            until = None;
        }
        // Sleep until the next try, or until the lead runs out, whichever comes first.
        let next = started + config.retry_period;
        let wake = until.map_or(next, |u| u.min(next));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = &mut stopped => {
                leading.send_replace(None);
                if let Ok(client) = pool.get().await {
                    // Expired, not deleted: the epoch keeps growing for the next holder.
                    let gone = client
                        .execute(
                            "UPDATE leases SET expires_at = '-infinity' WHERE name = $1 AND holder = $2",
                            &[&name, &holder],
                        )
                        .await;
                    if let Err(e) = gone {
                        tracing::warn!(lease = %name, error = %e, "cannot give the lease up; it runs out on its own");
                    }
                }
                return;
            }
        }
    }
}

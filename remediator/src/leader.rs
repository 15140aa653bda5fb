//! Leader election through a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection
//! does it (the algorithm kube-controller-manager and operator-sdk controllers use, so `kubectl
//! get lease` reads the same): every `retry_period` each replica reads the Lease; the holder
//! renews `renewTime`, the others take it over only once it was not renewed for
//! `lease_duration` as measured by their own clock since they last saw it change (no clock skew
//! between replicas matters). Every write is an update preconditioned on the resourceVersion
//! read, so two replicas can never both win: the loser gets 409 Conflict.
//!
//! A leader that could not renew for `renew_deadline` (shorter than the lease duration) stops
//! leading before anyone else may take over; the process then exits, as client-go controllers
//! do, and its supervisor starts it again as a follower. Work in progress is resumed by the new
//! leader from the center's record (fault timelines), so nothing is done twice. On a clean
//! shutdown the leader gives the Lease up at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::LeaderElectionConfig;
use crate::kube::is_conflict;

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderElectionConfig,
    identity: String,
    /// The holder and renew time last seen, and when (our clock) they were first seen.
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

/// Whether this replica leads: false until it has won, false again once it lost.
pub type Leading = watch::Receiver<bool>;

impl Elector {
    pub fn new(client: kube::Client, cfg: LeaderElectionConfig, identity: String) -> Self {
        Self { api: Api::namespaced(client, &cfg.namespace), cfg, identity, observed: None }
    }

    /// Campaigns, then renews, until cancelled (giving the lease up) or until leadership is lost;
    /// `leading` follows the state. Returns true when it ended because leadership was lost.
    pub async fn run(mut self, leading: watch::Sender<bool>, cancel: CancellationToken) -> bool {
        let mut tick = tokio::time::interval(self.cfg.retry_period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut renewed: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    if renewed.is_some() {
                        self.release().await;
                    }
                    return false;
                }
                _ = tick.tick() => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    if renewed.is_none() {
                        tracing::info!(lease = %self.cfg.lease_name, identity = %self.identity, "leader election: leading");
                        leading.send_replace(true);
                    }
                    renewed = Some(Instant::now());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %self.cfg.lease_name, error = %e, "leader election: cannot read or write the lease")
                }
            }
            if let Some(at) = renewed
                && at.elapsed() > self.cfg.renew_deadline
            {
                tracing::error!(lease = %self.cfg.lease_name, deadline = ?self.cfg.renew_deadline,
                    "leader election: lease not renewed within the renew deadline; stopping leading");
                leading.send_replace(false);
                return true;
            }
        }
    }

    fn spec(&self, now: &MicroTime, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now.clone()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: true when this replica holds the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.cfg.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.lease_name.clone()), ..Default::default() },
                spec: Some(self.spec(&now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = (holder.clone(), spec.renew_time.clone());
        if self.observed.as_ref().is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1)) {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let ours = holder == self.identity;
        let duration =
            spec.lease_duration_seconds.map_or(self.cfg.lease_duration, |s| Duration::from_secs(s.max(0) as u64));
        let seen_at = self.observed.as_ref().map(|(_, _, at)| *at).unwrap_or_else(Instant::now);
        if !holder.is_empty() && !ours && seen_at.elapsed() < duration {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if ours {
            self.spec(&now, spec.acquire_time.clone(), transitions)
        } else {
            tracing::info!(lease = %self.cfg.lease_name, previous = %holder, "leader election: taking over the lease");
            self.spec(&now, None, transitions + 1)
        });
        match self.api.replace(&self.cfg.lease_name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (holder cleared, duration 1 s) so that another replica leads at once.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.lease_name).await else { return };
        let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(&self.identity)) else {
            return;
        };
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self.api.replace(&self.cfg.lease_name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.cfg.lease_name, "leader election: lease given up"),
            Err(e) => {
                tracing::warn!(lease = %self.cfg.lease_name, error = %e, "leader election: cannot give the lease up")
            }
        }
    }
}

/// A replica's identity in the Lease: its host name (the pod's name) and a random suffix, as
/// client-go makes it, so that two processes on one host differ.
pub fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "remediator".into());
    format!("{host}_{:08x}", rand::random::<u32>())
}

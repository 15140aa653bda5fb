//! Abuse limits per identity, so that one misbehaving node or client cannot starve the others:
//! a rate limit on observations (agent batches wait for their turn, which slows the sender down;
//! unary reports over the limit get RESOURCE_EXHAUSTED and retry later), and a cap on concurrent
//! streams. Identities come from client certificates; an insecure center has none and applies no
//! per-identity limits.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::Status;

use crate::api::Caller;
use crate::config::LimitsConfig;

pub struct Limits {
    observations: DefaultKeyedRateLimiter<String>,
    streams: Arc<Mutex<HashMap<String, u32>>>,
    max_streams: u32,
    per_second: u32,
    /// Refusals per identity since the last warning, and when that was: a flood must not become
    /// a log flood.
    refusals: Mutex<HashMap<String, (u64, std::time::Instant)>>,
}

fn key(caller: &Caller) -> Option<String> {
    caller.as_ref().map(|id| format!("{}/{}", id.kind.as_str(), id.name))
}

/// Holds one of an identity's stream slots while alive.
pub struct StreamSlot {
    key: Option<String>,
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let Some(k) = &self.key else { return };
        let mut s = self.streams.lock().expect("stream slots lock");
        if let Some(n) = s.get_mut(k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.remove(k);
            }
        }
    }
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Limits {
        let rate = NonZeroU32::new(cfg.observations_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cfg.observations_burst).unwrap_or(rate);
        Limits {
            observations: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            streams: Arc::new(Mutex::new(HashMap::new())),
            max_streams: cfg.max_streams_per_identity,
            per_second: cfg.observations_per_second,
            refusals: Mutex::new(HashMap::new()),
        }
    }

    /// Admits `n` observations now, or RESOURCE_EXHAUSTED.
    pub fn admit(&self, caller: &Caller, n: usize) -> Result<(), Status> {
        let (Some(k), Some(n)) = (key(caller), NonZeroU32::new(n as u32)) else { return Ok(()) };
        match self.observations.check_key_n(&k, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => {
                self.note_refusal(&k);
                Err(Status::resource_exhausted(format!(
                    "rate limit: {k} may send {} observations per second; retry later",
                    self.per_second
                )))
            }
        }
    }

    fn note_refusal(&self, k: &str) {
        let mut r = self.refusals.lock().expect("refusals lock");
        let now = std::time::Instant::now();
        let entry = r.entry(k.to_owned()).or_insert((0, now - std::time::Duration::from_secs(3600)));
        entry.0 += 1;
        if now.duration_since(entry.1) >= std::time::Duration::from_secs(10) {
            tracing::warn!(identity = %k, refused_calls = entry.0, "rate limit: reports refused");
            *entry = (0, now);
        }
    }

    /// Waits until `n` observations may pass: a stream over its rate is slowed, not failed.
    pub async fn throttle(&self, caller: &Caller, n: usize) -> Result<(), Status> {
        let (Some(k), Some(n)) = (key(caller), NonZeroU32::new(n as u32)) else { return Ok(()) };
        self.observations
            .until_key_n_ready(&k, n)
            .await
            .map_err(|_| Status::resource_exhausted(format!("a batch of {n} is larger than the burst allowed to {k}")))
    }

    /// Takes one of the caller's stream slots, or RESOURCE_EXHAUSTED when all are in use.
    pub fn open_stream(&self, caller: &Caller) -> Result<StreamSlot, Status> {
        let k = key(caller);
        if let Some(k) = &k {
            let mut s = self.streams.lock().expect("stream slots lock");
            let n = s.entry(k.clone()).or_insert(0);
            if *n >= self.max_streams {
                tracing::warn!(identity = %k, max = self.max_streams, "stream limit reached");
                return Err(Status::resource_exhausted(format!(
                    "{k} already has {} open streams, the most allowed",
                    self.max_streams
                )));
            }
            *n += 1;
        }
        Ok(StreamSlot { key: k, streams: self.streams.clone() })
    }
}

//! Condition state and the way findings become observations in the outbox.
//!
//! The state of every condition a monitor has opened is kept in the outbox database (table
//! `state`, keys `condition/<type>`) and written in the same transaction as the observation that
//! changes it. So after a restart, `kill -9` included, an open condition is still open, is not
//! reported again, and is not cleared unless its clearing rule says so. A condition that was never
//! opened is healthy by default: nothing is reported for it until a check or rule finds a problem.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodekeeper_proto::v1::{Condition, ConditionStatus, Observation};
use serde::{Deserialize, Serialize};

use super::rules::{Clear, ConditionDef};
use super::{Finding, Problem};
use crate::outbox::{Outbox, OutboxError};

const PREFIX: &str = "condition/";
/// How often a condition that keeps recurring has its last-seen time written down (for clearing
/// after a time without recurrence).
const LAST_SEEN_PERSIST: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CondState {
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    pub source: String,
    /// The boot the condition was set in.
    pub boot_id: String,
    /// Seconds since the epoch.
    pub since: u64,
    pub last_seen: u64,
}

fn status_name(s: ConditionStatus) -> &'static str {
    match s {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        _ => "Unknown",
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

struct Inner {
    conditions: HashMap<String, CondState>,
    /// Clearing rules and healthy reasons of the conditions the configured monitors declare.
    defs: HashMap<String, ConditionDef>,
    persisted_seen: HashMap<String, SystemTime>,
}

/// Turns findings into observations, tracking condition state. Cheap to clone.
#[derive(Clone)]
pub struct Reporter {
    outbox: Outbox,
    boot_id: String,
    inner: Arc<Mutex<Inner>>,
}

impl Reporter {
    pub fn open(outbox: Outbox, boot_id: &str) -> Result<Reporter, OutboxError> {
        let mut conditions = HashMap::new();
        for (key, value) in outbox.state_blocking(PREFIX)? {
            match serde_json::from_slice::<CondState>(&value) {
                Ok(s) => {
                    conditions.insert(key[PREFIX.len()..].to_owned(), s);
                }
                Err(err) => tracing::warn!(key, error = %err, "ignoring unreadable condition state"),
            }
        }
        Ok(Reporter {
            outbox,
            boot_id: boot_id.to_owned(),
            inner: Arc::new(Mutex::new(Inner { conditions, defs: HashMap::new(), persisted_seen: HashMap::new() })),
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Declares a condition a monitor may set, with how it clears.
    pub fn declare(&self, def: &ConditionDef) {
        self.inner.lock().expect("reporter lock").defs.insert(def.kind.clone(), def.clone());
    }

    /// The open (True or Unknown) conditions.
    pub fn open_conditions(&self) -> Vec<(String, CondState)> {
        let inner = self.inner.lock().expect("reporter lock");
        let mut v: Vec<_> =
            inner.conditions.iter().filter(|(_, s)| s.status != "False").map(|(k, s)| (k.clone(), s.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Stores the observations these findings make, with the condition changes and `extra` state
    /// entries (a log position) in one transaction. Returns how many observations were stored.
    /// Blocking.
    pub fn report_blocking(
        &self,
        findings: &[Finding],
        extra: &[(String, Option<Vec<u8>>)],
    ) -> Result<usize, OutboxError> {
        let mut inner = self.inner.lock().expect("reporter lock");
        let mut observations = Vec::new();
        let mut state: Vec<(String, Option<Vec<u8>>)> = extra.to_vec();
        let mut changed: HashMap<String, CondState> = HashMap::new();
        for f in findings {
            match &f.problem {
                Problem::Temporary => observations.push(observation(f, None)),
                Problem::Permanent { condition, status } => {
                    let current = changed.get(condition).or_else(|| inner.conditions.get(condition));
                    let name = status_name(*status);
                    let seen = unix(f.time).max(current.map_or(0, |c| c.last_seen));
                    match current {
                        Some(c) if c.status == name => {
                            // Unchanged: no event. Remember when it was last seen, now and then.
                            let stale = inner
                                .persisted_seen
                                .get(condition)
                                .is_none_or(|t| t.elapsed().unwrap_or_default() >= LAST_SEEN_PERSIST);
                            let mut c = c.clone();
                            c.last_seen = seen;
                            if stale {
                                state.push((
                                    format!("{PREFIX}{condition}"),
                                    Some(serde_json::to_vec(&c).expect("serializable")),
                                ));
                                inner.persisted_seen.insert(condition.clone(), SystemTime::now());
                            }
                            changed.insert(condition.clone(), c);
                            continue;
                        }
                        None if *status == ConditionStatus::False => continue,
                        _ => {}
                    }
                    let s = CondState {
                        status: name.into(),
                        reason: f.reason.clone(),
                        message: f.message.clone(),
                        source: f.source.clone(),
                        boot_id: self.boot_id.clone(),
                        since: unix(f.time),
                        last_seen: seen,
                    };
                    observations.push(observation(f, Some(*status)));
                    state.push((format!("{PREFIX}{condition}"), Some(serde_json::to_vec(&s).expect("serializable"))));
                    changed.insert(condition.clone(), s);
                }
            }
        }
        if observations.is_empty() && state.is_empty() {
            return Ok(0);
        }
        let n = observations.len();
        self.outbox.push_with_state_blocking(observations, &state)?;
        for (k, s) in changed {
            inner.conditions.insert(k, s);
        }
        Ok(n)
    }

    pub async fn report(&self, findings: Vec<Finding>) -> Result<usize, OutboxError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.report_blocking(&findings, &[])).await.unwrap_or_else(|e| {
            Err(OutboxError::Sqlite { path: "outbox".into(), message: format!("report task failed: {e}") })
        })
    }

    /// A log monitor's stored position (or other state under `key`).
    pub fn state(&self, key: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        Ok(self.outbox.state_blocking(key)?.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
    }

    /// Findings that clear open conditions whose rule says so: `Reboot` ones set in another boot,
    /// and `After(d)` ones not seen for `d`. Called at start and periodically.
    pub fn due_clearings(&self, now: SystemTime) -> Vec<Finding> {
        let inner = self.inner.lock().expect("reporter lock");
        let mut out = Vec::new();
        for (kind, s) in &inner.conditions {
            if s.status != "True" {
                continue;
            }
            let Some(def) = inner.defs.get(kind) else { continue };
            let message = match def.clear {
                Clear::Reboot if s.boot_id != self.boot_id => format!("{} (the node booted again)", def.message),
                Clear::After(d) if unix(now).saturating_sub(s.last_seen) >= d.as_secs() => {
                    format!("{} (not seen for {})", def.message, humantime::format_duration(d))
                }
                _ => continue,
            };
            let class = super::rules::classify(kind, true, nodekeeper_proto::v1::Category::Unspecified);
            out.push(Finding::condition(&s.source, kind, ConditionStatus::False, &def.reason, message, class));
        }
        out.sort_by(|a, b| a.reason.cmp(&b.reason));
        out
    }
}

/// The observation for a finding; `status` set for a condition change. Texts and attributes are
/// cut to the contract's limits (marked in the attribute `truncated`), so that the center takes
/// whatever a monitor reads: one long log line cannot be refused.
pub fn observation(f: &Finding, status: Option<ConditionStatus>) -> Observation {
    let time = nodekeeper_common::time::to_timestamp(f.time);
    let (kind, condition) = match (&f.problem, status) {
        (Problem::Permanent { condition, .. }, Some(status)) => (
            condition.clone(),
            Some(Condition {
                r#type: condition.clone(),
                status: status as i32,
                reason: f.reason.clone(),
                message: f.message.clone(),
                last_transition_time: Some(time),
            }),
        ),
        _ => (f.reason.clone(), None),
    };
    let mut o = Observation {
        sequence: 0,
        time: Some(time),
        r#type: kind,
        reason: f.reason.clone(),
        message: f.message.clone(),
        severity: f.severity as i32,
        category: f.category as i32,
        action: f.action as i32,
        condition,
        attributes: f.attributes.iter().cloned().collect(),
        source: f.source.clone(),
    };
    nodekeeper_common::observation::fit(&mut o);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::Class;
    use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};

    const CLASS: Class = Class::new(Severity::Critical, Category::Kernel, RecommendedAction::Reboot);

    fn cond(status: ConditionStatus) -> Finding {
        Finding::condition("kernel-monitor", "KernelDeadlock", status, "R", "m".into(), CLASS)
    }

    fn def(clear: Clear) -> ConditionDef {
        ConditionDef {
            kind: "KernelDeadlock".into(),
            reason: "KernelHasNoDeadlock".into(),
            message: "fine".into(),
            clear,
        }
    }

    #[test]
    fn an_open_condition_survives_a_restart_without_being_reported_again() {
        let t = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(t.path(), 1 << 20).unwrap();
        let r = Reporter::open(outbox.clone(), "boot-1").unwrap();
        r.declare(&def(Clear::Reboot));
        assert_eq!(r.report_blocking(&[cond(ConditionStatus::False)], &[]).unwrap(), 0, "healthy by default");
        assert_eq!(r.report_blocking(&[cond(ConditionStatus::True)], &[]).unwrap(), 1);
        assert_eq!(r.report_blocking(&[cond(ConditionStatus::True)], &[]).unwrap(), 0, "unchanged");
        drop(r);
        drop(outbox);
        let outbox = Outbox::open(t.path(), 1 << 20).unwrap();
        let r = Reporter::open(outbox.clone(), "boot-1").unwrap();
        r.declare(&def(Clear::Reboot));
        assert_eq!(r.open_conditions().len(), 1);
        assert!(r.due_clearings(SystemTime::now()).is_empty(), "same boot: stays open");
        assert_eq!(r.report_blocking(&[cond(ConditionStatus::True)], &[]).unwrap(), 0, "not new after a restart");
        assert_eq!(outbox.stats().last_sequence, 1);
        // Another boot clears it.
        let r = Reporter::open(outbox.clone(), "boot-2").unwrap();
        r.declare(&def(Clear::Reboot));
        let clear = r.due_clearings(SystemTime::now());
        assert_eq!(clear.len(), 1);
        assert_eq!(r.report_blocking(&clear, &[]).unwrap(), 1);
        assert!(r.open_conditions().is_empty());
    }

    #[test]
    fn a_condition_clears_after_its_time_without_recurrence() {
        let t = tempfile::tempdir().unwrap();
        let r = Reporter::open(Outbox::open(t.path(), 1 << 20).unwrap(), "b").unwrap();
        r.declare(&def(Clear::After(Duration::from_secs(600))));
        r.report_blocking(&[cond(ConditionStatus::True)], &[]).unwrap();
        assert!(r.due_clearings(SystemTime::now() + Duration::from_secs(599)).is_empty());
        let c = r.due_clearings(SystemTime::now() + Duration::from_secs(601));
        assert_eq!(
            c[0].problem,
            Problem::Permanent { condition: "KernelDeadlock".into(), status: ConditionStatus::False }
        );
        assert_eq!(c[0].reason, "KernelHasNoDeadlock");
    }
}

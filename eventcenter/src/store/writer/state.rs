//! Small state kept beside the log (desired components, component status, permits, guards,
//! rollouts), each change written with the events that record it.

use nodekeeper_proto::v1::{Event, Fault};
use prost::Message;
use rusqlite::{OptionalExtension, params};

use super::Writer;
use crate::store::{FAULT_RESOLVED, NewEvent, NodeKey, Result, StoreError};

/// Small state kept beside the log (desired components, component status, permits, guards),
/// written with the events that record it.
pub(crate) enum ComponentsChange {
    Desired {
        cluster: String,
        target: String,
        specs: Vec<u8>,
    },
    Status {
        key: NodeKey,
        body: Vec<u8>,
    },
    /// Permits (granted, released or expired: `active` or not) and the events of the decisions.
    Permits {
        permits: Vec<(nodekeeper_proto::v1::Permit, bool)>,
        events: Vec<NewEvent>,
    },
    /// A remediation step on a fault: its event, and the fault's new state (0: unchanged).
    FaultAction {
        event: Box<NewEvent>,
        state: i32,
    },
    Guard {
        cluster: String,
        body: Vec<u8>,
        events: Vec<NewEvent>,
    },
    /// A rollout's new state, the events of its timeline, and the desired components it sets
    /// (target, encoded DesiredState) at one new generation.
    Rollout {
        name: String,
        cluster: String,
        body: Vec<u8>,
        events: Vec<NewEvent>,
        desired: Vec<(String, Vec<u8>)>,
    },
}

impl Writer {
    pub(super) fn components(&mut self, change: ComponentsChange, published: &mut Vec<Event>) -> Result<u64> {
        let now = nodekeeper_common::time::to_unix_ms(std::time::SystemTime::now());
        match change {
            ComponentsChange::Desired { cluster, target, specs } => self.set_desired(&cluster, &[(target, specs)]),
            ComponentsChange::Permits { permits, events } => {
                for (p, active) in permits {
                    let granted_ms =
                        p.granted_time.as_ref().map(nodekeeper_common::time::timestamp_to_unix_ms).unwrap_or(0);
                    self.conn
                        .prepare_cached(
                            "INSERT INTO permits (id, cluster, granted_ms, active, body) VALUES (?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT (id) DO UPDATE SET active = excluded.active, body = excluded.body",
                        )
                        .and_then(|mut s| s.execute(params![p.id, p.cluster, granted_ms, active, p.encode_to_vec()]))
                        .map_err(|e| self.err(e))?;
                }
                self.append(events, published).map(|_| 0)
            }
            ComponentsChange::Guard { cluster, body, events } => {
                self.conn
                    .execute(
                        "INSERT INTO guards (cluster, body) VALUES (?1, ?2) ON CONFLICT (cluster) DO UPDATE SET body = excluded.body",
                        rusqlite::params![cluster, body],
                    )
                    .map_err(|e| self.err(e))?;
                self.append(events, published).map(|_| 0)
            }
            ComponentsChange::Rollout { name, cluster, body, events, desired } => {
                let generation = if desired.is_empty() { 0 } else { self.set_desired(&cluster, &desired)? };
                self.conn
                    .prepare_cached(
                        "INSERT INTO rollouts (name, cluster, body) VALUES (?1, ?2, ?3)
                         ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                    )
                    .and_then(|mut s| s.execute(params![name, cluster, body]))
                    .map_err(|e| self.err(e))?;
                for a in self.append(events, published)? {
                    self.conn
                        .prepare_cached("INSERT OR IGNORE INTO rollout_events (name, cursor) VALUES (?1, ?2)")
                        .and_then(|mut s| s.execute(params![name, a.cursor as i64]))
                        .map_err(|e| self.err(e))?;
                }
                Ok(generation)
            }
            ComponentsChange::FaultAction { event, state } => {
                let fault_id = event.event.fault_id;
                let appended = self.append(vec![*event], published)?;
                let Some(a) = appended.first() else { return Ok(0) };
                // A resent step changes nothing; a resolved fault is not reopened.
                if !a.duplicate && state != 0 {
                    let body: Option<Vec<u8>> = self
                        .conn
                        .prepare_cached("SELECT body FROM faults WHERE id = ?1")
                        .and_then(|mut s| s.query_row([fault_id as i64], |r| r.get(0)).optional())
                        .map_err(|e| self.err(e))?;
                    if let Some(body) = body {
                        let mut fault = Fault::decode(body.as_slice())
                            .map_err(|e| StoreError::Corrupt { table: "faults", message: e.to_string() })?;
                        if fault.state != FAULT_RESOLVED {
                            fault.state = state;
                            self.save_fault(&fault)?;
                        }
                    }
                }
                Ok(a.cursor)
            }
            ComponentsChange::Status { key, body } => {
                self.conn
                    .execute(
                        "INSERT INTO component_status (cluster, node, updated_ms, body) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (cluster, node) DO UPDATE SET updated_ms = excluded.updated_ms, body = excluded.body",
                        rusqlite::params![key.cluster, key.node, now, body],
                    )
                    .map_err(|e| self.err(e))?;
                Ok(0)
            }
        }
    }

    /// Writes desired components of targets of a cluster at one new generation (returned).
    fn set_desired(&mut self, cluster: &str, rows: &[(String, Vec<u8>)]) -> Result<u64> {
        let generation: i64 = self
            .conn
            .query_row(
                "SELECT COALESCE((SELECT value FROM meta WHERE key = 'components_generation'), 0) + 1",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('components_generation', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [generation],
            )
            .map_err(|e| self.err(e))?;
        for (target, specs) in rows {
            self.conn
                .prepare_cached(
                    "INSERT INTO desired_components (cluster, target, generation, specs) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (cluster, target) DO UPDATE SET generation = excluded.generation, specs = excluded.specs",
                )
                .and_then(|mut s| s.execute(params![cluster, target, generation, specs]))
                .map_err(|e| self.err(e))?;
        }
        Ok(generation as u64)
    }
}

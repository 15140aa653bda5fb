//! The small state beside the log on PostgreSQL (desired components, component status, permits,
//! guards, rollouts, a remediation step's fault state), each change written with its events in
//! the group's transaction, as the SQLite writer does.

use std::time::SystemTime;

use nodekeeper_common::time::{timestamp_to_unix_ms, to_unix_ms};
use nodekeeper_proto::v1::{Fault, FaultState};

use super::faults::save_fault;
use super::{GroupError, Log, decode};
use crate::store::StoreError;
use crate::store::postgres::pg;
use crate::store::writer::ComponentsChange;

/// Applies `change`; what the SQLite writer answers for it (a generation, a cursor, or 0).
pub(super) async fn apply<'a>(log: &mut Log<'_, 'a>, change: &'a ComponentsChange) -> Result<u64, GroupError> {
    Ok(match change {
        ComponentsChange::Desired { cluster, target, specs } => {
            set_desired(log, cluster, &[(target.clone(), specs.clone())]).await?
        }
        ComponentsChange::Status { key, body } => {
            log.tx
                .execute(
                    "INSERT INTO component_status (cluster, node, updated_ms, body) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (cluster, node) DO UPDATE SET updated_ms = excluded.updated_ms, body = excluded.body",
                    &[&key.cluster, &key.node, &to_unix_ms(SystemTime::now()), body],
                )
                .await
                .map_err(pg)?;
            0
        }
        ComponentsChange::Permits { permits, events } => {
            for (p, active) in permits {
                let granted_ms = p.granted_time.as_ref().map(timestamp_to_unix_ms).unwrap_or(0);
                log.tx
                    .execute(
                        "INSERT INTO permits (id, cluster, granted_ms, active, body) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (id) DO UPDATE SET active = excluded.active, body = excluded.body",
                        &[&p.id, &p.cluster, &granted_ms, active, &prost::Message::encode_to_vec(p)],
                    )
                    .await
                    .map_err(pg)?;
            }
            log.append_events(events).await?;
            0
        }
        ComponentsChange::Guard { cluster, body, events } => {
            log.tx
                .execute(
                    "INSERT INTO guards (cluster, body) VALUES ($1, $2) ON CONFLICT (cluster) DO UPDATE SET body = excluded.body",
                    &[cluster, body],
                )
                .await
                .map_err(pg)?;
            log.append_events(events).await?;
            0
        }
        ComponentsChange::Rollout { name, cluster, body, events, desired } => {
            let generation = if desired.is_empty() { 0 } else { set_desired(log, cluster, desired).await? };
            log.tx
                .execute(
                    "INSERT INTO rollouts (name, cluster, body) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                    &[name, cluster, body],
                )
                .await
                .map_err(pg)?;
            let cursors: Vec<i64> = log.append_events(events).await?.iter().map(|a| a.cursor as i64).collect();
            log.tx
                .execute(
                    "INSERT INTO rollout_events (name, cursor) SELECT $1, unnest($2::bigint[]) ON CONFLICT DO NOTHING",
                    &[name, &cursors],
                )
                .await
                .map_err(pg)?;
            generation
        }
        ComponentsChange::FaultAction { event, state } => {
            let fault_id = event.event.fault_id as i64;
            let appended = log.append_events(std::slice::from_ref(event)).await?;
            let Some(a) = appended.first() else { return Ok(0) };
            // A resent step changes nothing; a resolved fault is not reopened.
            if !a.duplicate && *state != 0 {
                let row = log.tx.query_opt("SELECT body FROM faults WHERE id = $1", &[&fault_id]).await.map_err(pg)?;
                if let Some(row) = row {
                    let mut fault: Fault = decode("faults", row.get(0))?;
                    if fault.state != FaultState::Resolved as i32 {
                        fault.state = *state;
                        save_fault(log.tx, &fault).await?;
                    }
                }
            }
            a.cursor
        }
    })
}

/// Writes desired components of targets of a cluster at one new generation (returned). The
/// sequence is read under the log head's lock, so generations grow in commit order.
async fn set_desired(log: &Log<'_, '_>, cluster: &str, rows: &[(String, Vec<u8>)]) -> Result<u64, StoreError> {
    let generation: i64 = log.tx.query_one("SELECT nextval('components_generation')", &[]).await.map_err(pg)?.get(0);
    for (target, specs) in rows {
        log.tx
            .execute(
                "INSERT INTO desired_components (cluster, target, generation, specs) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (cluster, target) DO UPDATE SET generation = excluded.generation, specs = excluded.specs",
                &[&cluster, target, &generation, specs],
            )
            .await
            .map_err(pg)?;
    }
    Ok(generation as u64)
}

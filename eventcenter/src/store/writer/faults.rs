//! Conditions folded into faults on SQLite, in the group's transaction (`store::fold` decides).

use nodekeeper_proto::v1::{Condition, Event, Fault, NodeCondition};
use prost::Message;
use rusqlite::{OptionalExtension, params};

use super::Writer;
use crate::store::fold::FaultChange;
use crate::store::{Result, StoreError};

impl Writer {
    /// Folds a condition event into its fault (one per node and condition type while open) and
    /// records the node's latest condition state. Sets `event.fault_id` and the condition's transition
    /// time (the center's: it moves only when the status does).
    pub(super) fn fold_condition(&self, event: &mut Event, cursor: u64) -> Result<()> {
        let Some(kind) = event.condition.as_ref().map(|c| c.r#type.clone()) else { return Ok(()) };
        let before = self.condition(&event.cluster, &event.node, &kind)?;
        let open = self.open_fault(&event.cluster, &event.node, &kind)?;
        let Some(folded) = crate::store::fold::fold(event, before, open, cursor) else { return Ok(()) };
        self.conn
            .prepare_cached(
                "INSERT INTO conditions (cluster, node, type, body) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (cluster, node, type) DO UPDATE SET body = excluded.body",
            )
            .and_then(|mut s| s.execute(params![event.cluster, event.node, kind, folded.condition.encode_to_vec()]))
            .map_err(|e| self.err(e))?;
        match folded.fault {
            FaultChange::Open(mut fault) => {
                let id: i64 = self
                    .conn
                    .prepare_cached(
                        "INSERT INTO faults (cluster, node, type, state, body) VALUES (?1, ?2, ?3, ?4, x'') RETURNING id",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![fault.cluster, fault.node, fault.r#type, fault.state], |r| r.get(0))
                    })
                    .map_err(|e| self.err(e))?;
                fault.id = id as u64;
                self.save_fault(&fault)?;
                event.fault_id = fault.id;
            }
            FaultChange::Update(fault) => self.save_fault(&fault)?,
            FaultChange::None => {}
        }
        Ok(())
    }

    /// The node's stored condition of type `kind`.
    fn condition(&self, cluster: &str, node: &str, kind: &str) -> Result<Option<Condition>> {
        let body: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT body FROM conditions WHERE cluster = ?1 AND node = ?2 AND type = ?3")
            .and_then(|mut s| s.query_row(params![cluster, node, kind], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        let decoded = body.map(|b| NodeCondition::decode(b.as_slice()));
        let stored =
            decoded.transpose().map_err(|e| StoreError::Corrupt { table: "conditions", message: e.to_string() })?;
        Ok(stored.and_then(|c| c.condition))
    }

    fn open_fault(&self, cluster: &str, node: &str, kind: &str) -> Result<Option<Fault>> {
        let body: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT body FROM faults WHERE cluster = ?1 AND node = ?2 AND type = ?3 AND state <> 4")
            .and_then(|mut s| s.query_row(params![cluster, node, kind], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        body.map(|b| {
            Fault::decode(b.as_slice()).map_err(|e| StoreError::Corrupt { table: "faults", message: e.to_string() })
        })
        .transpose()
    }

    pub(super) fn save_fault(&self, fault: &Fault) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE faults SET state = ?2, body = ?3 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![fault.id as i64, fault.state, fault.encode_to_vec()]))
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

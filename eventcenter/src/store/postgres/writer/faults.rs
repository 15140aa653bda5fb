//! Conditions folded into faults inside a group's transaction, and faults saved.

use nodekeeper_proto::v1::{Event, Fault, NodeCondition};
use tokio_postgres::Client;

use super::{decode, pg};
use crate::store::StoreError;
use crate::store::fold::{FaultChange, fold};

/// Folds a condition event into the node's condition and its fault (see `store::fold`), in the
/// group's transaction: under the head's lock, so replicas fold one after another.
pub(super) async fn fold_condition(tx: &Client, event: &mut Event, cursor: i64) -> Result<(), StoreError> {
    let Some(kind) = event.condition.as_ref().map(|c| c.r#type.clone()) else { return Ok(()) };
    let key: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&event.cluster, &event.node, &kind];
    let before = tx
        .query_opt("SELECT body FROM conditions WHERE cluster = $1 AND node = $2 AND type = $3", &key)
        .await
        .map_err(pg)?
        .map(|r| decode::<NodeCondition>("conditions", r.get(0)))
        .transpose()?
        .and_then(|c| c.condition);
    let open = tx
        .query_opt("SELECT body FROM faults WHERE cluster = $1 AND node = $2 AND type = $3 AND state <> 4", &key)
        .await
        .map_err(pg)?
        .map(|r| decode::<Fault>("faults", r.get(0)))
        .transpose()?;
    let Some(folded) = fold(event, before, open, cursor as u64) else { return Ok(()) };
    tx.execute(
        "INSERT INTO conditions (cluster, node, type, body) VALUES ($1, $2, $3, $4)
         ON CONFLICT (cluster, node, type) DO UPDATE SET body = excluded.body",
        &[&event.cluster, &event.node, &kind, &prost::Message::encode_to_vec(&folded.condition)],
    )
    .await
    .map_err(pg)?;
    match folded.fault {
        FaultChange::Open(mut fault) => {
            let row = tx
                .query_one(
                    "INSERT INTO faults (cluster, node, type, state, body) VALUES ($1, $2, $3, $4, '') RETURNING id",
                    &[&fault.cluster, &fault.node, &fault.r#type, &fault.state],
                )
                .await
                .map_err(pg)?;
            fault.id = row.get::<_, i64>(0) as u64;
            save_fault(tx, &fault).await?;
            event.fault_id = fault.id;
        }
        FaultChange::Update(fault) => save_fault(tx, &fault).await?,
        FaultChange::None => {}
    }
    Ok(())
}

pub(super) async fn save_fault(tx: &Client, fault: &Fault) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE faults SET state = $2, body = $3 WHERE id = $1",
        &[&(fault.id as i64), &fault.state, &prost::Message::encode_to_vec(fault)],
    )
    .await
    .map(drop)
    .map_err(pg)
}

//! A node's life on PostgreSQL, in the group's transaction (see `store::lifecycle` for what each
//! change does; this only reads and writes). Each is idempotent by the state it finds, so a group
//! retried after a lost connection records nothing twice.

use std::time::{Duration, SystemTime};

use nodekeeper_common::time::to_unix_ms;
use nodekeeper_proto::v1::{Fault, Node};

use super::{GroupError, Log, decode};
use crate::store::postgres::pg;
use crate::store::writer::{NodeChange, NodeChanged};
use crate::store::{HelloOutcome, NodeHello, NodeKey, StoreError, lifecycle, merged_labels};

/// An agent's hello: the node stored, its events, where its boot's events stand. A stream's
/// hello makes this replica the node's owner (the one watching its liveness); a new owner counts
/// its streams afresh, since those on the previous owner end with no word from it.
pub(super) async fn hello(log: &mut Log<'_, '_>, hello: &NodeHello) -> Result<HelloOutcome, GroupError> {
    let now = SystemTime::now();
    let key = NodeKey { cluster: hello.cluster.clone(), node: hello.node.clone() };
    let previous = stored_node(log, &key).await?;
    let was_lost = log
        .tx
        .query_opt("SELECT lost FROM nodes WHERE cluster = $1 AND name = $2", &[&key.cluster, &key.node])
        .await
        .map_err(pg)?
        .is_some_and(|r| r.get(0));
    let (info, events) = lifecycle::registered(previous.as_ref(), hello, now);
    log.center_events(events).await?;
    let owner = log.center.replica();
    log.tx
        .execute(
            "INSERT INTO nodes AS n (cluster, name, lost, liveness_changed_ms, info, owner, connections)
             VALUES ($1, $2, FALSE, $3, $4, $5, CASE WHEN $6 THEN 1 ELSE 0 END)
             ON CONFLICT (cluster, name) DO UPDATE SET info = excluded.info, decommissioned_ms = NULL,
                 owner = CASE WHEN $6 THEN excluded.owner ELSE n.owner END,
                 connections = CASE WHEN NOT $6 THEN n.connections
                                    WHEN n.owner IS DISTINCT FROM excluded.owner THEN 1
                                    ELSE n.connections + 1 END",
            &[
                &hello.cluster,
                &hello.node,
                &to_unix_ms(now),
                &prost::Message::encode_to_vec(&info),
                &owner,
                &hello.opens_stream,
            ],
        )
        .await
        .map_err(pg)?;
    // The agent's events this group appended were inserted before (flushed).
    let origin = crate::store::agent_origin(&hello.cluster, &hello.node, &hello.boot_id);
    let last: i64 = log
        .tx
        .query_one(
            "SELECT COALESCE(MAX(origin_seq), 0) FROM events WHERE origin = (SELECT id FROM origins WHERE key = $1)",
            &[&origin.to_string()],
        )
        .await
        .map_err(pg)?
        .get(0);
    Ok(HelloOutcome { last_stored_sequence: last as u64, labels: merged_labels(&info), was_lost })
}

/// A liveness transition, recorded only if it changes the node (a retried group, or two
/// replicas deciding at once, record it once). A loss is recorded only by the node's owner:
/// whether this replica still watches the node.
pub(super) async fn liveness(
    log: &mut Log<'_, '_>,
    key: &NodeKey,
    lost: bool,
    grace: Duration,
) -> Result<bool, GroupError> {
    let now = SystemTime::now();
    let owner = log.center.replica();
    let row = log
        .tx
        .query_opt(
            "SELECT lost, owner FROM nodes WHERE cluster = $1 AND name = $2 FOR UPDATE",
            &[&key.cluster, &key.node],
        )
        .await
        .map_err(pg)?;
    let Some(row) = row else { return Ok(false) };
    let (was_lost, mine) = (row.get::<_, bool>(0), row.get::<_, Option<String>>(1).as_deref() == Some(owner.as_str()));
    if lost && !mine {
        return Ok(false);
    }
    if was_lost != lost {
        log.tx
            .execute(
                "UPDATE nodes SET lost = $3, liveness_changed_ms = $4 WHERE cluster = $1 AND name = $2",
                &[&key.cluster, &key.node, &lost, &to_unix_ms(now)],
            )
            .await
            .map_err(pg)?;
        log.center_events(vec![lifecycle::liveness_event(key, lost, grace, now)]).await?;
    }
    Ok(mine)
}

/// One of the node's streams on this replica ended (nothing if another replica owns it now).
pub(super) async fn disconnected(log: &mut Log<'_, '_>, key: &NodeKey) -> Result<(), GroupError> {
    log.tx
        .execute(
            "UPDATE nodes SET connections = GREATEST(connections - 1, 0)
             WHERE cluster = $1 AND name = $2 AND owner = $3",
            &[&key.cluster, &key.node, &log.center.replica()],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

/// What Kubernetes says of a node, or its decommissioning; `None` if the node is unknown.
pub(super) async fn change(log: &mut Log<'_, '_>, change: &NodeChange) -> Result<Option<NodeChanged>, GroupError> {
    Ok(Some(match change {
        NodeChange::Kubernetes { key, labels, onboarding, onboarded, issuer } => {
            let Some(mut info) = stored_node(log, key).await? else { return Ok(None) };
            let before = merged_labels(&info);
            let now = SystemTime::now();
            let Some(events) = lifecycle::kubernetes(&mut info, labels.clone(), *onboarding, *onboarded, issuer, now)
            else {
                return Ok(Some(NodeChanged::default()));
            };
            save_node(log, &info).await?;
            let cursor = log.center_events(events).await?;
            let after = merged_labels(&info);
            let labels = (after != before).then_some(after);
            NodeChanged { changed: true, cursor, labels, ..Default::default() }
        }
        NodeChange::Decommission { key, reason, issuer } => {
            let Some(mut info) = stored_node(log, key).await? else { return Ok(None) };
            if info.decommissioned_time.is_some() {
                return Ok(Some(NodeChanged::default()));
            }
            let now = SystemTime::now();
            let open = log
                .tx
                .query(
                    "SELECT body FROM faults WHERE cluster = $1 AND node = $2 AND state <> 4 ORDER BY id",
                    &[&key.cluster, &key.node],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|r| decode::<Fault>("faults", r.get(0)))
                .collect::<Result<Vec<_>, _>>()?;
            let (closed, event) = lifecycle::decommissioned(&mut info, open, reason, issuer, now);
            for fault in &closed {
                super::faults::save_fault(log.tx, fault).await?;
            }
            save_node(log, &info).await?;
            log.tx
                .execute(
                    "UPDATE nodes SET lost = FALSE, liveness_changed_ms = $3, decommissioned_ms = $3
                     WHERE cluster = $1 AND name = $2",
                    &[&key.cluster, &key.node, &to_unix_ms(now)],
                )
                .await
                .map_err(pg)?;
            let cursor = log.center_events(vec![event]).await?;
            NodeChanged { changed: true, faults_closed: closed.len() as u32, cursor, labels: None }
        }
    }))
}

/// The stored node.
async fn stored_node(log: &Log<'_, '_>, key: &NodeKey) -> Result<Option<Node>, StoreError> {
    let row = log
        .tx
        .query_opt("SELECT info FROM nodes WHERE cluster = $1 AND name = $2", &[&key.cluster, &key.node])
        .await
        .map_err(pg)?;
    row.map(|r| decode::<Node>("nodes", r.get(0))).transpose()
}

async fn save_node(log: &Log<'_, '_>, info: &Node) -> Result<(), StoreError> {
    log.tx
        .execute(
            "UPDATE nodes SET info = $3 WHERE cluster = $1 AND name = $2",
            &[&info.cluster, &info.name, &prost::Message::encode_to_vec(info)],
        )
        .await
        .map(drop)
        .map_err(pg)
}

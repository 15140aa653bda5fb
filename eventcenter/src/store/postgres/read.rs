//! Reads beside the log, durable consumers and retention on PostgreSQL.

use std::time::SystemTime;

use nodekeeper_common::time::to_unix_ms;
use nodekeeper_proto::v1::Event;

use super::{PgStore, pg};
use crate::store::{Result, StoreError};

impl PgStore {
    /// Up to `limit` events after `after`, in cursor order.
    pub async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        read_after(&self.readers, after, limit).await
    }

    pub(super) async fn reader(&self) -> Result<deadpool_postgres::Object> {
        self.readers.get().await.map_err(|e| StoreError::Postgres { message: e.to_string() })
    }

    /// Every cursor up to this one was removed by retention.
    pub async fn floor(&self) -> Result<u64> {
        let row = self.reader().await?.query_one("SELECT floor FROM log_head", &[]).await.map_err(pg)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Up to `limit` events about one node with a cursor below `before`, newest first.
    pub async fn node_events_before(&self, cluster: &str, node: &str, before: u64, limit: usize) -> Result<Vec<Event>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT cursor, body FROM events
                 WHERE node_ref = (SELECT id FROM origins WHERE key = $1) AND cursor < $2
                 ORDER BY cursor DESC LIMIT $3",
                &[&crate::store::node_origin(cluster, node), &(before.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(event_of).collect()
    }

    /// Creates the durable consumer at `position` unless it exists; its acknowledged cursor.
    pub async fn ensure_consumer(&self, name: &str, position: u64) -> Result<u64> {
        let row = self
            .reader()
            .await?
            .query_one(
                "INSERT INTO consumers AS c (name, acked_cursor, updated_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET name = c.name RETURNING acked_cursor",
                &[&name, &(position as i64), &to_unix_ms(SystemTime::now())],
            )
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Moves a consumer's position forward (never back); whether it exists.
    pub async fn ack_consumer(&self, name: &str, cursor: u64) -> Result<bool> {
        let n = self
            .reader()
            .await?
            .execute(
                "UPDATE consumers SET acked_cursor = GREATEST(acked_cursor, $2), updated_ms = $3 WHERE name = $1",
                &[&name, &(cursor as i64), &to_unix_ms(SystemTime::now())],
            )
            .await
            .map_err(pg)?;
        Ok(n > 0)
    }

    pub async fn delete_consumer(&self, name: &str) -> Result<bool> {
        let n = self.reader().await?.execute("DELETE FROM consumers WHERE name = $1", &[&name]).await.map_err(pg)?;
        Ok(n > 0)
    }

    /// Every consumer, with its lag behind the head.
    pub async fn list_consumers(&self) -> Result<Vec<nodekeeper_proto::v1::Consumer>> {
        let head = self.head();
        let rows = self
            .reader()
            .await?
            .query("SELECT name, acked_cursor, updated_ms FROM consumers ORDER BY name", &[])
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| {
                let acked = r.get::<_, i64>(1) as u64;
                nodekeeper_proto::v1::Consumer {
                    name: r.get(0),
                    acked_cursor: acked.to_string(),
                    updated_time: Some(nodekeeper_common::time::timestamp_from_unix_ms(r.get(2))),
                    lag: head.saturating_sub(acked),
                    owner: String::new(),
                }
            })
            .collect())
    }

    /// Removes at most `max_rows` of the oldest events received before `cutoff_ms` (a prefix:
    /// receive times never go back along the log) and raises the floor; how many. Taken under the
    /// head's lock like an append, so replicas running it at once remove each event once.
    pub async fn retain(&self, cutoff_ms: i64, max_rows: usize) -> Result<u64> {
        let mut client = self.reader().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let floor: i64 = tx.query_one("SELECT floor FROM log_head FOR UPDATE", &[]).await.map_err(pg)?.get(0);
        let last: Option<i64> = tx
            .query_one(
                "SELECT MAX(cursor) FROM (SELECT cursor FROM events WHERE cursor > $1 AND received_ms < $2
                 ORDER BY cursor LIMIT $3) AS expired",
                &[&floor, &cutoff_ms, &(max_rows as i64)],
            )
            .await
            .map_err(pg)?
            .get(0);
        let Some(last) = last else { return Ok(0) };
        let deleted =
            tx.execute("DELETE FROM events WHERE cursor > $1 AND cursor <= $2", &[&floor, &last]).await.map_err(pg)?;
        tx.execute("UPDATE log_head SET floor = $1", &[&last]).await.map_err(pg)?;
        // Raised before the commit, as on SQLite: a reader that sees the new floor early refuses
        // a cursor about to become unreadable, the safe direction.
        self.floor.fetch_max(last as u64, std::sync::atomic::Ordering::AcqRel);
        tx.commit().await.map_err(pg)?;
        Ok(deleted)
    }
}

pub(super) fn event_of(r: &tokio_postgres::Row) -> Result<Event> {
    let mut event: Event = decode("events", r.get(1))?;
    event.cursor = r.get::<_, i64>(0).to_string();
    Ok(event)
}

pub(super) fn decode<M: prost::Message + Default>(table: &'static str, body: &[u8]) -> Result<M> {
    M::decode(body).map_err(|e| StoreError::Corrupt { table, message: e.to_string() })
}

/// Up to `limit` events after `after`, in cursor order.
pub(super) async fn read_after(pool: &deadpool_postgres::Pool, after: u64, limit: usize) -> Result<Vec<Event>> {
    let reader = pool.get().await.map_err(|e| StoreError::Postgres { message: e.to_string() })?;
    // Prepared once per connection: the live feed and subscribers read often.
    let statement = reader
        .prepare_cached("SELECT cursor, body FROM events WHERE cursor > $1 ORDER BY cursor LIMIT $2")
        .await
        .map_err(pg)?;
    let rows = reader.query(&statement, &[&(after as i64), &(limit as i64)]).await.map_err(pg)?;
    rows.iter().map(event_of).collect()
}

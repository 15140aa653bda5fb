//! The durable outbox: every observation is written here (SQLite, WAL, `synchronous=FULL`) before
//! it is sent, and deleted only when the center acknowledged it. It survives agent restarts,
//! `kill -9` included, and center outages of hours.
//!
//! Sequence numbers are assigned here and never reused: the last one is kept in `meta`, so they
//! continue after a restart even when the outbox is empty.
//!
//! The outbox is bounded by `max_bytes`. When a new observation does not fit, the oldest
//! observations of the lowest severity are dropped first; condition transitions (open/close) are
//! never dropped, even if that means going over the bound. The number dropped is kept and reported.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nodekeeper_proto::v1::Observation;
use prost::Message;
use rusqlite::{Connection, params};
use thiserror::Error;
use tokio::sync::Notify;

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("outbox {path}: {message}")]
    Sqlite { path: PathBuf, message: String },
    #[error("outbox {path}: corrupt entry {seq}: {message}")]
    Corrupt { path: PathBuf, seq: u64, message: String },
}

type Result<T> = std::result::Result<T, OutboxError>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY,
    severity   INTEGER NOT NULL,
    transition INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    body       BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_droppable ON outbox (severity, seq) WHERE transition = 0;
-- Monitor state (open conditions, log positions), written in the same transaction as the
-- observations it goes with.
CREATE TABLE IF NOT EXISTS state (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Counters describing the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub depth: u64,
    pub bytes: u64,
    pub dropped_total: u64,
    pub last_sequence: u64,
    /// Highest sequence the center acknowledged.
    pub acked_upto: u64,
}

struct Inner {
    conn: Connection,
    stats: Stats,
}

#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Mutex<Inner>>,
    path: PathBuf,
    max_bytes: u64,
    /// Woken when something is pushed.
    pub pushed: Arc<Notify>,
}

impl Outbox {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Outbox> {
        let path = dir.join("outbox.db");
        let err = |e: rusqlite::Error| OutboxError::Sqlite { path: path.clone(), message: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| OutboxError::Sqlite {
            path: path.clone(),
            message: format!("creating {}: {e}", dir.display()),
        })?;
        let conn = Connection::open(&path).map_err(err)?;
        // A small page cache: the agent must stay within a few MiB.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -256;")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let (depth, bytes, max_seq): (i64, i64, i64) = conn
            .query_row("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(err)?;
        let meta = |key: &str| -> Result<u64> {
            conn.query_row("SELECT COALESCE((SELECT value FROM meta WHERE key = ?1), 0)", [key], |r| r.get::<_, i64>(0))
                .map(|v| v as u64)
                .map_err(err)
        };
        let stats = Stats {
            depth: depth as u64,
            bytes: bytes as u64,
            dropped_total: meta("dropped_total")?,
            last_sequence: meta("last_sequence")?.max(max_seq as u64),
            acked_upto: meta("acked_upto")?,
        };
        Ok(Outbox {
            inner: Arc::new(Mutex::new(Inner { conn, stats })),
            path,
            max_bytes,
            pushed: Arc::new(Notify::new()),
        })
    }

    fn err(&self, e: rusqlite::Error) -> OutboxError {
        OutboxError::Sqlite { path: self.path.clone(), message: e.to_string() }
    }

    pub fn stats(&self) -> Stats {
        self.inner.lock().expect("outbox lock").stats
    }

    /// Assigns sequence numbers, stores the observations durably (one fsync), enforces the bound,
    /// and returns the sequences. Blocking: call from a blocking context.
    pub fn push_blocking(&self, observations: Vec<Observation>) -> Result<Vec<u64>> {
        self.push_inner(observations, &[], false, true)
    }

    /// Like `push_blocking`, and in the same transaction sets (Some) or deletes (None) state
    /// entries: a monitor's condition state or log position never disagrees with what was sent.
    pub fn push_with_state_blocking(
        &self,
        observations: Vec<Observation>,
        state: &[(String, Option<Vec<u8>>)],
    ) -> Result<Vec<u64>> {
        self.push_inner(observations, state, false, true)
    }

    /// The state entries whose key starts with `prefix`.
    pub fn state_blocking(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let inner = self.inner.lock().expect("outbox lock");
        let mut q = inner
            .conn
            .prepare_cached("SELECT key, value FROM state WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key")
            .map_err(|e| self.err(e))?;
        let rows = q.query_map([prefix], |r| Ok((r.get(0)?, r.get(1)?))).map_err(|e| self.err(e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// `keep`: store as never droppable, like a condition transition. `evict`: make room by
    /// dropping others when over the bound.
    fn push_inner(
        &self,
        mut observations: Vec<Observation>,
        state: &[(String, Option<Vec<u8>>)],
        keep: bool,
        evict: bool,
    ) -> Result<Vec<u64>> {
        let mut inner = self.inner.lock().expect("outbox lock");
        let Inner { conn, stats } = &mut *inner;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for (key, value) in state {
            match value {
                Some(v) => tx.execute(
                    "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, v],
                ),
                None => tx.execute("DELETE FROM state WHERE key = ?1", [key]),
            }
            .map_err(|e| self.err(e))?;
        }
        let mut seqs = Vec::with_capacity(observations.len());
        let mut added_bytes = 0;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO outbox (seq, severity, transition, size, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(|e| self.err(e))?;
            for (i, o) in observations.iter_mut().enumerate() {
                o.sequence = stats.last_sequence + 1 + i as u64;
                let body = o.encode_to_vec();
                added_bytes += body.len() as u64;
                insert
                    .execute(params![
                        o.sequence as i64,
                        o.severity,
                        keep || o.condition.is_some(),
                        body.len() as i64,
                        body
                    ])
                    .map_err(|e| self.err(e))?;
                seqs.push(o.sequence);
            }
        }
        let last = stats.last_sequence + observations.len() as u64;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('last_sequence', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [last as i64],
        )
        .map_err(|e| self.err(e))?;
        // Make room: oldest of the lowest severity first, never a condition transition.
        let mut bytes = stats.bytes + added_bytes;
        let mut dropped = 0u64;
        let mut freed_depth = 0u64;
        if evict && bytes > self.max_bytes {
            let victims: Vec<(i64, i64)> = {
                let mut q = tx
                    .prepare_cached("SELECT seq, size FROM outbox WHERE transition = 0 ORDER BY severity, seq")
                    .map_err(|e| self.err(e))?;
                let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(|e| self.err(e))?;
                let mut v = Vec::new();
                for row in rows {
                    if bytes <= self.max_bytes {
                        break;
                    }
                    let (seq, size): (i64, i64) = row.map_err(|e| self.err(e))?;
                    bytes -= size as u64;
                    v.push((seq, size));
                }
                v
            };
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1").map_err(|e| self.err(e))?;
            for (seq, _) in &victims {
                del.execute([seq]).map_err(|e| self.err(e))?;
            }
            drop(del);
            dropped = victims.len() as u64;
            freed_depth = dropped;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('dropped_total', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(stats.dropped_total + dropped) as i64],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        stats.last_sequence = last;
        stats.bytes = bytes;
        stats.depth = stats.depth + observations.len() as u64 - freed_depth;
        stats.dropped_total += dropped;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                dropped_total = stats.dropped_total,
                "outbox full: dropped the oldest low-severity observations"
            );
        }
        drop(inner);
        if !seqs.is_empty() {
            self.pushed.notify_one();
        }
        Ok(seqs)
    }

    /// If observations were dropped since the last report, stores one `OutboxOverflow`
    /// observation saying how many (never dropped itself) and returns the count. Called when a
    /// connection to the center opens, so the center learns of every drop once.
    pub fn report_drops_blocking(&self) -> Result<Option<u64>> {
        let reported = {
            let inner = self.inner.lock().expect("outbox lock");
            inner
                .conn
                .query_row("SELECT COALESCE((SELECT value FROM meta WHERE key = 'reported_dropped'), 0)", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(|e| self.err(e))? as u64
        };
        let total = self.stats().dropped_total;
        if total <= reported {
            return Ok(None);
        }
        let delta = total - reported;
        let mut o = Observation {
            time: Some(nodekeeper_common::time::now_timestamp()),
            r#type: "OutboxOverflow".into(),
            message: format!("the outbox was full: {delta} low-severity observations were dropped ({total} in all)"),
            severity: nodekeeper_proto::v1::Severity::Warning as i32,
            category: nodekeeper_proto::v1::Category::Resource as i32,
            source: "agent".into(),
            ..Default::default()
        };
        o.attributes.insert("dropped".into(), delta.to_string());
        o.attributes.insert("dropped_total".into(), total.to_string());
        // Kept and evicting nothing: the report of drops must not cause drops it does not count.
        self.push_inner(vec![o], &[], true, false)?;
        let inner = self.inner.lock().expect("outbox lock");
        inner
            .conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('reported_dropped', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [total as i64],
            )
            .map_err(|e| self.err(e))?;
        Ok(Some(delta))
    }

    /// Stores observations from async code.
    pub async fn push(&self, observations: Vec<Observation>) -> Result<Vec<u64>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.push_blocking(observations))
            .await
            .map_err(|e| OutboxError::Sqlite { path: self.path.clone(), message: format!("push task failed: {e}") })?
    }

    /// Up to `max` stored observations with a sequence above `after`, in order.
    pub async fn pending(&self, after: u64, max: usize) -> Result<Vec<Observation>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.pending_blocking(after, max))
            .await
            .map_err(|e| OutboxError::Sqlite { path: self.path.clone(), message: format!("read task failed: {e}") })?
    }

    pub fn pending_blocking(&self, after: u64, max: usize) -> Result<Vec<Observation>> {
        let inner = self.inner.lock().expect("outbox lock");
        let mut q = inner
            .conn
            .prepare_cached("SELECT seq, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![after as i64, max as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row.map_err(|e| self.err(e))?;
            let o = Observation::decode(body.as_slice()).map_err(|e| OutboxError::Corrupt {
                path: self.path.clone(),
                seq: seq as u64,
                message: e.to_string(),
            })?;
            out.push(o);
        }
        Ok(out)
    }

    /// Deletes the acknowledged observations with sequences in `first..=last`. Blocking.
    pub fn ack_blocking(&self, first: u64, last: u64) -> Result<u64> {
        let mut inner = self.inner.lock().expect("outbox lock");
        let Inner { conn, stats } = &mut *inner;
        let (n, size): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE seq BETWEEN ?1 AND ?2",
                params![first as i64, last as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        conn.execute("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2", params![first as i64, last as i64])
            .map_err(|e| self.err(e))?;
        if last > stats.acked_upto {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('acked_upto', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [last as i64],
            )
            .map_err(|e| self.err(e))?;
            stats.acked_upto = last;
        }
        stats.depth = stats.depth.saturating_sub(n as u64);
        stats.bytes = stats.bytes.saturating_sub(size as u64);
        Ok(n as u64)
    }

    pub async fn ack(&self, first: u64, last: u64) -> Result<u64> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.ack_blocking(first, last))
            .await
            .map_err(|e| OutboxError::Sqlite { path: self.path.clone(), message: format!("ack task failed: {e}") })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{Condition, ConditionStatus, Severity};

    fn obs(severity: Severity, transition: bool) -> Observation {
        Observation {
            r#type: "T".into(),
            message: "m".repeat(100),
            severity: severity as i32,
            condition: transition.then(|| Condition {
                r#type: "T".into(),
                status: ConditionStatus::True as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn sequences_continue_across_reopen_even_when_empty() {
        let t = tempfile::tempdir().unwrap();
        let o = Outbox::open(t.path(), 1 << 20).unwrap();
        assert_eq!(o.push_blocking(vec![obs(Severity::Info, false); 3]).unwrap(), vec![1, 2, 3]);
        assert_eq!(o.ack_blocking(1, 3).unwrap(), 3);
        assert_eq!(o.stats().depth, 0);
        drop(o);
        let o = Outbox::open(t.path(), 1 << 20).unwrap();
        assert_eq!(o.stats().acked_upto, 3, "the acknowledged position survives a restart");
        assert_eq!(o.push_blocking(vec![obs(Severity::Info, false)]).unwrap(), vec![4]);
        assert_eq!(o.pending_blocking(0, 10).unwrap().iter().map(|o| o.sequence).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn full_outbox_drops_oldest_low_severity_first_and_never_transitions() {
        let t = tempfile::tempdir().unwrap();
        let one = obs(Severity::Info, false).encode_to_vec().len() as u64 + 2; // sequence adds bytes
        let o = Outbox::open(t.path(), one * 6).unwrap();
        o.push_blocking(vec![obs(Severity::Error, false)]).unwrap(); // 1
        o.push_blocking(vec![obs(Severity::Info, true)]).unwrap(); // 2: a transition
        o.push_blocking(vec![obs(Severity::Info, false); 3]).unwrap(); // 3, 4, 5
        o.push_blocking(vec![obs(Severity::Warning, false); 3]).unwrap(); // 6, 7, 8: over the bound
        let kept: Vec<u64> = o.pending_blocking(0, 100).unwrap().iter().map(|o| o.sequence).collect();
        assert!(kept.contains(&2), "transitions are never dropped: {kept:?}");
        assert!(kept.contains(&1), "higher severity outlives lower: {kept:?}");
        assert!(!kept.contains(&3), "oldest info dropped first: {kept:?}");
        assert!(o.stats().bytes <= one * 6);
        assert!(o.stats().dropped_total >= 2);
        let dropped = o.stats().dropped_total;
        drop(o);
        // The count survives a restart.
        assert_eq!(Outbox::open(t.path(), one * 6).unwrap().stats().dropped_total, dropped);
    }

    #[test]
    fn transitions_alone_may_exceed_the_bound() {
        let t = tempfile::tempdir().unwrap();
        let o = Outbox::open(t.path(), 4096).unwrap();
        o.push_blocking(vec![obs(Severity::Info, true); 100]).unwrap();
        assert_eq!(o.stats().depth, 100);
        assert_eq!(o.stats().dropped_total, 0);
    }
}

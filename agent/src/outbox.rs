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
//!
//! An observation the center refuses (or one that no longer passes the contract's check, left by
//! an older agent version) leaves the outbox at once and is counted, durably, as rejected; the
//! count is reported as an observation of its own. Nothing stored can block what comes after it.
//!
//! When the agent's state is lost (a new outbox on a boot the center already heard from), the
//! outbox continues after the center's last stored sequence, so that new observations are never
//! taken for resends of old ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nodekeeper_common::observation;
use nodekeeper_proto::v1::{Observation, Rejection};
use prost::Message;
use rusqlite::{Connection, params};
use thiserror::Error;
use tokio::sync::Notify;

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("outbox {path}: {message}")]
    Sqlite { path: PathBuf, message: String },
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
    /// Observations the center refused, or that no longer pass the contract's check.
    pub rejected_total: u64,
}

/// Largest batch the outbox hands out, in encoded bytes (at least one observation): far below
/// any center's message limit, so that a batch is never refused for its size.
const MAX_BATCH_BYTES: usize = 1 << 20;

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
        let created = !path.exists();
        let conn = Connection::open(&path).map_err(err)?;
        // A small page cache: the agent must stay within a few MiB.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -256;")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        if created {
            // Until the first welcome: a new outbox on a boot the center knows means lost state.
            set_meta(&conn, "fresh", 1).map_err(err)?;
        }
        let (depth, bytes, max_seq): (i64, i64, i64) = conn
            .query_row("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(err)?;
        let meta = |key: &str| get_meta(&conn, key).map_err(err);
        let stats = Stats {
            depth: depth as u64,
            bytes: bytes as u64,
            dropped_total: meta("dropped_total")?,
            last_sequence: meta("last_sequence")?.max(max_seq as u64),
            acked_upto: meta("acked_upto")?,
            rejected_total: meta("rejected_total")?,
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
        self.push_inner(observations, &[], &[], false, true)
    }

    /// Like `push_blocking`, and in the same transaction sets (Some) or deletes (None) state
    /// entries: a monitor's condition state or log position never disagrees with what was sent.
    pub fn push_with_state_blocking(
        &self,
        observations: Vec<Observation>,
        state: &[(String, Option<Vec<u8>>)],
    ) -> Result<Vec<u64>> {
        self.push_inner(observations, state, &[], false, true)
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

    /// `meta`: counters set in the same transaction. `keep`: store as never droppable, like a
    /// condition transition. `evict`: make room by dropping others when over the bound.
    fn push_inner(
        &self,
        mut observations: Vec<Observation>,
        state: &[(String, Option<Vec<u8>>)],
        meta: &[(&str, u64)],
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
        for (key, value) in meta.iter().chain([&("last_sequence", last)]) {
            set_meta(&tx, key, *value).map_err(|e| self.err(e))?;
        }
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
            set_meta(&tx, "dropped_total", stats.dropped_total + dropped).map_err(|e| self.err(e))?;
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

    /// Reports what left the outbox unsent since the last report: observations dropped because
    /// it was full (`OutboxOverflow`) and observations the center refused (`ObservationsRejected`),
    /// each as one observation with the counts (never dropped itself, evicting nothing). Returns
    /// the counts newly reported. Called when a connection opens and after a refusal.
    pub fn report_losses_blocking(&self) -> Result<(u64, u64)> {
        let stats = self.stats();
        let dropped = self.report_count("reported_dropped", stats.dropped_total, |delta, total| {
            (
                "OutboxOverflow",
                format!("the outbox was full: {delta} low-severity observations were dropped ({total} in all)"),
                [("dropped", delta), ("dropped_total", total)],
            )
        })?;
        let rejected = self.report_count("reported_rejected", stats.rejected_total, |delta, total| {
            (
                "ObservationsRejected",
                format!(
                    "the event center refused {delta} observations as invalid ({total} in all); see the agent's log"
                ),
                [("rejected", delta), ("rejected_total", total)],
            )
        })?;
        Ok((dropped, rejected))
    }

    /// Stores one observation for the part of `total` above what meta entry `reported_key` says was
    /// reported, and moves `reported_key` up in the same transaction. Returns that part.
    fn report_count(
        &self,
        reported_key: &str,
        total: u64,
        describe: impl Fn(u64, u64) -> (&'static str, String, [(&'static str, u64); 2]),
    ) -> Result<u64> {
        let reported =
            get_meta(&self.inner.lock().expect("outbox lock").conn, reported_key).map_err(|e| self.err(e))?;
        if total <= reported {
            return Ok(0);
        }
        let delta = total - reported;
        let (kind, message, attributes) = describe(delta, total);
        let o = Observation {
            time: Some(nodekeeper_common::time::now_timestamp()),
            r#type: kind.into(),
            message,
            severity: nodekeeper_proto::v1::Severity::Warning as i32,
            category: nodekeeper_proto::v1::Category::Resource as i32,
            source: "agent".into(),
            attributes: attributes.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())).collect(),
            ..Default::default()
        };
        // Kept and evicting nothing: the report of losses must not cause losses it does not count.
        self.push_inner(vec![o], &[], &[(reported_key, total)], true, false)?;
        Ok(delta)
    }

    /// Stores observations from async code.
    pub async fn push(&self, observations: Vec<Observation>) -> Result<Vec<u64>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.push_blocking(observations))
            .await
            .map_err(|e| OutboxError::Sqlite { path: self.path.clone(), message: format!("push task failed: {e}") })?
    }

    /// Up to `max` stored observations with a sequence above `after`, in order, within
    /// `MAX_BATCH_BYTES`.
    pub async fn pending(&self, after: u64, max: usize) -> Result<Vec<Observation>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.pending_blocking(after, max))
            .await
            .map_err(|e| OutboxError::Sqlite { path: self.path.clone(), message: format!("read task failed: {e}") })?
    }

    /// Like `pending`. Entries that cannot be read or no longer pass the contract's check (left by
    /// an older agent version) are taken out as rejected instead of being handed out.
    pub fn pending_blocking(&self, after: u64, max: usize) -> Result<Vec<Observation>> {
        let mut inner = self.inner.lock().expect("outbox lock");
        loop {
            let mut out = Vec::new();
            let mut bad = Vec::new();
            {
                let mut q = inner
                    .conn
                    .prepare_cached("SELECT seq, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                    .map_err(|e| self.err(e))?;
                let rows = q
                    .query_map(params![after as i64, max as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })
                    .map_err(|e| self.err(e))?;
                let mut bytes = 0;
                for row in rows {
                    let (seq, body) = row.map_err(|e| self.err(e))?;
                    if !out.is_empty() && bytes + body.len() > MAX_BATCH_BYTES {
                        break;
                    }
                    let checked = Observation::decode(body.as_slice())
                        .map_err(|e| format!("unreadable outbox entry: {e}"))
                        .and_then(|mut o| {
                            // The column is the truth: sequences move when lost state is detected.
                            o.sequence = seq as u64;
                            observation::validate(&o).map(|()| o)
                        });
                    match checked {
                        Ok(o) => {
                            bytes += body.len();
                            out.push(o);
                        }
                        Err(reason) => bad.push(Rejection { sequence: seq as u64, reason }),
                    }
                }
            }
            if bad.is_empty() {
                return Ok(out);
            }
            self.remove(&mut inner, None, &bad)?;
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Deletes the observations the center acknowledged, `first..=last`, counting those it
    /// refused (`rejected`, within that range) as rejected. Blocking.
    pub fn ack_blocking(&self, first: u64, last: u64, rejected: &[Rejection]) -> Result<u64> {
        let mut inner = self.inner.lock().expect("outbox lock");
        self.remove(&mut inner, Some((first, last)), rejected)
    }

    /// Deletes `range` (acknowledged; or else only the `rejected` entries) in one transaction, adds
    /// `rejected` to the durable count and logs each with its reason. Returns how many entries
    /// were deleted.
    fn remove(&self, inner: &mut Inner, range: Option<(u64, u64)>, rejected: &[Rejection]) -> Result<u64> {
        let Inner { conn, stats } = inner;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let (mut n, mut size) = (0i64, 0i64);
        let ranges: Vec<(u64, u64)> = match range {
            Some(r) => vec![r],
            None => rejected.iter().map(|r| (r.sequence, r.sequence)).collect(),
        };
        for (first, last) in &ranges {
            let (count, bytes): (i64, i64) = tx
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE seq BETWEEN ?1 AND ?2",
                    params![*first as i64, *last as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(|e| self.err(e))?;
            tx.execute("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2", params![*first as i64, *last as i64])
                .map_err(|e| self.err(e))?;
            n += count;
            size += bytes;
        }
        let acked_upto = range.map_or(stats.acked_upto, |(_, last)| last.max(stats.acked_upto));
        let rejected_total = stats.rejected_total + rejected.len() as u64;
        set_meta(&tx, "acked_upto", acked_upto).map_err(|e| self.err(e))?;
        set_meta(&tx, "rejected_total", rejected_total).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        for r in rejected {
            tracing::warn!(sequence = r.sequence, reason = %r.reason, "observation rejected; it will not be sent again");
        }
        stats.acked_upto = acked_upto;
        stats.rejected_total = rejected_total;
        stats.depth = stats.depth.saturating_sub(n as u64);
        stats.bytes = stats.bytes.saturating_sub(size as u64);
        Ok(n as u64)
    }

    pub async fn ack(&self, first: u64, last: u64, rejected: Vec<Rejection>) -> Result<u64> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.ack_blocking(first, last, &rejected))
            .await
            .map_err(|e| OutboxError::Sqlite { path: self.path.clone(), message: format!("ack task failed: {e}") })?
    }

    /// Takes the center's welcome: when it holds a higher sequence for this boot than the outbox
    /// ever assigned, or this is a new outbox's first welcome on a boot the center already heard
    /// from, the agent's state was lost. Then every waiting observation is renumbered after the
    /// center's sequence, and so is everything after, so that nothing new is taken for a resend.
    /// Returns the center's sequence when that happened. Blocking.
    pub fn welcomed_blocking(&self, center_last: u64) -> Result<Option<u64>> {
        let mut inner = self.inner.lock().expect("outbox lock");
        let Inner { conn, stats } = &mut *inner;
        let fresh = get_meta(conn, "fresh").map_err(|e| self.err(e))? == 1;
        let lost = (fresh && center_last > 0) || center_last > stats.last_sequence;
        if !fresh && !lost {
            return Ok(None);
        }
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let last = stats.last_sequence + center_last;
        if lost {
            // Every entry is at most last_sequence, so adding the center's sequence puts them all
            // after it, in their order. Through negatives: the primary key is checked row by row.
            tx.execute_batch(&format!("UPDATE outbox SET seq = -(seq + {center_last}); UPDATE outbox SET seq = -seq;"))
                .map_err(|e| self.err(e))?;
            set_meta(&tx, "last_sequence", last).map_err(|e| self.err(e))?;
            set_meta(&tx, "acked_upto", center_last).map_err(|e| self.err(e))?;
        }
        tx.execute("DELETE FROM meta WHERE key = 'fresh'", []).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        if !lost {
            return Ok(None);
        }
        stats.last_sequence = last;
        stats.acked_upto = center_last;
        Ok(Some(center_last))
    }
}

/// A counter of the `meta` table (0 when absent).
fn get_meta(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COALESCE((SELECT value FROM meta WHERE key = ?1), 0)", [key], |r| r.get::<_, i64>(0))
        .map(|v| v as u64)
}

fn set_meta(conn: &Connection, key: &str, value: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value as i64],
    )
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
        assert_eq!(o.ack_blocking(1, 3, &[]).unwrap(), 3);
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

    #[test]
    fn invalid_entries_and_refusals_leave_the_outbox_counted_and_reported() {
        let t = tempfile::tempdir().unwrap();
        let o = Outbox::open(t.path(), 1 << 20).unwrap();
        // An entry an older agent version stored without the contract's check.
        let bad = Observation { message: "x".repeat(9000), ..obs(Severity::Info, false) };
        o.push_blocking(vec![obs(Severity::Info, false), bad, obs(Severity::Info, false)]).unwrap();
        let sent: Vec<u64> = o.pending_blocking(0, 10).unwrap().iter().map(|o| o.sequence).collect();
        assert_eq!(sent, vec![1, 3], "the invalid entry is not handed out");
        assert_eq!((o.stats().depth, o.stats().rejected_total), (2, 1));
        // The center refuses one of a batch: the whole range leaves, one more is counted.
        let refusal = Rejection { sequence: 3, reason: "stricter center".into() };
        assert_eq!(o.ack_blocking(1, 3, &[refusal]).unwrap(), 2);
        assert_eq!((o.stats().depth, o.stats().rejected_total, o.stats().acked_upto), (0, 2, 3));
        assert_eq!(o.report_losses_blocking().unwrap(), (0, 2));
        let report = o.pending_blocking(3, 10).unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].r#type, "ObservationsRejected");
        assert_eq!(report[0].attributes["rejected"], "2");
        assert_eq!(o.report_losses_blocking().unwrap(), (0, 0), "reported once");
        drop(o);
        assert_eq!(Outbox::open(t.path(), 1 << 20).unwrap().stats().rejected_total, 2, "durable");
    }

    #[test]
    fn a_new_outbox_on_a_known_boot_continues_after_the_centers_sequence() {
        let t = tempfile::tempdir().unwrap();
        let o = Outbox::open(t.path(), 1 << 20).unwrap();
        o.push_blocking(vec![obs(Severity::Info, false); 2]).unwrap();
        assert_eq!(o.welcomed_blocking(5).unwrap(), Some(5));
        let seqs: Vec<u64> = o.pending_blocking(0, 10).unwrap().iter().map(|o| o.sequence).collect();
        assert_eq!(seqs, vec![6, 7]);
        assert_eq!(o.push_blocking(vec![obs(Severity::Info, false)]).unwrap(), vec![8]);
        // Only the first welcome of a new outbox; later ones at or below its own sequence are resends.
        assert_eq!(o.welcomed_blocking(7).unwrap(), None);
        drop(o);
        let o = Outbox::open(t.path(), 1 << 20).unwrap();
        assert_eq!(o.welcomed_blocking(8).unwrap(), None);
        // A center ahead of the outbox (state restored from an older copy) is also lost state.
        assert_eq!(o.welcomed_blocking(20).unwrap(), Some(20));
        assert_eq!(o.pending_blocking(0, 10).unwrap().first().map(|o| o.sequence), Some(26));
        // An outbox the center never heard of starts at 1 as before.
        let t2 = tempfile::tempdir().unwrap();
        let fresh = Outbox::open(t2.path(), 1 << 20).unwrap();
        assert_eq!(fresh.welcomed_blocking(0).unwrap(), None);
        assert_eq!(fresh.push_blocking(vec![obs(Severity::Info, false)]).unwrap(), vec![1]);
    }
}

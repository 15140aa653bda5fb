//! The single writer thread and its group commit.
//!
//! The writer takes the first waiting operation, opens a transaction, and keeps applying the
//! operations that arrive until the group holds `commit_max_rows` rows or `commit_delay` passed
//! since the group began; then it commits (one fsync for the whole group) and only then answers
//! every caller in the group and publishes the new events. Each operation runs in its own
//! savepoint, so one failing operation does not fail the others in its group.
//!
//! Cursors are assigned here, in commit order, and are contiguous: a duplicate consumes none.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::to_unix_ms;
use nodekeeper_proto::v1::Event;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{OwnedSemaphorePermit, broadcast, oneshot, watch};

use super::{
    Appended, HelloOutcome, Identity, LiveBatch, NewEvent, NodeHello, NodeKey, OriginKey, Result, StoreError,
    StoreOptions,
};

mod faults;
mod nodes;
mod state;

pub(crate) use nodes::NodeChange;
pub use nodes::NodeChanged;
pub(crate) use state::ComponentsChange;

pub(crate) enum Op {
    Append {
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<Vec<Appended>>>,
        permit: OwnedSemaphorePermit,
    },
    Hello {
        hello: Box<NodeHello>,
        reply: oneshot::Sender<Result<HelloOutcome>>,
        permit: OwnedSemaphorePermit,
    },
    Liveness {
        key: NodeKey,
        lost: bool,
        grace: Duration,
        reply: oneshot::Sender<Result<()>>,
        permit: OwnedSemaphorePermit,
    },
    EnsureConsumer {
        name: String,
        position: u64,
        reply: oneshot::Sender<Result<u64>>,
        permit: OwnedSemaphorePermit,
    },
    AckConsumer {
        name: String,
        cursor: u64,
        reply: oneshot::Sender<Result<bool>>,
        permit: OwnedSemaphorePermit,
    },
    DeleteConsumer {
        name: String,
        reply: oneshot::Sender<Result<bool>>,
        permit: OwnedSemaphorePermit,
    },
    Retain {
        cutoff_ms: i64,
        max_rows: usize,
        reply: oneshot::Sender<Result<u64>>,
        permit: OwnedSemaphorePermit,
    },
    Components {
        change: ComponentsChange,
        reply: oneshot::Sender<Result<u64>>,
        permit: OwnedSemaphorePermit,
    },
    Node {
        change: NodeChange,
        reply: oneshot::Sender<Result<Option<NodeChanged>>>,
        permit: OwnedSemaphorePermit,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl Op {
    fn rows(&self) -> usize {
        match self {
            Op::Append { events, .. } => events.len().max(1),
            _ => 1,
        }
    }
}

/// An answer held back until the group commits: called with `None` on success.
type Deferred = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn defer<T: Send + 'static>(
    reply: oneshot::Sender<Result<T>>,
    value: Result<T>,
    permit: OwnedSemaphorePermit,
) -> Deferred {
    Box::new(move |commit_error| {
        drop(permit);
        let outcome = match (commit_error, value) {
            (Some(e), _) => Err(e.clone()),
            (None, v) => v,
        };
        // The caller may have gone away (client disconnected); the write stands regardless.
        let _ = reply.send(outcome);
    })
}

pub(crate) struct Writer {
    conn: Connection,
    path: PathBuf,
    options: StoreOptions,
    next_cursor: u64,
    last_received_ms: i64,
    origins: HashMap<OriginKey, i64>,
    center_origin: OriginKey,
    live: broadcast::Sender<LiveBatch>,
    head: watch::Sender<u64>,
    floor: Arc<AtomicU64>,
    metrics: super::StoreMetrics,
    space: Arc<super::space::Space>,
}

/// State of the group being built, undone when its commit fails.
struct Group {
    deferred: Vec<Deferred>,
    published: Vec<Event>,
    rows: usize,
    start_cursor: u64,
}

impl Writer {
    #[expect(clippy::too_many_arguments, reason = "the writer's connection and each piece of state it shares, once")]
    pub(crate) fn new(
        conn: Connection,
        path: PathBuf,
        options: StoreOptions,
        head: u64,
        live: broadcast::Sender<LiveBatch>,
        head_tx: watch::Sender<u64>,
        floor: Arc<AtomicU64>,
        space: Arc<super::space::Space>,
    ) -> Self {
        Self {
            conn,
            path,
            options,
            next_cursor: head + 1,
            last_received_ms: 0,
            origins: HashMap::new(),
            center_origin: OriginKey::from(super::CENTER_ORIGIN),
            live,
            head: head_tx,
            floor,
            metrics: super::StoreMetrics::default(),
            space,
        }
    }

    /// Counts into `metrics` (shared with the store's handle).
    pub(crate) fn with_metrics(mut self, metrics: super::StoreMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The store error for a SQLite error; "disk full" turns the disk reserve on at once, so
    /// that later writes are refused before they reach SQLite.
    fn err(&self, e: rusqlite::Error) -> StoreError {
        if super::is_disk_full(&e) {
            self.space.full();
            let state = self.space.state();
            return StoreError::Full { free: state.free, reserve: state.reserve };
        }
        StoreError::sqlite(&self.path, e)
    }

    pub(crate) fn run(mut self, ops: Receiver<Op>) {
        let mut close_reply = None;
        while close_reply.is_none() {
            let Ok(first) = ops.recv() else { break };
            let started = Instant::now();
            let mut group =
                Group { deferred: Vec::new(), published: Vec::new(), rows: 0, start_cursor: self.next_cursor };
            if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                let e = self.err(e);
                tracing::error!(error = %e, "store: cannot begin transaction");
                self.apply(first, &mut group, &mut close_reply);
                self.finish_failed(group, &e);
                continue;
            }
            self.apply(first, &mut group, &mut close_reply);
            while group.rows < self.options.commit_max_rows && close_reply.is_none() {
                let next = match ops.try_recv() {
                    Ok(op) => op,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let waited = started.elapsed();
                        if waited >= self.options.commit_delay {
                            break;
                        }
                        match ops.recv_timeout(self.options.commit_delay - waited) {
                            Ok(op) => op,
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                        }
                    }
                };
                self.apply(next, &mut group, &mut close_reply);
            }
            let commit_started = Instant::now();
            match self.conn.execute_batch("COMMIT") {
                Ok(()) => {
                    self.space.check_soon();
                    self.metrics.commit_seconds.observe(commit_started.elapsed().as_secs_f64());
                    self.metrics.commit_rows.observe(group.rows as f64);
                    self.metrics.events.inc_by(group.published.len() as u64);
                    self.finish_committed(group)
                }
                Err(e) => {
                    let e = self.err(e);
                    tracing::error!(error = %e, "store: commit failed; the group's writes are answered with the error");
                    // SQLite may have rolled the transaction back itself (a full disk does).
                    if !self.conn.is_autocommit()
                        && let Err(rb) = self.conn.execute_batch("ROLLBACK")
                    {
                        tracing::error!(error = %self.err(rb), "store: rollback failed");
                    }
                    self.finish_failed(group, &e);
                }
            }
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %self.err(e), "store: final checkpoint failed");
        }
        tracing::info!("store writer stopped");
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
    }

    /// Publishes the group's head, then its events, then answers its callers: whoever is told
    /// "stored" or receives a live event finds the new head already visible (a subscriber may
    /// acknowledge what it received at once).
    fn finish_committed(&mut self, group: Group) {
        let head = self.next_cursor - 1;
        self.head.send_if_modified(|h| {
            let changed = *h != head;
            *h = head;
            changed
        });
        if !group.published.is_empty() {
            // No receiver is fine: nobody is subscribed live.
            let _ = self.live.send(Arc::new(group.published));
        }
        for d in group.deferred {
            d(None);
        }
    }

    fn finish_failed(&mut self, group: Group, e: &StoreError) {
        self.next_cursor = group.start_cursor;
        self.origins.clear();
        for d in group.deferred {
            d(Some(e));
        }
    }

    /// Applies one operation inside its own savepoint and queues its answer.
    fn apply(&mut self, op: Op, group: &mut Group, close_reply: &mut Option<oneshot::Sender<()>>) {
        if let Op::Close { reply } = op {
            *close_reply = Some(reply);
            return;
        }
        group.rows += op.rows();
        let saved_cursor = self.next_cursor;
        let saved_published = group.published.len();
        if let Err(e) = self.conn.execute_batch("SAVEPOINT op") {
            let e = self.err(e);
            group.deferred.push(self.reject(op, e));
            return;
        }
        let deferred = match op {
            Op::Append { events, reply, permit } => {
                let r = self.append(events, &mut group.published);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::Hello { hello, reply, permit } => {
                let r = self.hello(*hello, &mut group.published);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::Liveness { key, lost, grace, reply, permit } => {
                let r = self.liveness(key, lost, grace, &mut group.published);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::EnsureConsumer { name, position, reply, permit } => {
                let r = self.ensure_consumer(&name, position);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::AckConsumer { name, cursor, reply, permit } => {
                let r = self.ack_consumer(&name, cursor);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::DeleteConsumer { name, reply, permit } => {
                let r = self
                    .conn
                    .execute("DELETE FROM consumers WHERE name = ?1", [&name])
                    .map(|n| n > 0)
                    .map_err(|e| self.err(e));
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::Retain { cutoff_ms, max_rows, reply, permit } => {
                let r = self.retain(cutoff_ms, max_rows);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::Components { change, reply, permit } => {
                let r = self.components(change, &mut group.published);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::Node { change, reply, permit } => {
                let r = self.node_change(change, &mut group.published);
                self.settle(r, reply, permit, saved_cursor, group, saved_published)
            }
            Op::Close { .. } => unreachable!("handled above"),
        };
        group.deferred.push(deferred);
    }

    /// Releases or rolls back the operation's savepoint depending on its result.
    fn settle<T: Send + 'static>(
        &mut self,
        result: Result<T>,
        reply: oneshot::Sender<Result<T>>,
        permit: OwnedSemaphorePermit,
        saved_cursor: u64,
        group: &mut Group,
        saved_published: usize,
    ) -> Deferred {
        match result {
            Ok(v) => match self.conn.execute_batch("RELEASE op") {
                Ok(()) => defer(reply, Ok(v), permit),
                Err(e) => {
                    let e = self.err(e);
                    self.undo(saved_cursor, group, saved_published);
                    defer(reply, Err(e), permit)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "store: operation failed and was rolled back");
                self.undo(saved_cursor, group, saved_published);
                defer(reply, Err(e), permit)
            }
        }
    }

    fn undo(&mut self, saved_cursor: u64, group: &mut Group, saved_published: usize) {
        if let Err(e) = self.conn.execute_batch("ROLLBACK TO op; RELEASE op") {
            tracing::error!(error = %self.err(e), "store: rollback to savepoint failed");
        }
        self.next_cursor = saved_cursor;
        self.origins.clear();
        group.published.truncate(saved_published);
    }

    fn reject(&self, op: Op, e: StoreError) -> Deferred {
        match op {
            Op::Append { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::Hello { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::Liveness { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::EnsureConsumer { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::AckConsumer { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::DeleteConsumer { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::Retain { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::Components { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::Node { reply, permit, .. } => defer(reply, Err(e), permit),
            Op::Close { .. } => Box::new(|_| {}),
        }
    }

    fn origin_id(&mut self, key: &OriginKey) -> Result<i64> {
        if let Some(id) = self.origins.get(key) {
            return Ok(*id);
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT INTO origins (key) VALUES (?1) ON CONFLICT (key) DO UPDATE SET key = key RETURNING id",
            )
            .map_err(|e| self.err(e))?;
        let id: i64 = stmt.query_row([&**key], |r| r.get(0)).map_err(|e| self.err(e))?;
        drop(stmt);
        if self.origins.len() > 100_000 {
            self.origins.clear();
        }
        self.origins.insert(key.clone(), id);
        Ok(id)
    }

    fn received_ms(&mut self) -> i64 {
        let now = to_unix_ms(SystemTime::now());
        self.last_received_ms = self.last_received_ms.max(now);
        self.last_received_ms
    }

    fn append(&mut self, events: Vec<NewEvent>, published: &mut Vec<Event>) -> Result<Vec<Appended>> {
        let received_ms = self.received_ms();
        // Resolve origins first (a batch of one agent shares one), then insert with one statement.
        let mut origin_ids = Vec::with_capacity(events.len());
        let mut last: Option<(&OriginKey, i64)> = None;
        for e in &events {
            let id = match &e.identity {
                Identity::Center => self.origin_id(&self.center_origin.clone())?,
                Identity::Keyed { origin, .. } => match last {
                    Some((o, id)) if Arc::ptr_eq(o, origin) || **o == **origin => id,
                    _ => self.origin_id(origin)?,
                },
            };
            if let Identity::Keyed { origin, .. } = &e.identity {
                last = Some((origin, id));
            }
            origin_ids.push(id);
        }
        // The node each event is about, for the node index (a batch is mostly one node's).
        let mut node_refs = Vec::with_capacity(events.len());
        let mut last_node: Option<(&str, &str, i64)> = None;
        for e in &events {
            let (cluster, node) = (e.event.cluster.as_str(), e.event.node.as_str());
            let id = match last_node {
                _ if node.is_empty() => None,
                Some((c, n, id)) if c == cluster && n == node => Some(id),
                _ => {
                    let id = self.origin_id(&OriginKey::from(super::node_origin(cluster, node)))?;
                    last_node = Some((cluster, node, id));
                    Some(id)
                }
            };
            node_refs.push(id);
        }
        let mut next = self.next_cursor;
        let mut out = Vec::with_capacity(events.len());
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO events (cursor, origin, origin_seq, received_ms, fault_id, body, node_ref)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (origin, origin_seq) DO NOTHING",
            )
            .map_err(|e| self.err(e))?;
        for ((NewEvent { identity, mut event, mut body }, origin), node_ref) in
            events.into_iter().zip(origin_ids).zip(node_refs)
        {
            let origin_seq = match &identity {
                Identity::Keyed { sequence, .. } => *sequence as i64,
                Identity::Center => next as i64,
            };
            // Condition events are rare and fold into faults; look for a stored copy first so a
            // resent one folds nothing twice. Plain events rely on the unique index alone.
            if event.condition.is_some() {
                if let Some(cursor) = self.find_identity(origin, origin_seq)? {
                    out.push(Appended { cursor, duplicate: true });
                    continue;
                }
                self.fold_condition(&mut event, next)?;
                body = event.encode_to_vec();
            }
            let fault_id = (event.fault_id != 0).then_some(event.fault_id as i64);
            let n = insert
                .execute(params![next as i64, origin, origin_seq, received_ms, fault_id, body, node_ref])
                .map_err(|e| self.err(e))?;
            if n == 1 {
                event.cursor = next.to_string();
                published.push(event);
                out.push(Appended { cursor: next, duplicate: false });
                next += 1;
            } else {
                let cursor = self.find_identity(origin, origin_seq)?.ok_or_else(|| StoreError::Corrupt {
                    table: "events",
                    message: "conflicting identity vanished".into(),
                })?;
                out.push(Appended { cursor, duplicate: true });
            }
        }
        self.metrics.duplicates.inc_by(out.iter().filter(|a| a.duplicate).count() as u64);
        drop(insert);
        self.next_cursor = next;
        Ok(out)
    }

    fn find_identity(&self, origin: i64, origin_seq: i64) -> Result<Option<u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT cursor FROM events WHERE origin = ?1 AND origin_seq = ?2")
            .map_err(|e| self.err(e))?;
        stmt.query_row(params![origin, origin_seq], |r| r.get::<_, i64>(0))
            .optional()
            .map(|c| c.map(|c| c as u64))
            .map_err(|e| self.err(e))
    }

    /// Appends an event the center generated.
    fn center_event(&mut self, event: Event, published: &mut Vec<Event>) -> Result<()> {
        self.append(vec![NewEvent::new(Identity::Center, event)], published).map(|_| ())
    }

    fn ensure_consumer(&mut self, name: &str, position: u64) -> Result<u64> {
        let now = to_unix_ms(SystemTime::now());
        self.conn
            .prepare_cached(
                "INSERT INTO consumers (name, acked_cursor, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET name = name RETURNING acked_cursor",
            )
            .and_then(|mut s| s.query_row(params![name, position as i64, now], |r| r.get::<_, i64>(0)))
            .map(|c| c as u64)
            .map_err(|e| self.err(e))
    }

    fn ack_consumer(&mut self, name: &str, cursor: u64) -> Result<bool> {
        let now = to_unix_ms(SystemTime::now());
        self.conn
            .prepare_cached(
                "UPDATE consumers SET acked_cursor = MAX(acked_cursor, ?2), updated_ms = ?3 WHERE name = ?1",
            )
            .and_then(|mut s| s.execute(params![name, cursor as i64, now]))
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    fn retain(&mut self, cutoff_ms: i64, max_rows: usize) -> Result<u64> {
        let floor = self.floor.load(Ordering::Acquire);
        // received_ms never decreases with the cursor, so the expired events are a prefix.
        let last: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(cursor) FROM (SELECT cursor FROM events WHERE cursor > ?1 AND received_ms < ?2
                 ORDER BY cursor LIMIT ?3)",
                params![floor as i64, cutoff_ms, max_rows as i64],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        let Some(last) = last else { return Ok(0) };
        let deleted = self
            .conn
            .execute("DELETE FROM events WHERE cursor > ?1 AND cursor <= ?2", params![floor as i64, last])
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('retention_floor', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [last],
            )
            .map_err(|e| self.err(e))?;
        // Raised before the commit: a reader that sees the new floor early refuses a cursor that is
        // about to become unreadable, which is the safe direction.
        self.floor.store(last as u64, Ordering::Release);
        Ok(deleted as u64)
    }
}

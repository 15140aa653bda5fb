//! A replica's writer: appends queued by its callers committed in groups, each group under the
//! log head's lock (see the parent module).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::to_unix_ms;
use nodekeeper_proto::v1::Event;
use tokio::sync::{mpsc, watch};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, CopyInSink, Statement};
use tokio_util::bytes::Bytes;

mod faults;
mod nodes;
mod state;

use super::{CHANNEL, Database, Job, PgOptions, RETRY_FOR, pg};
use crate::store::writer::{ComponentsChange, NodeChange, NodeChanged};
use crate::store::{
    Appended, HelloOutcome, Identity, NewEvent, NodeHello, NodeKey, OriginKey, StoreError, StoreMetrics,
};

/// The replica's writer: takes queued appends in order, commits them in groups, answers after
/// the commit; across a lost connection it reconnects and retries the group.
pub(super) async fn write(
    db: Database,
    mut client: Client,
    mut jobs: mpsc::Receiver<Job>,
    head: Arc<watch::Sender<u64>>,
    options: PgOptions,
    center: Center,
    metrics: StoreMetrics,
) {
    let mut statements = Statements::prepare(&client).await;
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        let mut rows = group[0].op.rows();
        while rows < options.commit_max_rows {
            match jobs.try_recv() {
                Ok(job) => {
                    rows += job.op.rows();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        if statements.is_err() {
            statements = Statements::prepare(&client).await;
        }
        let outcome = loop {
            let attempt = match &statements {
                Ok(prepared) => commit_group(&client, prepared, &group, &center).await,
                Err(e) => Err(Failed(e.clone())),
            };
            match attempt {
                Ok(done) => break Ok(done),
                Err(Conflict) => {
                    tracing::debug!("an identity of the group was stored by another replica meanwhile; trying again");
                }
                Err(Failed(e)) if client.is_closed() && started.elapsed() < RETRY_FOR => {
                    tracing::warn!(error = %e, "postgres connection lost during a commit; reconnecting to retry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(c) = db.connect().await {
                        client = c;
                        statements = Statements::prepare(&client).await;
                    }
                }
                Err(Failed(e)) => break Err(e),
            }
        };
        match outcome {
            Ok((answers, new_head, times)) => {
                let took = started.elapsed();
                metrics.commit_seconds.observe(times.commit.as_secs_f64());
                metrics.commit_rows.observe(rows as f64);
                let (stored, duplicates) = answers.iter().fold((0, 0), |(s, d), done| match done {
                    Done::Appended(a) => {
                        let dup = a.iter().filter(|a| a.duplicate).count() as u64;
                        (s + a.len() as u64 - dup, d + dup)
                    }
                    _ => (s, d),
                });
                metrics.events.inc_by(stored);
                metrics.duplicates.inc_by(duplicates);
                if took > SLOW_GROUP {
                    tracing::warn!(
                        rows,
                        took_ms = took.as_millis() as u64,
                        until_locked_ms = times.until_locked.as_millis() as u64,
                        held_ms = times.held.as_millis() as u64,
                        commit_ms = times.commit.as_millis() as u64,
                        "slow group commit on PostgreSQL"
                    );
                }
                head.send_if_modified(|h| std::mem::replace(h, (*h).max(new_head)) < new_head);
                for (job, answer) in group.into_iter().zip(answers) {
                    let _ = job.reply.send(Ok(answer));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "postgres append failed");
                for job in group {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// A group that takes longer than this from its first attempt to its answer is logged with where
/// its time went.
const SLOW_GROUP: Duration = Duration::from_millis(250);

/// Where a committed group's time went: until it held the head's lock (interning, the lookup,
/// and waiting for the other replicas' groups), holding it (up to and with the commit), and the
/// commit itself.
struct GroupTimes {
    until_locked: Duration,
    held: Duration,
    commit: Duration,
}

/// Why a group was not committed.
enum GroupError {
    /// Another replica stored one of its identities since it looked: try again.
    Conflict,
    Failed(StoreError),
}
use GroupError::{Conflict, Failed};

impl From<StoreError> for GroupError {
    fn from(e: StoreError) -> Self {
        Failed(e)
    }
}

/// The columns of `Statements::copy_events`, in its order.
const EVENT_COLUMNS: [Type; 8] =
    [Type::INT8, Type::INT8, Type::INT8, Type::INT8, Type::INT8, Type::BYTEA, Type::INT8, Type::BOOL];

/// The statements of every group, prepared once per connection: a statement given as text is
/// parsed in a round trip of its own before it runs, and the head's lock is held across several.
pub(super) struct Statements {
    intern: Statement,
    stored: Statement,
    lock_head: Statement,
    copy_events: Statement,
    move_head: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, StoreError> {
        Ok(Statements {
            intern: client
                .prepare(
                    "INSERT INTO origins (key) SELECT unnest($1::text[])
                     ON CONFLICT (key) DO UPDATE SET key = excluded.key
                     RETURNING key, id",
                )
                .await
                .map_err(pg)?,
            stored: client
                .prepare(
                    "SELECT o.id, e.origin_seq, e.cursor FROM unnest($1::text[], $2::bigint[]) AS i (key, seq)
                     JOIN origins o ON o.key = i.key
                     JOIN events e ON e.origin = o.id AND e.origin_seq = i.seq",
                )
                .await
                .map_err(pg)?,
            lock_head: client.prepare("SELECT head, received_ms FROM log_head FOR UPDATE").await.map_err(pg)?,
            copy_events: client
                .prepare(
                    "COPY events (cursor, origin, origin_seq, received_ms, node_ref, body, fault_id, vote)
                     FROM STDIN BINARY",
                )
                .await
                .map_err(pg)?,
            move_head: client
                .prepare(
                    "WITH moved AS (UPDATE log_head SET head = $1, received_ms = $3 RETURNING head)
                     SELECT pg_notify($2, head::text) FROM moved",
                )
                .await
                .map_err(pg)?,
        })
    }
}

/// What a replica's writer does in a group's transaction.
pub(crate) enum Op {
    Append(Vec<NewEvent>),
    Hello(Box<NodeHello>),
    Liveness { key: NodeKey, lost: bool, grace: Duration },
    Disconnected(NodeKey),
    Node(NodeChange),
    State(ComponentsChange),
}

impl Op {
    fn rows(&self) -> usize {
        match self {
            Op::Append(events) => events.len(),
            _ => 1,
        }
    }
}

/// What an [`Op`] answers.
pub(crate) enum Done {
    Appended(Vec<Appended>),
    Hello(HelloOutcome),
    /// Whether this replica watches the node.
    Liveness(bool),
    Node(Option<NodeChanged>),
    /// A generation, a cursor or 0, as the SQLite writer answers the same change.
    State(u64),
}

/// The replica's identity for the events the center makes, and their next sequence.
#[derive(Clone)]
pub(super) struct Center {
    pub origin: OriginKey,
    pub seq: Arc<AtomicU64>,
}

impl Center {
    /// The replica's identity: the holder of its `replica/<id>` lease and the owner of the nodes
    /// it watches.
    pub fn replica(&self) -> String {
        self.origin.trim_start_matches("c/").to_owned()
    }
}

/// Rows for `events`, gathered over a group and inserted together (before an operation that
/// reads the log, and at the end).
#[derive(Default)]
struct Rows<'a> {
    cursor: Vec<i64>,
    origin: Vec<i64>,
    seq: Vec<i64>,
    node: Vec<Option<i64>>,
    body: Vec<Cow<'a, [u8]>>,
    fault: Vec<Option<i64>>,
    /// `Some(true)` for a detector's vote.
    vote: Vec<Option<bool>>,
}

/// A group's transaction once it holds the head: the next cursor and the rows not yet inserted.
struct Log<'t, 'a> {
    /// The writer's connection, inside the group's transaction.
    tx: &'t Client,
    statements: &'t Statements,
    /// A COPY into `events` already started (sent with the head's lock), for the rows.
    copy: Option<CopyInSink<Bytes>>,
    next: i64,
    received_ms: i64,
    rows: Rows<'a>,
    /// Interned keys (origins and nodes) by key.
    ids: HashMap<String, i64>,
    center: &'t Center,
}

impl<'a> Log<'_, 'a> {
    /// The ids of `keys` in `origins`, interned if new.
    async fn intern(&mut self, keys: Vec<String>) -> Result<(), StoreError> {
        let mut missing: Vec<String> = keys.into_iter().filter(|k| !self.ids.contains_key(k)).collect();
        // One statement may not touch a row twice.
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        self.ids.extend(intern(self.tx, self.statements, &missing).await?);
        Ok(())
    }

    /// Gives `event` the next cursor (folding a condition event) and queues its row.
    async fn push(
        &mut self,
        origin: i64,
        seq: i64,
        mut event: Cow<'a, Event>,
        body: Cow<'a, [u8]>,
    ) -> Result<i64, StoreError> {
        self.next += 1;
        let node = (!event.node.is_empty())
            .then(|| self.ids.get(&crate::store::node_origin(&event.cluster, &event.node)).copied())
            .flatten();
        let body = if event.condition.is_some() {
            faults::fold_condition(self.tx, event.to_mut(), self.next).await?;
            Cow::Owned(prost::Message::encode_to_vec(event.as_ref()))
        } else {
            body
        };
        // A fault's timeline: its condition events and the steps recorded on it.
        let fault = (event.fault_id != 0).then_some(event.fault_id as i64);
        let r = &mut self.rows;
        r.cursor.push(self.next);
        r.origin.push(origin);
        r.seq.push(seq);
        r.node.push(node);
        r.body.push(body);
        r.fault.push(fault);
        r.vote.push((event.r#type == crate::store::DETECTOR_VOTE).then_some(true));
        Ok(self.next)
    }

    /// Appends events the center makes (with this replica's identity); the cursor of the last.
    async fn center_events(&mut self, events: Vec<Event>) -> Result<u64, StoreError> {
        let mut keys = vec![self.center.origin.to_string()];
        keys.extend(
            events.iter().filter(|e| !e.node.is_empty()).map(|e| crate::store::node_origin(&e.cluster, &e.node)),
        );
        self.intern(keys).await?;
        let origin = self.ids[&*self.center.origin];
        let mut last = 0;
        for mut event in events {
            event.received_time = Some(nodekeeper_common::time::now_timestamp());
            let seq = self.center.seq.fetch_add(1, Ordering::Relaxed) as i64;
            let body = prost::Message::encode_to_vec(&event);
            last = self.push(origin, seq, Cow::Owned(event), Cow::Owned(body)).await? as u64;
        }
        Ok(last)
    }

    /// Appends events an operation records (duplicates, by identity, stored once), looked up
    /// under the lock: operations are few.
    async fn append_events(&mut self, events: &'a [NewEvent]) -> Result<Vec<Appended>, GroupError> {
        let mut keys = Vec::new();
        for e in events {
            let Identity::Keyed { origin, .. } = &e.identity else {
                let message = "an event without an identity reached the writer".into();
                return Err(Failed(StoreError::Postgres { message }));
            };
            keys.push(origin.to_string());
            if !e.event.node.is_empty() {
                keys.push(crate::store::node_origin(&e.event.cluster, &e.event.node));
            }
        }
        self.intern(keys).await?;
        // Earlier rows of this group must be visible to the lookup.
        self.flush().await?;
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let Identity::Keyed { origin, sequence } = &e.identity else { unreachable!("checked above") };
            let (origin, seq) = (self.ids[&**origin], *sequence as i64);
            let stored = self
                .tx
                .query_opt("SELECT cursor FROM events WHERE origin = $1 AND origin_seq = $2", &[&origin, &seq])
                .await
                .map_err(pg)?;
            let pending = self.rows.origin.iter().zip(&self.rows.seq).position(|(o, s)| *o == origin && *s == seq);
            match (stored, pending) {
                (Some(r), _) => out.push(Appended { cursor: r.get::<_, i64>(0) as u64, duplicate: true }),
                (None, Some(i)) => out.push(Appended { cursor: self.rows.cursor[i] as u64, duplicate: true }),
                (None, None) => {
                    let cursor = self.push(origin, seq, Cow::Borrowed(&e.event), Cow::Borrowed(&e.body)).await?;
                    out.push(Appended { cursor: cursor as u64, duplicate: false });
                }
            }
        }
        Ok(out)
    }

    /// Inserts the queued rows (and ends a COPY started for them).
    async fn flush(&mut self) -> std::result::Result<(), GroupError> {
        if self.rows.cursor.is_empty() && self.copy.is_none() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let started = self.copy.take();
        // COPY: rows streamed in PostgreSQL's binary format, no statement planned per group and
        // no arrays unpacked on the server.
        let copied = async {
            let sink = match started {
                Some(sink) => sink,
                None => self.tx.copy_in(&self.statements.copy_events).await?,
            };
            let writer = BinaryCopyInWriter::new(sink, &EVENT_COLUMNS);
            let mut writer = std::pin::pin!(writer);
            for (i, body) in rows.body.iter().enumerate() {
                let body: &[u8] = body;
                let row: [&(dyn ToSql + Sync); 8] = [
                    &rows.cursor[i],
                    &rows.origin[i],
                    &rows.seq[i],
                    &self.received_ms,
                    &rows.node[i],
                    &body,
                    &rows.fault[i],
                    &rows.vote[i],
                ];
                writer.as_mut().write(&row).await?;
            }
            writer.finish().await
        };
        match copied.await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => Err(Conflict),
            Err(e) => Err(Failed(pg(e))),
            Ok(_) => Ok(()),
        }
    }
}

/// The ids of `keys` in `origins`, added where new.
async fn intern(tx: &Client, statements: &Statements, keys: &[String]) -> Result<HashMap<String, i64>, StoreError> {
    let rows = tx.query(&statements.intern, &[&keys]).await.map_err(pg)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// One group in one transaction: the answers per job, the head after it, and where its time went.
/// The transaction is begun and ended by hand, so that BEGIN and the statements before the
/// lock go in one round trip, and the last rows, the head's move and COMMIT in another.
async fn commit_group(
    client: &Client,
    statements: &Statements,
    group: &[Job],
    center: &Center,
) -> std::result::Result<(Vec<Done>, u64, GroupTimes), GroupError> {
    let done = group_transaction(client, statements, group, center).await;
    if done.is_err() && !client.is_closed() {
        // Whatever the group left open (a COMMIT after a failed statement has rolled back
        // already; this is then a no-op with a warning).
        let _ = client.batch_execute("ROLLBACK").await;
    }
    done
}

async fn group_transaction(
    client: &Client,
    statements: &Statements,
    group: &[Job],
    center: &Center,
) -> std::result::Result<(Vec<Done>, u64, GroupTimes), GroupError> {
    let began = Instant::now();
    // The appended events' identities, interned with their nodes' keys before the lock.
    let appended = group.iter().filter_map(|j| match &j.op {
        Op::Append(events) => Some(events),
        _ => None,
    });
    let mut keys: Vec<String> = Vec::new();
    let (mut identity_keys, mut seqs): (Vec<&str>, Vec<i64>) = (Vec::new(), Vec::new());
    for e in appended.clone().flatten() {
        let Identity::Keyed { origin, sequence } = &e.identity else {
            // `append` gives center events their replica's identity before it queues them.
            let message = "an event without an identity reached the writer".into();
            return Err(Failed(StoreError::Postgres { message }));
        };
        keys.push(origin.to_string());
        if !e.event.node.is_empty() {
            keys.push(crate::store::node_origin(&e.event.cluster, &e.event.node));
        }
        identity_keys.push(origin);
        seqs.push(*sequence as i64);
    }
    keys.sort();
    keys.dedup();
    // A group of plain appends (no operation, no condition to fold) reads nothing once it holds
    // the lock: its COPY is started in the same round trip, and its rows follow.
    let plain = group.iter().all(|j| match &j.op {
        Op::Append(events) => events.iter().all(|e| e.event.condition.is_none()),
        _ => false,
    });
    let copy = async {
        match plain {
            true => client.copy_in(&statements.copy_events).await.map(Some),
            false => Ok(None),
        }
    };
    // One round trip; the statements run in the order sent (`biased`: polled, and so sent, in
    // this order). The lookup cannot miss an identity another replica is storing: interning
    // locked the origin's row (ON CONFLICT DO UPDATE) until that replica's commit, so the lookup
    // ran after it. Should that ever change, the unique index fails the COPY and the group is
    // tried again. From the lock to the commit every other append waits.
    let (intern_params, stored_params): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 2]) =
        ([&keys], [&identity_keys, &seqs]);
    let (begun, interned, stored, locked, copy) = tokio::join!(
        biased;
        client.batch_execute("BEGIN"),
        client.query(&statements.intern, &intern_params),
        client.query(&statements.stored, &stored_params),
        client.query_one(&statements.lock_head, &[]),
        copy,
    );
    let holding = Instant::now();
    begun.map_err(pg)?;
    let ids: HashMap<String, i64> = interned.map_err(pg)?.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut cursors: HashMap<(i64, i64), i64> =
        stored.map_err(pg)?.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect();
    let locked = locked.map_err(pg)?;
    let copy = copy.map_err(pg)?;
    let (head, last_received_ms): (i64, i64) = (locked.get(0), locked.get(1));
    let received_ms = to_unix_ms(SystemTime::now()).max(last_received_ms);
    let origins: Vec<i64> = identity_keys.iter().map(|k| ids[*k]).collect();
    let mut log = Log { tx: client, statements, copy, next: head, received_ms, rows: Rows::default(), ids, center };
    let mut answers = Vec::with_capacity(group.len());
    let mut at = 0;
    for job in group {
        let done = match &job.op {
            Op::Append(events) => {
                let mut answer = Vec::with_capacity(events.len());
                for e in events {
                    let (origin, seq) = (origins[at], seqs[at]);
                    at += 1;
                    if let Some(cursor) = cursors.get(&(origin, seq)) {
                        answer.push(Appended { cursor: *cursor as u64, duplicate: true });
                        continue;
                    }
                    let cursor = log.push(origin, seq, Cow::Borrowed(&e.event), Cow::Borrowed(&e.body)).await?;
                    cursors.insert((origin, seq), cursor);
                    answer.push(Appended { cursor: cursor as u64, duplicate: false });
                }
                Done::Appended(answer)
            }
            // Operations read the log and the state: what the group appended before them is
            // inserted first.
            Op::Hello(hello) => {
                log.flush().await?;
                Done::Hello(nodes::hello(&mut log, hello).await?)
            }
            Op::Liveness { key, lost, grace } => {
                log.flush().await?;
                Done::Liveness(nodes::liveness(&mut log, key, *lost, *grace).await?)
            }
            Op::Disconnected(key) => {
                nodes::disconnected(&mut log, key).await?;
                Done::State(0)
            }
            Op::Node(change) => {
                log.flush().await?;
                Done::Node(nodes::change(&mut log, change).await?)
            }
            Op::State(change) => {
                log.flush().await?;
                Done::State(state::apply(&mut log, change).await?)
            }
        };
        answers.push(done);
    }
    // The last rows, the head's move and COMMIT in one round trip.
    let next = log.next;
    let moved = async {
        if next > head {
            client.execute(&statements.move_head, &[&next, &CHANNEL, &received_ms]).await.map_err(pg)?;
        }
        Ok::<_, StoreError>(())
    };
    let committing = Instant::now();
    let (flushed, moved, committed) = tokio::join!(biased; log.flush(), moved, client.batch_execute("COMMIT"));
    // The first error is the cause: after it PostgreSQL refuses the rest, and answers COMMIT with
    // a rollback.
    flushed?;
    moved?;
    committed.map_err(pg)?;
    let times = GroupTimes { until_locked: holding - began, held: holding.elapsed(), commit: committing.elapsed() };
    Ok((answers, next as u64, times))
}

fn decode<M: prost::Message + Default>(table: &'static str, body: &[u8]) -> Result<M, StoreError> {
    M::decode(body).map_err(|e| StoreError::Corrupt { table, message: e.to_string() })
}

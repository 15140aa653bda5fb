//! The event log on PostgreSQL, for several center replicas on one database (issue 19, first
//! step: the log; the state beside it, and the center on top, follow).
//!
//! Cursors stay contiguous and in commit order across replicas: every append transaction first
//! locks the `log_head` row, gives its new events the cursors after the head, and commits with the
//! row moved, so the appends of all replicas commit one after another and a reader that sees
//! cursor N sees every cursor below it. Each replica groups what its callers queue into one
//! transaction (group commit), so the lock is taken once per group, not per event. Idempotence is
//! the identity (origin, sequence), looked up under the same lock; events the center makes get an
//! identity of their replica before the first attempt, so retrying a group whose commit was cut
//! off stores nothing twice. A commit notifies `nodekeeper_log` with the new head; listeners only
//! wake readers, which read the table.
//!
//! The connection is a libpq-style URL (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`):
//! after a failover the writer reconnects, finds the promoted primary, and retries its group.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::to_unix_ms;
use nodekeeper_proto::v1::Event;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use super::{Appended, Identity, NewEvent, OriginKey, Result, StoreError};

pub mod lease;

const MIGRATIONS: &[&str] = &[include_str!("postgres/0001_log.sql"), include_str!("postgres/0002_leases.sql")];

/// Commits notify this channel with the new head.
const CHANNEL: &str = "nodekeeper_log";

/// Serializes migrations of replicas that start together.
const MIGRATION_LOCK: i64 = 0x6e6f_6465_6b65_6570;

/// How long a group is retried across a lost connection (a failover) before its callers are told.
const RETRY_FOR: Duration = Duration::from_secs(60);

pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres { message: e.to_string() }
}

pub struct PgOptions {
    /// Events per group commit at most.
    pub commit_max_rows: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { commit_max_rows: 8192 }
    }
}

/// One replica's handle on the shared log.
pub struct PgLog {
    queue: mpsc::Sender<Job>,
    head: watch::Receiver<u64>,
    /// Connections for reads; a broken one is replaced when next taken.
    readers: deadpool_postgres::Pool,
    /// This replica's origin for the events the center makes, and their next sequence.
    center_origin: OriginKey,
    center_seq: AtomicU64,
}

struct Job {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
}

async fn connect(config: &Config) -> Result<Client> {
    let (client, conn) = config.connect(NoTls).await.map_err(pg)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

impl PgLog {
    /// Connects, refuses a server that would acknowledge what it has not made durable, applies
    /// the migrations not yet applied, and starts this replica's writer and listener.
    pub async fn open(url: &str, options: PgOptions) -> Result<PgLog> {
        let config: Config =
            url.parse().map_err(|e| StoreError::Postgres { message: format!("connection URL: {e}") })?;
        let mut client = connect(&config).await?;
        let sync: String = client.query_one("SHOW synchronous_commit", &[]).await.map_err(pg)?.get(0);
        if matches!(sync.as_str(), "off" | "local") {
            return Err(StoreError::NotDurable { found: sync });
        }
        migrate(&mut client).await?;
        let head = read_head(&client).await?;
        let (head_tx, head_rx) = watch::channel(head);
        let head_tx = Arc::new(head_tx);
        tokio::spawn(listen(config.clone(), head_tx.clone()));
        let (queue, jobs) = mpsc::channel(1024);
        tokio::spawn(write(config.clone(), client, jobs, head_tx, options));
        let manager = deadpool_postgres::Manager::from_config(
            config,
            NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let readers = deadpool_postgres::Pool::builder(manager)
            .max_size(16)
            .build()
            .map_err(|e| StoreError::Postgres { message: format!("connection pool: {e}") })?;
        Ok(PgLog {
            queue,
            head: head_rx,
            readers,
            center_origin: format!("c/{:016x}", rand::random::<u64>()).into(),
            center_seq: AtomicU64::new(1),
        })
    }

    /// Appends events; answered once their group committed. Duplicates (by identity) are not
    /// stored again and answered with the cursor they have.
    pub async fn append(&self, mut events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        for e in &mut events {
            if e.identity == Identity::Center {
                let sequence = self.center_seq.fetch_add(1, Ordering::Relaxed);
                e.identity = Identity::Keyed { origin: self.center_origin.clone(), sequence };
            }
        }
        let (reply, answer) = oneshot::channel();
        self.queue.send(Job { events, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The replica's pool of connections (for leases and reads beside the log).
    pub fn pool(&self) -> deadpool_postgres::Pool {
        self.readers.clone()
    }

    /// The newest cursor this replica knows committed (its own commits and every other replica's
    /// it was notified of).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Follows the head.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// Up to `limit` events after `after`, in cursor order.
    pub async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let reader = self.readers.get().await.map_err(|e| StoreError::Postgres { message: e.to_string() })?;
        let rows = reader
            .query(
                "SELECT cursor, body FROM events WHERE cursor > $1 ORDER BY cursor LIMIT $2",
                &[&(after as i64), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let body: &[u8] = r.get(1);
                let mut event: Event = prost::Message::decode(body)
                    .map_err(|e| StoreError::Corrupt { table: "events", message: e.to_string() })?;
                event.cursor = r.get::<_, i64>(0).to_string();
                Ok(event)
            })
            .collect()
    }
}

async fn read_head(client: &Client) -> Result<u64> {
    Ok(client.query_one("SELECT head FROM log_head", &[]).await.map_err(pg)?.get::<_, i64>(0) as u64)
}

/// Applies the migrations not yet applied, in one transaction under an advisory lock.
async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").await.map_err(pg)?;
    let applied: i32 =
        tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).await.map_err(pg)?.get(0);
    if applied as usize > MIGRATIONS.len() {
        return Err(StoreError::Postgres {
            message: format!("schema version {applied} is newer than this binary knows ({})", MIGRATIONS.len()),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Postgres { message: format!("migration {}: {e}", i + 1) })?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&(i as i32 + 1)]).await.map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

/// Keeps `head` at the newest cursor any replica committed: LISTEN, and the head read again after
/// every (re)connection, since notifications sent while away are lost.
async fn listen(config: Config, head: Arc<watch::Sender<u64>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if head.is_closed() {
            return;
        }
        match config.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (notes_tx, mut notes) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                let _ = notes_tx.send(n.payload().parse::<u64>().unwrap_or(0));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "postgres listener connection ended");
                                return;
                            }
                        }
                    }
                });
                let ready = async {
                    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(pg)?;
                    read_head(&client).await
                };
                if let Ok(now) = ready.await {
                    backoff = Duration::from_millis(100);
                    head.send_if_modified(|h| std::mem::replace(h, (*h).max(now)) < now);
                    while let Some(n) = notes.recv().await {
                        head.send_if_modified(|h| std::mem::replace(h, (*h).max(n)) < n);
                        if head.is_closed() {
                            break;
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect the postgres listener"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The replica's writer: takes queued appends in order, commits them in groups, answers after
/// the commit; across a lost connection it reconnects and retries the group.
async fn write(
    config: Config,
    mut client: Client,
    mut jobs: mpsc::Receiver<Job>,
    head: Arc<watch::Sender<u64>>,
    options: PgOptions,
) {
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        let mut rows = group[0].events.len();
        while rows < options.commit_max_rows {
            match jobs.try_recv() {
                Ok(job) => {
                    rows += job.events.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let outcome = loop {
            match append_group(&mut client, &group).await {
                Ok(done) => break Ok(done),
                Err(Conflict) => {
                    tracing::debug!("an identity of the group was stored by another replica meanwhile; trying again");
                }
                Err(Failed(e)) if client.is_closed() && started.elapsed() < RETRY_FOR => {
                    tracing::warn!(error = %e, "postgres connection lost during a commit; reconnecting to retry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(c) = connect(&config).await {
                        client = c;
                    }
                }
                Err(Failed(e)) => break Err(e),
            }
        };
        match outcome {
            Ok((answers, new_head)) => {
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

/// One group in one transaction: the answers per job, and the head after it.
async fn append_group(
    client: &mut Client,
    group: &[Job],
) -> std::result::Result<(Vec<Vec<Appended>>, u64), GroupError> {
    let tx = client.transaction().await.map_err(pg)?;
    // Intern every origin and node key the group names.
    let events = group.iter().flat_map(|j| &j.events);
    let mut keys: Vec<String> = Vec::new();
    let mut key_index: HashMap<String, usize> = HashMap::new();
    let mut intern = |k: String| {
        let next = key_index.len();
        *key_index.entry(k.clone()).or_insert_with(|| {
            keys.push(k);
            next
        })
    };
    let mut refs = Vec::new();
    for e in events.clone() {
        let Identity::Keyed { origin, sequence } = &e.identity else {
            // `append` gives center events their replica's identity before it queues them.
            let message = "an event without an identity reached the writer".into();
            return Err(Failed(StoreError::Postgres { message }));
        };
        let origin = intern(origin.to_string());
        let node = (!e.event.node.is_empty()).then(|| intern(super::node_origin(&e.event.cluster, &e.event.node)));
        refs.push((origin, *sequence as i64, node));
    }
    let rows = tx
        .query(
            "INSERT INTO origins (key) SELECT unnest($1::text[]) ON CONFLICT (key) DO UPDATE SET key = excluded.key
             RETURNING key, id",
            &[&keys],
        )
        .await
        .map_err(pg)?;
    let ids: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let id_of = |i: usize| ids[&keys[i]];

    // What is stored already, under the lock that every append takes.
    let (origins, seqs): (Vec<i64>, Vec<i64>) = refs.iter().map(|(o, s, _)| (id_of(*o), *s)).unzip();
    let stored = tx
        .query(
            "SELECT e.origin, e.origin_seq, e.cursor FROM events e
             JOIN unnest($1::bigint[], $2::bigint[]) AS i (origin, seq) ON e.origin = i.origin AND e.origin_seq = i.seq",
            &[&origins, &seqs],
        )
        .await
        .map_err(pg)?;
    let mut cursors: HashMap<(i64, i64), i64> = stored.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect();

    // From here to the commit, every other append waits: as few round trips as can be. The
    // lookup above cannot miss an identity another replica is storing: interning locked the
    // origin's row (ON CONFLICT DO UPDATE) until that replica's commit, so the lookup ran after
    // it. Should that ever change, the unique index fails the insert and the group is tried again.
    let head = tx.query_one("SELECT head FROM log_head FOR UPDATE", &[]).await.map_err(pg)?.get::<_, i64>(0);

    let received_ms = to_unix_ms(SystemTime::now());
    let mut next = head;
    let (mut c, mut o, mut s, mut n, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut answers = Vec::with_capacity(group.len());
    let mut at = 0;
    for job in group {
        let mut answer = Vec::with_capacity(job.events.len());
        for e in &job.events {
            let (origin, seq, node) = (origins[at], seqs[at], refs[at].2.map(id_of));
            at += 1;
            if let Some(cursor) = cursors.get(&(origin, seq)) {
                answer.push(Appended { cursor: *cursor as u64, duplicate: true });
                continue;
            }
            next += 1;
            cursors.insert((origin, seq), next);
            c.push(next);
            o.push(origin);
            s.push(seq);
            n.push(node);
            b.push(e.body.as_slice());
            answer.push(Appended { cursor: next as u64, duplicate: false });
        }
        answers.push(answer);
    }
    if next > head {
        // Sent together (pipelined on the connection), executed in order.
        let event_args: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [&c, &o, &s, &received_ms, &n, &b];
        let head_args: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&next, &CHANNEL];
        let insert = tx.execute(
            "INSERT INTO events (cursor, origin, origin_seq, received_ms, node_ref, body)
             SELECT cursor, origin, seq, $4, node_ref, body
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $5::bigint[], $6::bytea[])
                  AS i (cursor, origin, seq, node_ref, body)",
            &event_args,
        );
        let moved = tx.execute(
            "WITH moved AS (UPDATE log_head SET head = $1 RETURNING head) SELECT pg_notify($2, head::text) FROM moved",
            &head_args,
        );
        let (inserted, moved) = tokio::join!(insert, moved);
        if let Err(e) = &inserted
            && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
        {
            return Err(Conflict);
        }
        inserted.map_err(pg)?;
        moved.map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok((answers, next as u64))
}

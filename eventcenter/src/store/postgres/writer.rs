//! A replica's writer: appends queued by its callers committed in groups, each group under the
//! log head's lock (see the parent module).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::to_unix_ms;
use nodekeeper_proto::v1::{Event, Fault, NodeCondition};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, Config, Transaction};

use super::{CHANNEL, Job, PgOptions, RETRY_FOR, connect, pg};
use crate::store::fold::{FaultChange, fold};
use crate::store::{Appended, Identity, NewEvent, StoreError};

/// The replica's writer: takes queued appends in order, commits them in groups, answers after
/// the commit; across a lost connection it reconnects and retries the group.
pub(super) async fn write(
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
        let node =
            (!e.event.node.is_empty()).then(|| intern(crate::store::node_origin(&e.event.cluster, &e.event.node)));
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

    // What is stored already (why this lookup, before the lock, misses nothing: below).
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
    let locked = tx.query_one("SELECT head, received_ms FROM log_head FOR UPDATE", &[]).await.map_err(pg)?;
    let (head, last_received_ms): (i64, i64) = (locked.get(0), locked.get(1));

    let received_ms = to_unix_ms(SystemTime::now()).max(last_received_ms);
    let mut next = head;
    let (mut c, mut o, mut s, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut new_events: Vec<&NewEvent> = Vec::new();
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
            new_events.push(e);
            answer.push(Appended { cursor: next as u64, duplicate: false });
        }
        answers.push(answer);
    }
    // Condition events (few) fold into their faults, in cursor order, and are stored as folded.
    let mut folded: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut f: Vec<Option<i64>> = vec![None; new_events.len()];
    for (i, e) in new_events.iter().enumerate() {
        if e.event.condition.is_some() {
            let mut event = e.event.clone();
            fold_condition(&tx, &mut event, c[i]).await?;
            f[i] = (event.fault_id != 0).then_some(event.fault_id as i64);
            folded.insert(i, prost::Message::encode_to_vec(&event));
        }
    }
    let b: Vec<&[u8]> =
        new_events.iter().enumerate().map(|(i, e)| folded.get(&i).map_or(e.body.as_slice(), Vec::as_slice)).collect();
    if next > head {
        // Sent together (pipelined on the connection), executed in order.
        let event_args: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [&c, &o, &s, &received_ms, &n, &b, &f];
        let head_args: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&next, &CHANNEL, &received_ms];
        let insert = tx.execute(
            "INSERT INTO events (cursor, origin, origin_seq, received_ms, node_ref, body, fault_id)
             SELECT cursor, origin, seq, $4, node_ref, body, fault_id
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $5::bigint[], $6::bytea[], $7::bigint[])
                  AS i (cursor, origin, seq, node_ref, body, fault_id)",
            &event_args,
        );
        let moved = tx.execute(
            "WITH moved AS (UPDATE log_head SET head = $1, received_ms = $3 RETURNING head)
             SELECT pg_notify($2, head::text) FROM moved",
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

/// Folds a condition event into the node's condition and its fault (see `store::fold`), in the
/// group's transaction: under the head's lock, so replicas fold one after another.
async fn fold_condition(tx: &Transaction<'_>, event: &mut Event, cursor: i64) -> Result<(), StoreError> {
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
    let save = |fault: &Fault| {
        let (id, state, body) = (fault.id as i64, fault.state, prost::Message::encode_to_vec(fault));
        async move {
            tx.execute("UPDATE faults SET state = $2, body = $3 WHERE id = $1", &[&id, &state, &body])
                .await
                .map(drop)
                .map_err(pg)
        }
    };
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
            save(&fault).await?;
            event.fault_id = fault.id;
        }
        FaultChange::Update(fault) => save(&fault).await?,
        FaultChange::None => {}
    }
    Ok(())
}

fn decode<M: prost::Message + Default>(table: &'static str, body: &[u8]) -> Result<M, StoreError> {
    M::decode(body).map_err(|e| StoreError::Corrupt { table, message: e.to_string() })
}

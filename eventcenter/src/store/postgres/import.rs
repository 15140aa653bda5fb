//! `nodekeeper-eventcenter migrate`: copies a SQLite store into an empty PostgreSQL database,
//! every row as it is: cursors, fault ids, origins, consumers' positions, permits, guards,
//! rollouts and the retention floor. One transaction: a copy cut off leaves the database empty.
//! The center must be stopped while it runs (the copy is of one moment of the SQLite file).

use std::path::Path;

use rusqlite::types::ValueRef;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{Database, PgTls, migrate, pg};
use crate::store::{Result, StoreError};

#[derive(Clone, Copy)]
enum Col {
    Int,
    Int4,
    Bool,
    Text,
    Bytes,
}

/// Every table of the store (their columns are the same in both engines), parents first.
const TABLES: &[(&str, &[(&str, Col)])] = &[
    ("origins", &[("id", Col::Int), ("key", Col::Text)]),
    (
        "events",
        &[
            ("cursor", Col::Int),
            ("origin", Col::Int),
            ("origin_seq", Col::Int),
            ("received_ms", Col::Int),
            ("fault_id", Col::Int),
            ("node_ref", Col::Int),
            ("body", Col::Bytes),
        ],
    ),
    (
        "nodes",
        &[
            ("cluster", Col::Text),
            ("name", Col::Text),
            ("lost", Col::Bool),
            ("liveness_changed_ms", Col::Int),
            ("info", Col::Bytes),
            ("decommissioned_ms", Col::Int),
        ],
    ),
    (
        "faults",
        &[
            ("id", Col::Int),
            ("cluster", Col::Text),
            ("node", Col::Text),
            ("type", Col::Text),
            ("state", Col::Int4),
            ("body", Col::Bytes),
        ],
    ),
    ("conditions", &[("cluster", Col::Text), ("node", Col::Text), ("type", Col::Text), ("body", Col::Bytes)]),
    ("consumers", &[("name", Col::Text), ("acked_cursor", Col::Int), ("updated_ms", Col::Int)]),
    (
        "desired_components",
        &[("cluster", Col::Text), ("target", Col::Text), ("generation", Col::Int), ("specs", Col::Bytes)],
    ),
    (
        "component_status",
        &[("cluster", Col::Text), ("node", Col::Text), ("updated_ms", Col::Int), ("body", Col::Bytes)],
    ),
    (
        "permits",
        &[
            ("id", Col::Text),
            ("cluster", Col::Text),
            ("granted_ms", Col::Int),
            ("active", Col::Bool),
            ("body", Col::Bytes),
        ],
    ),
    ("guards", &[("cluster", Col::Text), ("body", Col::Bytes)]),
    ("rollouts", &[("name", Col::Text), ("cluster", Col::Text), ("body", Col::Bytes)]),
    ("rollout_events", &[("name", Col::Text), ("cursor", Col::Int)]),
];

/// Rows copied, by table.
pub type Copied = Vec<(&'static str, u64)>;

/// Copies the SQLite store in `dir` (brought to this binary's schema first) into the empty
/// database at `url`; `progress` is told each table as it is done.
pub async fn from_sqlite(dir: &Path, url: &str, tls: &PgTls, progress: impl Fn(&str, u64)) -> Result<Copied> {
    let file = dir.join("eventcenter.db");
    if !file.is_file() {
        return Err(StoreError::Postgres { message: format!("no SQLite store at {}", file.display()) });
    }
    // Opening migrates the file to this binary's schema (and recovers its write-ahead log).
    crate::store::Sqlite::open(dir, Default::default())?.close().await;
    let sqlite = rusqlite::Connection::open_with_flags(&file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| sqlite_error(&file, e))?;
    let mut client = Database::new(url, tls)?.connect().await?;
    migrate(&mut client).await?;
    let tx = client.transaction().await.map_err(pg)?;
    let head: i64 = tx.query_one("SELECT head FROM log_head FOR UPDATE", &[]).await.map_err(pg)?.get(0);
    let nodes: i64 = tx.query_one("SELECT COUNT(*) FROM nodes", &[]).await.map_err(pg)?.get(0);
    if head != 0 || nodes != 0 {
        return Err(StoreError::Postgres {
            message: format!(
                "the target database is not empty (head cursor {head}, {nodes} nodes): migrate into a new one"
            ),
        });
    }
    let mut copied = Vec::new();
    for (table, cols) in TABLES {
        let names = cols.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        let types: Vec<Type> = cols
            .iter()
            .map(|(_, c)| match c {
                Col::Int => Type::INT8,
                Col::Int4 => Type::INT4,
                Col::Bool => Type::BOOL,
                Col::Text => Type::TEXT,
                Col::Bytes => Type::BYTEA,
            })
            .collect();
        let sink = tx.copy_in(&format!("COPY {table} ({names}) FROM STDIN BINARY")).await.map_err(pg)?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        tokio::pin!(writer);
        let mut stmt = sqlite.prepare(&format!("SELECT {names} FROM {table}")).map_err(|e| sqlite_error(&file, e))?;
        let mut rows = stmt.query([]).map_err(|e| sqlite_error(&file, e))?;
        while let Some(row) = rows.next().map_err(|e| sqlite_error(&file, e))? {
            let mut values: Vec<Box<dyn ToSql + Sync + Send>> = Vec::with_capacity(cols.len());
            for (i, (name, col)) in cols.iter().enumerate() {
                let v = row.get_ref(i).map_err(|e| sqlite_error(&file, e))?;
                values.push(value(v, *col).ok_or_else(|| StoreError::Corrupt {
                    table,
                    message: format!("column {name} holds {:?}, not what the schema says", v.data_type()),
                })?);
            }
            let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect();
            writer.as_mut().write(&refs).await.map_err(pg)?;
        }
        let n = writer.finish().await.map_err(pg)?;
        progress(table, n);
        copied.push((*table, n));
    }
    // What the numbering goes on from, and where the log stands.
    let floor: i64 = sqlite
        .query_row("SELECT COALESCE((SELECT value FROM meta WHERE key = 'retention_floor'), 0)", [], |r| r.get(0))
        .map_err(|e| sqlite_error(&file, e))?;
    tx.batch_execute(
        "SELECT setval('origins_id_seq', GREATEST((SELECT MAX(id) FROM origins), 1));
         SELECT setval('faults_id_seq', GREATEST((SELECT MAX(id) FROM faults), 1));
         SELECT setval('components_generation', GREATEST((SELECT MAX(generation) FROM desired_components), 1));",
    )
    .await
    .map_err(pg)?;
    tx.execute(
        "UPDATE log_head SET head = GREATEST((SELECT COALESCE(MAX(cursor), 0) FROM events), $1),
             received_ms = (SELECT COALESCE(MAX(received_ms), 0) FROM events), floor = $1",
        &[&floor],
    )
    .await
    .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    Ok(copied)
}

/// A SQLite value as the PostgreSQL column wants it; `None` if it is not of the column's kind.
fn value(v: ValueRef<'_>, col: Col) -> Option<Box<dyn ToSql + Sync + Send>> {
    Some(match (v, col) {
        (ValueRef::Null, Col::Int) => Box::new(None::<i64>),
        (ValueRef::Integer(i), Col::Int) => Box::new(i),
        (ValueRef::Integer(i), Col::Int4) => Box::new(i32::try_from(i).ok()?),
        (ValueRef::Integer(i), Col::Bool) => Box::new(i != 0),
        (ValueRef::Text(t), Col::Text) => Box::new(std::str::from_utf8(t).ok()?.to_owned()),
        (ValueRef::Blob(b), Col::Bytes) => Box::new(b.to_vec()),
        _ => return None,
    })
}

fn sqlite_error(file: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Postgres { message: format!("reading {}: {e}", file.display()) }
}

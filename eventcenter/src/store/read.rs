//! Queries on read-only connections.

use nodekeeper_common::time::timestamp_from_unix_ms;
use nodekeeper_proto::v1::{Consumer, Event, Fault, Liveness, Node, NodeCondition};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use super::{NodeKey, Result, Sqlite, StoreError};

fn decode<M: Message + Default>(table: &'static str, bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt { table, message: e.to_string() })
}

fn sql(e: rusqlite::Error) -> StoreError {
    StoreError::Sqlite { path: "read".into(), message: e.to_string() }
}

/// Which faults to list.
#[derive(Debug, Clone, Default)]
pub struct FaultFilter {
    pub clusters: Vec<String>,
    pub nodes: Vec<String>,
    pub states: Vec<i32>,
    pub types: Vec<String>,
    pub limit: usize,
}

fn read_events(conn: &Connection, after: u64, limit: usize) -> Result<Vec<Event>> {
    events_where(conn, "cursor > ?1 ORDER BY cursor LIMIT ?2", params![after as i64, limit as i64])
}

/// The events `SELECT cursor, body FROM events WHERE <clause>` finds, each with its cursor.
fn events_where(conn: &Connection, clause: &str, args: impl rusqlite::Params) -> Result<Vec<Event>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT cursor, body FROM events WHERE {clause}")).map_err(sql)?;
    let rows = stmt.query_map(args, |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))).map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (cursor, body) = row.map_err(sql)?;
        let mut event: Event = decode("events", &body)?;
        event.cursor = cursor.to_string();
        out.push(event);
    }
    Ok(out)
}

/// One target's desired components: (target, generation, specs).
pub type DesiredRow = (String, u64, Vec<nodekeeper_proto::v1::ComponentSpec>);

impl Sqlite {
    /// Every target's desired components in a cluster, oldest generation first.
    pub async fn desired_components(&self, cluster: String) -> Result<Vec<DesiredRow>> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT target, generation, specs FROM desired_components WHERE cluster = ?1 ORDER BY generation",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map([cluster], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)))
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (target, generation, specs) = row.map_err(sql)?;
                let state: nodekeeper_proto::v1::DesiredState = decode("desired_components", &specs)?;
                out.push((target, generation as u64, state.components));
            }
            Ok(out)
        })
        .await
    }

    /// Permits granted since `since_ms`, and every active one, with whether it is active.
    pub async fn permits_since(&self, since_ms: i64) -> Result<Vec<(nodekeeper_proto::v1::Permit, bool)>> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT body, active FROM permits WHERE granted_ms >= ?1 OR active = 1 ORDER BY granted_ms",
                )
                .map_err(sql)?;
            let rows =
                stmt.query_map([since_ms], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?))).map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (body, active) = row.map_err(sql)?;
                out.push((decode("permits", &body)?, active));
            }
            Ok(out)
        })
        .await
    }

    /// Every stored freeze and breaker ("" cluster: the global freeze).
    pub async fn guards(&self) -> Result<Vec<nodekeeper_proto::v1::ClusterGuard>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT body FROM guards ORDER BY cluster").map_err(sql)?;
            let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(decode("guards", &row.map_err(sql)?)?);
            }
            Ok(out)
        })
        .await
    }

    /// The component status each node reported last, by (cluster, node).
    /// The component status reports of the clusters' nodes (every cluster when empty), or of
    /// `one` node only.
    pub async fn component_statuses(
        &self,
        clusters: Vec<String>,
        one: Option<NodeKey>,
    ) -> Result<Vec<(String, String, nodekeeper_proto::v1::ComponentStatusReport)>> {
        self.read(move |c| {
            let (query, args) = match (&one, clusters.as_slice()) {
                (Some(k), _) => (
                    "SELECT cluster, node, body FROM component_status WHERE cluster = ?1 AND node = ?2",
                    vec![&k.cluster, &k.node],
                ),
                (None, [c]) => {
                    ("SELECT cluster, node, body FROM component_status WHERE cluster = ?1 ORDER BY node", vec![c])
                }
                (None, _) => ("SELECT cluster, node, body FROM component_status ORDER BY cluster, node", vec![]),
            };
            let mut stmt = c.prepare_cached(query).map_err(sql)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
                })
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (cluster, node, body) = row.map_err(sql)?;
                if !clusters.is_empty() && !clusters.contains(&cluster) {
                    continue;
                }
                out.push((cluster, node, decode("component_status", &body)?));
            }
            Ok(out)
        })
        .await
    }

    /// Up to `limit` events with a cursor greater than `after`, in cursor order.
    pub async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        self.read(move |c| read_events(c, after, limit)).await
    }

    /// The nodes of the clusters (every cluster when empty), decommissioned ones only when asked.
    pub async fn list_nodes(&self, clusters: Vec<String>, include_decommissioned: bool) -> Result<Vec<Node>> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT info, lost, liveness_changed_ms FROM nodes WHERE ?1 OR decommissioned_ms IS NULL
                     ORDER BY cluster, name",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map([include_decommissioned], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (info, lost, changed) = row.map_err(sql)?;
                let mut node: Node = decode("nodes", &info)?;
                if !clusters.is_empty() && !clusters.contains(&node.cluster) {
                    continue;
                }
                stored_node(&mut node, lost, changed);
                out.push(node);
            }
            let mut by_node: std::collections::HashMap<(String, String), Vec<NodeCondition>> =
                std::collections::HashMap::new();
            for c in conditions(c, &clusters, &[])? {
                by_node.entry((c.cluster.clone(), c.node.clone())).or_default().push(c);
            }
            for node in &mut out {
                node.conditions = by_node.remove(&(node.cluster.clone(), node.name.clone())).unwrap_or_default();
            }
            Ok(out)
        })
        .await
    }

    /// How many nodes a cluster has (without reading them), decommissioned ones left out.
    pub async fn count_nodes(&self, cluster: String) -> Result<usize> {
        self.read(move |c| {
            c.prepare_cached("SELECT COUNT(*) FROM nodes WHERE cluster = ?1 AND decommissioned_ms IS NULL")
                .and_then(|mut s| s.query_row([cluster], |r| r.get::<_, i64>(0)))
                .map(|n| n as usize)
                .map_err(sql)
        })
        .await
    }

    /// Up to `limit` events about one node with a cursor below `before`, newest first (from the
    /// node index: events stored since migration 6).
    pub async fn node_events_before(&self, key: NodeKey, before: u64, limit: usize) -> Result<Vec<Event>> {
        self.read(move |c| {
            let origin = super::node_origin(&key.cluster, &key.node);
            let clause =
                "node_ref = (SELECT id FROM origins WHERE key = ?1) AND cursor < ?2 ORDER BY cursor DESC LIMIT ?3";
            events_where(c, clause, params![origin, before.min(i64::MAX as u64) as i64, limit as i64])
        })
        .await
    }

    /// Every cluster with nodes, with how many (decommissioned ones left out).
    pub async fn cluster_sizes(&self) -> Result<Vec<(String, usize)>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT cluster, COUNT(*) FROM nodes WHERE decommissioned_ms IS NULL GROUP BY cluster ORDER BY cluster",
                )
                .map_err(sql)?;
            let rows = s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize))).map_err(sql)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql)
        })
        .await
    }

    pub async fn get_node(&self, key: NodeKey) -> Result<Option<Node>> {
        self.read(move |c| {
            let row: Option<(Vec<u8>, bool, i64)> = c
                .prepare_cached("SELECT info, lost, liveness_changed_ms FROM nodes WHERE cluster = ?1 AND name = ?2")
                .and_then(|mut s| {
                    s.query_row(params![key.cluster, key.node], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional()
                })
                .map_err(sql)?;
            let Some((info, lost, changed)) = row else { return Ok(None) };
            let mut node: Node = decode("nodes", &info)?;
            stored_node(&mut node, lost, changed);
            node.conditions = conditions(c, &[key.cluster], &[key.node])?;
            Ok(Some(node))
        })
        .await
    }

    /// The rollouts of the clusters (every cluster when empty), by name.
    pub async fn list_rollouts(&self, clusters: Vec<String>) -> Result<Vec<nodekeeper_proto::v1::Rollout>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT cluster, body FROM rollouts ORDER BY name").map_err(sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))).map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (cluster, body) = row.map_err(sql)?;
                if clusters.is_empty() || clusters.contains(&cluster) {
                    out.push(decode("rollouts", &body)?);
                }
            }
            Ok(out)
        })
        .await
    }

    /// A rollout, without its timeline.
    pub async fn rollout(&self, name: String) -> Result<Option<nodekeeper_proto::v1::Rollout>> {
        self.read(move |c| rollout(c, &name)).await
    }

    /// A rollout and its timeline, oldest event first.
    pub async fn get_rollout(&self, name: String) -> Result<Option<(nodekeeper_proto::v1::Rollout, Vec<Event>)>> {
        self.read(move |c| {
            let Some(r) = rollout(c, &name)? else { return Ok(None) };
            let clause = "cursor IN (SELECT cursor FROM rollout_events WHERE name = ?1) ORDER BY cursor";
            Ok(Some((r, events_where(c, clause, [&name])?)))
        })
        .await
    }

    /// The types of the open faults (not resolved) of each node of the clusters (every cluster
    /// when empty), or of `one` node only.
    pub async fn open_fault_types(
        &self,
        clusters: Vec<String>,
        one: Option<NodeKey>,
    ) -> Result<std::collections::HashMap<(String, String), Vec<String>>> {
        self.read(move |c| {
            let (query, args) = match (&one, clusters.as_slice()) {
                (Some(k), _) => (
                    "SELECT cluster, node, type FROM faults WHERE state <> 4 AND cluster = ?1 AND node = ?2 ORDER BY type",
                    vec![&k.cluster, &k.node],
                ),
                (None, [c]) => (
                    "SELECT cluster, node, type FROM faults WHERE state <> 4 AND cluster = ?1 ORDER BY node, type",
                    vec![c],
                ),
                (None, _) => ("SELECT cluster, node, type FROM faults WHERE state <> 4 ORDER BY cluster, node, type", vec![]),
            };
            let mut stmt = c.prepare_cached(query).map_err(sql)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .map_err(sql)?;
            let mut out: std::collections::HashMap<(String, String), Vec<String>> = Default::default();
            for row in rows {
                let (cluster, node, kind) = row.map_err(sql)?;
                if clusters.is_empty() || clusters.contains(&cluster) {
                    out.entry((cluster, node)).or_default().push(kind);
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn list_conditions(&self, clusters: Vec<String>, nodes: Vec<String>) -> Result<Vec<NodeCondition>> {
        self.read(move |c| conditions(c, &clusters, &nodes)).await
    }

    pub async fn list_faults(&self, filter: FaultFilter) -> Result<Vec<Fault>> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT cluster, node, state, type, body FROM faults ORDER BY id DESC")
                .map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql)? {
                let cluster: String = r.get(0).map_err(sql)?;
                let node: String = r.get(1).map_err(sql)?;
                let state: i32 = r.get(2).map_err(sql)?;
                let kind: String = r.get(3).map_err(sql)?;
                if (!filter.clusters.is_empty() && !filter.clusters.contains(&cluster))
                    || (!filter.nodes.is_empty() && !filter.nodes.contains(&node))
                    || (!filter.states.is_empty() && !filter.states.contains(&state))
                    || (!filter.types.is_empty() && !filter.types.contains(&kind))
                {
                    continue;
                }
                let body: Vec<u8> = r.get(4).map_err(sql)?;
                out.push(decode("faults", &body)?);
                if out.len() >= filter.limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Faults not resolved, counted by (type, severity, state). Reads only those rows (a partial
    /// index holds them).
    pub async fn unresolved_fault_counts(&self) -> Result<std::collections::BTreeMap<(String, i32, i32), u64>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT body FROM faults WHERE state <> 4").map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            let mut out = std::collections::BTreeMap::new();
            while let Some(r) = rows.next().map_err(sql)? {
                let f: Fault = decode("faults", &r.get::<_, Vec<u8>>(0).map_err(sql)?)?;
                *out.entry((f.r#type, f.severity, f.state)).or_default() += 1;
            }
            Ok(out)
        })
        .await
    }

    /// A fault, without its events.
    pub async fn fault(&self, id: u64) -> Result<Option<Fault>> {
        self.read(move |c| fault(c, id)).await
    }

    /// A fault and the events folded into it, in cursor order.
    pub async fn get_fault(&self, id: u64) -> Result<Option<(Fault, Vec<Event>)>> {
        self.read(move |c| {
            let Some(fault) = fault(c, id)? else { return Ok(None) };
            let events = events_where(c, "fault_id = ?1 ORDER BY cursor", [id as i64])?;
            Ok(Some((fault, events)))
        })
        .await
    }

    pub async fn list_consumers(&self) -> Result<Vec<Consumer>> {
        let head = self.head();
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT name, acked_cursor, updated_ms FROM consumers ORDER BY name").map_err(sql)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (name, acked, updated) = row.map_err(sql)?;
                out.push(Consumer {
                    name,
                    acked_cursor: acked.to_string(),
                    updated_time: Some(timestamp_from_unix_ms(updated)),
                    lag: head.saturating_sub(acked as u64),
                    owner: String::new(),
                });
            }
            Ok(out)
        })
        .await
    }

    /// A durable consumer's acknowledged cursor, if it exists.
    pub async fn consumer_position(&self, name: String) -> Result<Option<u64>> {
        self.read(move |c| {
            c.prepare_cached("SELECT acked_cursor FROM consumers WHERE name = ?1")
                .and_then(|mut s| s.query_row([name], |r| r.get::<_, i64>(0)).optional())
                .map(|v| v.map(|v| v as u64))
                .map_err(sql)
        })
        .await
    }
}

fn fault(c: &Connection, id: u64) -> Result<Option<Fault>> {
    let body: Option<Vec<u8>> = c
        .prepare_cached("SELECT body FROM faults WHERE id = ?1")
        .and_then(|mut s| s.query_row([id as i64], |r| r.get(0)).optional())
        .map_err(sql)?;
    body.map(|b| decode("faults", &b)).transpose()
}

fn conditions(c: &Connection, clusters: &[String], nodes: &[String]) -> Result<Vec<NodeCondition>> {
    // One node, or one cluster: read by the primary key, not the whole table.
    let (query, args): (&str, Vec<&String>) = match (clusters, nodes) {
        ([cluster], [node]) => (
            "SELECT cluster, node, body FROM conditions WHERE cluster = ?1 AND node = ?2 ORDER BY type",
            vec![cluster, node],
        ),
        ([cluster], _) => {
            ("SELECT cluster, node, body FROM conditions WHERE cluster = ?1 ORDER BY node, type", vec![cluster])
        }
        _ => ("SELECT cluster, node, body FROM conditions ORDER BY cluster, node, type", vec![]),
    };
    let mut stmt = c.prepare_cached(query).map_err(sql)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
        })
        .map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (cluster, node, body) = row.map_err(sql)?;
        if (!clusters.is_empty() && !clusters.contains(&cluster)) || (!nodes.is_empty() && !nodes.contains(&node)) {
            continue;
        }
        out.push(decode("conditions", &body)?);
    }
    Ok(out)
}

fn rollout(c: &Connection, name: &str) -> Result<Option<nodekeeper_proto::v1::Rollout>> {
    let body: Option<Vec<u8>> = c
        .prepare_cached("SELECT body FROM rollouts WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
        .map_err(sql)?;
    body.map(|b| decode("rollouts", &b)).transpose()
}

/// A node as readers see it: liveness from the columns, labels merged.
pub(super) fn stored_node(node: &mut Node, lost: bool, changed_ms: i64) {
    node.liveness = if lost { Liveness::Lost } else { Liveness::Alive } as i32;
    node.liveness_changed_time = Some(timestamp_from_unix_ms(changed_ms));
    node.labels = super::merged_labels(node);
}

//! What the center knows of the fleet, read from PostgreSQL (as `store::read` reads SQLite):
//! nodes, conditions, faults, component state, permits, guards, rollouts. Filters go to the
//! database as arrays (an empty one: everything).

use std::collections::{BTreeMap, HashMap};

use nodekeeper_proto::v1::{
    ClusterGuard, ComponentStatusReport, DesiredState, Event, Fault, Node, NodeCondition, Permit, Rollout,
};

use super::read::{decode, event_of};
use super::{PgStore, pg};
use crate::store::{DesiredRow, FaultFilter, NodeKey, Result};

impl PgStore {
    /// A node as readers see it (liveness from the columns, labels merged, its conditions).
    pub async fn get_node(&self, key: NodeKey) -> Result<Option<Node>> {
        let reader = self.reader().await?;
        let Some(row) = reader
            .query_opt(
                "SELECT info, lost, liveness_changed_ms, connections FROM nodes WHERE cluster = $1 AND name = $2",
                &[&key.cluster, &key.node],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(None);
        };
        let mut node: Node = decode("nodes", row.get(0))?;
        crate::store::read::stored_node(&mut node, row.get(1), row.get(2));
        node.connected = row.get::<_, i32>(3) > 0;
        let conditions = reader
            .query(
                "SELECT body FROM conditions WHERE cluster = $1 AND node = $2 ORDER BY type",
                &[&key.cluster, &key.node],
            )
            .await
            .map_err(pg)?;
        node.conditions = conditions.iter().map(|r| decode("conditions", r.get(0))).collect::<Result<_>>()?;
        Ok(Some(node))
    }

    /// A fault and its timeline (the events folded into it, oldest first).
    pub async fn get_fault(&self, id: u64) -> Result<Option<(Fault, Vec<Event>)>> {
        let reader = self.reader().await?;
        let Some(row) = reader.query_opt("SELECT body FROM faults WHERE id = $1", &[&(id as i64)]).await.map_err(pg)?
        else {
            return Ok(None);
        };
        let fault: Fault = decode("faults", row.get(0))?;
        let rows = reader
            .query("SELECT cursor, body FROM events WHERE fault_id = $1 ORDER BY cursor", &[&(id as i64)])
            .await
            .map_err(pg)?;
        Ok(Some((fault, rows.iter().map(event_of).collect::<Result<_>>()?)))
    }

    /// Every target's desired components in a cluster, oldest generation first.
    pub async fn desired_components(&self, cluster: &str) -> Result<Vec<DesiredRow>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT target, generation, specs FROM desired_components WHERE cluster = $1 ORDER BY generation",
                &[&cluster],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let state: DesiredState = decode("desired_components", r.get(2))?;
                Ok((r.get(0), r.get::<_, i64>(1) as u64, state.components))
            })
            .collect()
    }

    /// Permits granted since `since_ms`, and every active one, with whether it is active.
    pub async fn permits_since(&self, since_ms: i64) -> Result<Vec<(Permit, bool)>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT body, active FROM permits WHERE granted_ms >= $1 OR active ORDER BY granted_ms",
                &[&since_ms],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| Ok((decode("permits", r.get(0))?, r.get(1)))).collect()
    }

    /// Every stored freeze and breaker ("" cluster: the global freeze).
    pub async fn guards(&self) -> Result<Vec<ClusterGuard>> {
        let rows = self.reader().await?.query("SELECT body FROM guards ORDER BY cluster", &[]).await.map_err(pg)?;
        rows.iter().map(|r| decode("guards", r.get(0))).collect()
    }

    /// A rollout and its timeline, oldest event first.
    pub async fn get_rollout(&self, name: &str) -> Result<Option<(Rollout, Vec<Event>)>> {
        let reader = self.reader().await?;
        let Some(row) = reader.query_opt("SELECT body FROM rollouts WHERE name = $1", &[&name]).await.map_err(pg)?
        else {
            return Ok(None);
        };
        let rollout = decode("rollouts", row.get(0))?;
        let rows = reader
            .query(
                "SELECT e.cursor, e.body FROM events e JOIN rollout_events r ON r.cursor = e.cursor
                 WHERE r.name = $1 ORDER BY e.cursor",
                &[&name],
            )
            .await
            .map_err(pg)?;
        Ok(Some((rollout, rows.iter().map(event_of).collect::<Result<_>>()?)))
    }

    /// The nodes of the clusters (every cluster when empty), decommissioned ones only when asked,
    /// with their conditions.
    pub async fn list_nodes(&self, clusters: Vec<String>, include_decommissioned: bool) -> Result<Vec<Node>> {
        let reader = self.reader().await?;
        let rows = reader
            .query(
                "SELECT info, lost, liveness_changed_ms, connections FROM nodes
                 WHERE (cardinality($1::text[]) = 0 OR cluster = ANY($1)) AND ($2 OR decommissioned_ms IS NULL)
                 ORDER BY cluster, name",
                &[&clusters, &include_decommissioned],
            )
            .await
            .map_err(pg)?;
        let mut by_node: HashMap<(String, String), Vec<NodeCondition>> = HashMap::new();
        for c in self.list_conditions(clusters, Vec::new()).await? {
            by_node.entry((c.cluster.clone(), c.node.clone())).or_default().push(c);
        }
        rows.iter()
            .map(|r| {
                let mut node: Node = decode("nodes", r.get(0))?;
                crate::store::read::stored_node(&mut node, r.get(1), r.get(2));
                node.connected = r.get::<_, i32>(3) > 0;
                node.conditions = by_node.remove(&(node.cluster.clone(), node.name.clone())).unwrap_or_default();
                Ok(node)
            })
            .collect()
    }

    /// Per cluster: nodes (decommissioned ones left out), lost, with a stream open.
    pub async fn census(&self) -> Result<std::collections::BTreeMap<String, crate::store::Census>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT cluster, COUNT(*), COUNT(*) FILTER (WHERE lost), COUNT(*) FILTER (WHERE connections > 0)
                 FROM nodes WHERE decommissioned_ms IS NULL GROUP BY cluster",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| {
                let n = |i| r.get::<_, i64>(i) as u64;
                (r.get(0), crate::store::Census { nodes: n(1), lost: n(2), connected: n(3) })
            })
            .collect())
    }

    /// How many nodes a cluster has, decommissioned ones left out.
    pub async fn count_nodes(&self, cluster: &str) -> Result<usize> {
        let row = self
            .reader()
            .await?
            .query_one("SELECT COUNT(*) FROM nodes WHERE cluster = $1 AND decommissioned_ms IS NULL", &[&cluster])
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    /// Every cluster with nodes, with how many (decommissioned ones left out).
    pub async fn cluster_sizes(&self) -> Result<Vec<(String, usize)>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT cluster, COUNT(*) FROM nodes WHERE decommissioned_ms IS NULL GROUP BY cluster ORDER BY cluster",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as usize)).collect())
    }

    /// The conditions of the clusters' and nodes' (every one where empty).
    pub async fn list_conditions(&self, clusters: Vec<String>, nodes: Vec<String>) -> Result<Vec<NodeCondition>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT body FROM conditions
                 WHERE (cardinality($1::text[]) = 0 OR cluster = ANY($1)) AND (cardinality($2::text[]) = 0 OR node = ANY($2))
                 ORDER BY cluster, node, type",
                &[&clusters, &nodes],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| decode("conditions", r.get(0))).collect()
    }

    /// Faults matching the filter, newest first.
    pub async fn list_faults(&self, filter: FaultFilter) -> Result<Vec<Fault>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT body FROM faults
                 WHERE (cardinality($1::text[]) = 0 OR cluster = ANY($1)) AND (cardinality($2::text[]) = 0 OR node = ANY($2))
                   AND (cardinality($3::int[]) = 0 OR state = ANY($3)) AND (cardinality($4::text[]) = 0 OR type = ANY($4))
                 ORDER BY id DESC LIMIT $5",
                &[&filter.clusters, &filter.nodes, &filter.states, &filter.types, &(filter.limit as i64)],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| decode("faults", r.get(0))).collect()
    }

    /// Faults not resolved, counted by (type, severity, state).
    pub async fn unresolved_fault_counts(&self) -> Result<BTreeMap<(String, i32, i32), u64>> {
        let rows = self.reader().await?.query("SELECT body FROM faults WHERE state <> 4", &[]).await.map_err(pg)?;
        let mut out = BTreeMap::new();
        for r in &rows {
            let f: Fault = decode("faults", r.get(0))?;
            *out.entry((f.r#type, f.severity, f.state)).or_default() += 1;
        }
        Ok(out)
    }

    /// The types of the open faults of each node of the clusters (every cluster when empty), or
    /// of `one` node only.
    pub async fn open_fault_types(
        &self,
        clusters: Vec<String>,
        one: Option<NodeKey>,
    ) -> Result<HashMap<(String, String), Vec<String>>> {
        let (clusters, nodes) = scope(clusters, one);
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT cluster, node, type FROM faults WHERE state <> 4
                   AND (cardinality($1::text[]) = 0 OR cluster = ANY($1)) AND (cardinality($2::text[]) = 0 OR node = ANY($2))
                 ORDER BY cluster, node, type",
                &[&clusters, &nodes],
            )
            .await
            .map_err(pg)?;
        let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
        for r in &rows {
            out.entry((r.get(0), r.get(1))).or_default().push(r.get(2));
        }
        Ok(out)
    }

    /// The component status reports of the clusters' nodes (every cluster when empty), or of
    /// `one` node only.
    pub async fn component_statuses(
        &self,
        clusters: Vec<String>,
        one: Option<NodeKey>,
    ) -> Result<Vec<(String, String, ComponentStatusReport)>> {
        let (clusters, nodes) = scope(clusters, one);
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT cluster, node, body FROM component_status
                 WHERE (cardinality($1::text[]) = 0 OR cluster = ANY($1)) AND (cardinality($2::text[]) = 0 OR node = ANY($2))
                 ORDER BY cluster, node",
                &[&clusters, &nodes],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| Ok((r.get(0), r.get(1), decode("component_status", r.get(2))?))).collect()
    }

    /// The rollouts of the clusters (every cluster when empty), by name.
    pub async fn list_rollouts(&self, clusters: Vec<String>) -> Result<Vec<Rollout>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT body FROM rollouts WHERE cardinality($1::text[]) = 0 OR cluster = ANY($1) ORDER BY name",
                &[&clusters],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| decode("rollouts", r.get(0))).collect()
    }

    /// A rollout, without its timeline.
    pub async fn rollout(&self, name: &str) -> Result<Option<Rollout>> {
        let row =
            self.reader().await?.query_opt("SELECT body FROM rollouts WHERE name = $1", &[&name]).await.map_err(pg)?;
        row.map(|r| decode("rollouts", r.get(0))).transpose()
    }

    /// A fault, without its events.
    pub async fn fault(&self, id: u64) -> Result<Option<Fault>> {
        let row = self
            .reader()
            .await?
            .query_opt("SELECT body FROM faults WHERE id = $1", &[&(id as i64)])
            .await
            .map_err(pg)?;
        row.map(|r| decode("faults", r.get(0))).transpose()
    }

    /// A durable consumer's acknowledged cursor, if it exists.
    pub async fn consumer_position(&self, name: &str) -> Result<Option<u64>> {
        let row = self
            .reader()
            .await?
            .query_opt("SELECT acked_cursor FROM consumers WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }
}

/// The (clusters, nodes) filter of a read by clusters, or of `one` node only.
fn scope(clusters: Vec<String>, one: Option<NodeKey>) -> (Vec<String>, Vec<String>) {
    match one {
        Some(k) => (vec![k.cluster], vec![k.node]),
        None => (clusters, Vec::new()),
    }
}

//! nodekeeper-storage: a durable subscriber of one cluster's node lifecycle that keeps storage
//! access lists (iSCSI initiator names, NFS client addresses) equal to the cluster's nodes.
//!
//! The center's node list is the truth; its events (a node registered, its inventory or labels
//! changed, it was decommissioned) only say when to look again, so a missed or replayed event
//! costs nothing: every pass compares a target's actual list with what the current nodes want and
//! repairs the difference, whoever made it. Every change is recorded on the center as an event.

pub mod backend;
pub mod config;
pub mod entries;
mod metrics;
pub mod plan;
mod state;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    AckConsumerRequest, EventFilter, GetNodeRequest, ListConsumersRequest, ListNodesRequest, Node, Observation,
    RecordActionsRequest, RecordedAction, Severity, StartPosition, SubscribeRequest,
    event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient,
    report_service_client::ReportServiceClient, subscribe_response,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{Config, Target};
use crate::plan::Memory;

/// The node events after which the lists are looked at again.
pub const NODE_EVENTS: &[&str] =
    &["NodeRegistered", "NodeInventoryChanged", "NodeLabelsChanged", "NodeDecommissioned", "NodeRebooted"];
/// A person's go-ahead for removals a guard holds back (`nodekeeper storage force`).
pub const FORCED: &str = "StorageAclForced";

/// One target and what this syncer knows of it.
struct Kept {
    cfg: Target,
    backend: backend::Backend,
    memory: Memory,
    /// The guard holds this target's removals back: why.
    held: Option<String>,
    /// A person let the guard through: the next pass removes what it must.
    forced: bool,
    /// Dry run: the changes the last pass planned (and recorded), so that a plan repeated by every
    /// pass is recorded once.
    planned: BTreeSet<String>,
}

pub struct Syncer {
    cfg: Config,
    ch: Channel,
    targets: tokio::sync::Mutex<Vec<Kept>>,
    pub metrics: metrics::Metrics,
    http: reqwest::Client,
    cancel: CancellationToken,
}

impl Syncer {
    pub fn new(cfg: Config, ch: Channel, cancel: CancellationToken) -> anyhow::Result<Arc<Syncer>> {
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", cfg.state_dir.display()))?;
        nodekeeper_common::tls::install_default_provider();
        let mut targets = Vec::new();
        for t in &cfg.targets {
            let memory = state::load(&cfg.state_dir, &t.name)?;
            let backend = backend::Backend::new(t).map_err(|e| anyhow::anyhow!("target {}: {e}", t.name))?;
            targets.push(Kept { cfg: t.clone(), backend, memory, held: None, forced: false, planned: BTreeSet::new() });
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(Arc::new(Syncer {
            metrics: metrics::Metrics::default(),
            targets: tokio::sync::Mutex::new(targets),
            cfg,
            ch,
            http,
            cancel,
        }))
    }

    /// Follows the cluster until cancelled; a lost center is tried again with backoff.
    pub async fn run(self: Arc<Self>) {
        let mut backoff =
            nodekeeper_common::backoff::Backoff::new(Duration::from_millis(200), 2.0, Duration::from_secs(10), 0.2);
        loop {
            let started = Instant::now();
            match self.follow().await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "lost the center; following again"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn follow(&self) -> Result<(), String> {
        let mut events = EventServiceClient::new(self.ch.clone());
        let consumer = self.cfg.name.clone();
        let known = events
            .list_consumers(ListConsumersRequest {})
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .consumers
            .iter()
            .any(|c| c.name == consumer);
        // A new consumer starts now: the first pass reads every node anyway.
        let start = if known { StartPosition::Unspecified } else { StartPosition::Now };
        let mut types: Vec<String> = NODE_EVENTS.iter().map(|t| (*t).to_owned()).collect();
        types.push(FORCED.to_owned());
        let mut stream = events
            .subscribe(SubscribeRequest {
                consumer: consumer.clone(),
                start: start as i32,
                filter: Some(EventFilter { clusters: vec![self.cfg.cluster.clone()], types, ..Default::default() }),
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let mut nodes = self.list_nodes().await?;
        self.pass(&nodes).await;
        tracing::info!(consumer = %consumer, cluster = %self.cfg.cluster, "following the cluster's nodes");
        let mut resync = tokio::time::interval(self.cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        loop {
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                _ = resync.tick() => {
                    nodes = self.list_nodes().await?;
                    self.pass(&nodes).await;
                    continue;
                }
                m = stream.message() => m.map_err(|s| s.message().to_owned())?,
            };
            let Some(msg) = msg else { return Err("the center ended the stream".into()) };
            let cursor = match msg.msg {
                Some(subscribe_response::Msg::Event(e)) => {
                    let mut last = e.cursor.clone();
                    self.consider(&e, &mut nodes).await?;
                    // What else is already here goes into the same pass.
                    while let Ok(m) = tokio::time::timeout(Duration::ZERO, stream.message()).await {
                        let Some(m) = m.map_err(|s| s.message().to_owned())? else { break };
                        if let Some(subscribe_response::Msg::Event(e)) = m.msg {
                            last = e.cursor.clone();
                            self.consider(&e, &mut nodes).await?;
                        }
                    }
                    self.pass(&nodes).await;
                    last
                }
                Some(subscribe_response::Msg::Bookmark(b)) => b.cursor,
                None => continue,
            };
            events
                .ack_consumer(AckConsumerRequest { consumer: consumer.clone(), cursor })
                .await
                .map_err(|s| s.message().to_owned())?;
        }
    }

    /// Takes one event in: a node looked up again, or a person's go-ahead noted.
    async fn consider(&self, e: &nodekeeper_proto::v1::Event, nodes: &mut HashMap<String, Node>) -> Result<(), String> {
        if e.r#type == FORCED {
            let target = e.attributes.get("target").map(String::as_str).unwrap_or("");
            let issuer = e.origin.as_ref().map(|o| o.producer.as_str()).unwrap_or("");
            let mut targets = self.targets.lock().await;
            match targets.iter_mut().find(|k| k.cfg.name == target) {
                Some(k) if k.held.is_some() => {
                    tracing::warn!(target_name = target, issuer, "the guard is let through once by a person");
                    k.forced = true;
                }
                Some(_) => tracing::info!(
                    target_name = target,
                    issuer,
                    "a go-ahead for a target the guard does not hold: nothing to do"
                ),
                None => {}
            }
            return Ok(());
        }
        let got = FleetServiceClient::new(self.ch.clone())
            .get_node(GetNodeRequest { cluster: self.cfg.cluster.clone(), node: e.node.clone() })
            .await;
        match got {
            Ok(n) => {
                let n = n.into_inner();
                if n.decommissioned_time.is_some() {
                    nodes.remove(&n.name);
                } else {
                    nodes.insert(n.name.clone(), n);
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                nodes.remove(&e.node);
            }
            Err(s) => return Err(format!("node {}: {}", e.node, s.message())),
        }
        Ok(())
    }

    async fn list_nodes(&self) -> Result<HashMap<String, Node>, String> {
        let nodes = FleetServiceClient::new(self.ch.clone())
            .max_decoding_message_size(256 << 20)
            .list_nodes(ListNodesRequest { clusters: vec![self.cfg.cluster.clone()], ..Default::default() })
            .await
            .map_err(|s| format!("nodes: {}", s.message()))?
            .into_inner()
            .nodes;
        Ok(nodes.into_iter().filter(|n| n.decommissioned_time.is_none()).map(|n| (n.name.clone(), n)).collect())
    }

    /// One pass over every target. A target that cannot be read or changed is tried again at
    /// the next pass; the others go on.
    async fn pass(&self, nodes: &HashMap<String, Node>) {
        let mut targets = self.targets.lock().await;
        for k in targets.iter_mut() {
            if let Err(e) = self.pass_one(k, nodes).await {
                self.metrics.error(&k.cfg.name);
                tracing::error!(target_name = %k.cfg.name, error = %e, "storage list not synced; trying again at the next pass");
            }
        }
    }

    async fn pass_one(&self, k: &mut Kept, nodes: &HashMap<String, Node>) -> Result<(), String> {
        let started = Instant::now();
        let t = &k.cfg;
        let wanted = entries::wanted(t, nodes.values());
        let on_target = k.backend.list().await?;
        let actual: BTreeSet<String> = on_target.into_iter().filter(|e| entries::is_kind(t.clients, e)).collect();
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let before = k.memory.clone();
        let forced = std::mem::take(&mut k.forced);
        let rules = plan::Rules { grace: t.grace, max_remove_share: t.max_remove_share, guard_window: t.guard_window };
        let p = plan::plan(&wanted, &actual, &mut k.memory, rules, now_ms, forced);
        let (add, remove) = if self.cfg.dry_run {
            (vec![Ok(()); p.add.len()], vec![Ok(()); p.remove.len()])
        } else {
            let adds: Vec<String> = p.add.iter().map(|c| c.entry.clone()).collect();
            let removes: Vec<String> = p.remove.iter().map(|c| c.entry.clone()).collect();
            let mut results = k.backend.apply(t.clients, &adds, &removes).await;
            let removed = results.split_off(adds.len());
            (results, removed)
        };
        let mut len = actual.len();
        let mut failed = None;
        let mut records = Vec::new();
        let mut planned = BTreeSet::new();
        for (op, kind, changes, results) in
            [("add", "StorageAclEntryAdded", &p.add, add), ("remove", "StorageAclEntryRemoved", &p.remove, remove)]
        {
            for (c, r) in changes.iter().zip(results) {
                if let Err(e) = r {
                    failed.get_or_insert(format!("{op} {}: {e}", c.entry));
                    continue;
                }
                if !self.cfg.dry_run && op == "add" {
                    len += 1;
                } else if !self.cfg.dry_run {
                    len -= 1;
                    // What a person let through does not count against the next removals.
                    if !forced {
                        k.memory.removed_ms.push(now_ms);
                    }
                }
                self.metrics.changed(&t.name, op);
                tracing::info!(target_name = %t.name, entry = %c.entry, node = %c.node, why = %c.why, dry_run = self.cfg.dry_run, "storage access {}", verb(kind));
                let key = format!("{op} {}", c.entry);
                if !self.cfg.dry_run || !k.planned.contains(&key) {
                    records.push(self.action(t, kind, c, now_ms));
                }
                planned.insert(key);
            }
        }
        if k.memory != before {
            state::save(&self.cfg.state_dir, &t.name, &k.memory)?;
        }
        if p.held.is_some() && p.held != k.held {
            let why = p.held.clone().unwrap_or_default();
            tracing::error!(target_name = %t.name, why = %why, "removals held back by the guard: a person decides (nodekeeper storage force)");
            let c = plan::Change { entry: String::new(), node: String::new(), why };
            records.push(self.action(t, "StorageAclGuardHeld", &c, now_ms));
        } else if p.held.is_none() && k.held.is_some() {
            tracing::info!(target_name = %t.name, "the guard no longer holds removals back");
        }
        let was_held = k.held.is_some();
        k.held = p.held;
        k.planned = planned;
        self.record(t, records).await;
        self.metrics.set(&t.name, len, p.waiting, k.held.is_some(), started.elapsed());
        self.alert(t, k.held.as_deref(), was_held).await;
        failed.map_or(Ok(()), Err)
    }

    /// Records changes (and holds) on the center, a batch at a time; a center that is away loses
    /// the records, not the changes (each is logged, and the next pass sees the list as it is).
    async fn record(&self, t: &Target, actions: Vec<RecordedAction>) {
        for chunk in actions.chunks(500) {
            let request = RecordActionsRequest { producer: self.cfg.name.clone(), actions: chunk.to_vec() };
            if let Err(s) = ReportServiceClient::new(self.ch.clone()).record_actions(request).await {
                tracing::warn!(target_name = %t.name, error = %s.message(), changes = chunk.len(), "changes not recorded on the center");
            }
        }
    }

    /// A change (or a hold) as the center records it.
    fn action(&self, t: &Target, kind: &str, c: &plan::Change, now_ms: u64) -> RecordedAction {
        let mut attributes = HashMap::from([
            ("target".to_owned(), t.name.clone()),
            ("why".to_owned(), c.why.clone()),
            ("dry_run".to_owned(), self.cfg.dry_run.to_string()),
        ]);
        if !c.entry.is_empty() {
            attributes.insert("entry".to_owned(), c.entry.clone());
        }
        let (severity, message) = match kind {
            "StorageAclGuardHeld" => (Severity::Critical, format!("{}: removals held back: {}", t.name, c.why)),
            _ => (Severity::Info, format!("{}: {} {}: {}", t.name, verb(kind), c.entry, c.why)),
        };
        let action_id = format!("{}-{kind}-{}-{now_ms}", t.name, if c.entry.is_empty() { "list" } else { &c.entry });
        RecordedAction {
            action_id,
            cluster: self.cfg.cluster.clone(),
            node: c.node.clone(),
            action: Some(Observation {
                time: Some(nodekeeper_common::time::now_timestamp()),
                r#type: kind.to_owned(),
                message,
                severity: severity as i32,
                attributes,
                source: "storage".into(),
                ..Default::default()
            }),
        }
    }

    /// `NodekeeperStorageAclGuard` to Alertmanager while the guard holds, resolved when it stops.
    /// Sent at every pass while the guard holds (lasting three passes unless sent again), and
    /// once resolved at the pass that finds it no longer holding (`was_held`).
    async fn alert(&self, t: &Target, held: Option<&str>, was_held: bool) {
        let Some(base) = &self.cfg.alertmanager else { return };
        let now = std::time::SystemTime::now();
        let ends = match held {
            Some(_) => now + self.cfg.resync_interval * 3,
            None if was_held => now,
            None => return,
        };
        let alert = serde_json::json!([{
            "labels": {
                "alertname": "NodekeeperStorageAclGuard",
                "cluster": self.cfg.cluster,
                "storage_target": t.name,
                "severity": "critical",
            },
            "annotations": { "summary": format!("storage list {} of cluster {}: {}; `nodekeeper storage force` lets it through", t.name, self.cfg.cluster, held.unwrap_or("resolved")) },
            "endsAt": humantime::format_rfc3339_millis(ends).to_string(),
        }]);
        let url = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
        match self.http.post(&url).json(&alert).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "Alertmanager refused the storage guard alert"),
            Err(e) => tracing::warn!(error = %e, "cannot reach Alertmanager for the storage guard alert"),
        }
    }
}

fn verb(kind: &str) -> &'static str {
    if kind == "StorageAclEntryAdded" { "added" } else { "removed" }
}

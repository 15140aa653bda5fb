//! The event center's `/metrics`. Counters and histograms are updated where things happen (the
//! store writer, the rate-limit center); the rest is read from state at each scrape. No series is
//! per node: nodes are counted per cluster, faults per type, severity and state.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::liveness::Liveness;
use crate::store::Store;

pub type Labels = Vec<(&'static str, String)>;
pub type CounterFamily = Family<Labels, Counter>;
type GaugeFamily = Family<Labels, Gauge>;

pub struct Metrics {
    registry: Registry,
    store: Store,
    liveness: Arc<Liveness>,
    head: Gauge,
    leader: Gauge,
    nodes: GaugeFamily,
    connected: GaugeFamily,
    faults: GaugeFamily,
    consumer_lag: GaugeFamily,
    rollouts: GaugeFamily,
    rollout_nodes: GaugeFamily,
    /// One scrape at a time: a scrape clears the state gauges before it fills them again.
    scrape: tokio::sync::Mutex<()>,
}

impl Metrics {
    pub fn new(store: Store, liveness: Arc<Liveness>, permit_decisions: CounterFamily) -> Self {
        let mut r = Registry::with_prefix("nodekeeper_eventcenter");
        let s = store.metrics();
        r.register(
            "events_stored",
            "Events stored (observations, reports and the center's own; resends excluded)",
            s.events.clone(),
        );
        r.register("duplicates", "Observations and reports received again and not stored twice", s.duplicates.clone());
        r.register_with_unit(
            "store_commit",
            "Duration of each group commit (with its fsync)",
            Unit::Seconds,
            s.commit_seconds.clone(),
        );
        r.register("store_commit_rows", "Rows written per group commit", s.commit_rows.clone());
        r.register(
            "permit_decisions",
            "Permit requests by operation, decision (granted, denied) and reason",
            permit_decisions,
        );
        let mut this = Metrics {
            head: Gauge::default(),
            leader: Gauge::default(),
            nodes: GaugeFamily::default(),
            connected: GaugeFamily::default(),
            faults: GaugeFamily::default(),
            consumer_lag: GaugeFamily::default(),
            rollouts: GaugeFamily::default(),
            rollout_nodes: GaugeFamily::default(),
            scrape: tokio::sync::Mutex::new(()),
            registry: r,
            store,
            liveness,
        };
        let r = &mut this.registry;
        r.register("head_cursor", "Cursor of the newest stored event", this.head.clone());
        r.register(
            "leader",
            "1 while this replica runs the work that runs once (rollout controller, ops alerts, retention); always 1 on SQLite",
            this.leader.clone(),
        );
        r.register("nodes", "Known nodes by cluster and liveness (alive, lost)", this.nodes.clone());
        r.register("connected_agents", "Nodes with an open agent stream, by cluster", this.connected.clone());
        r.register("unresolved_faults", "Faults not resolved, by type, severity and state", this.faults.clone());
        r.register(
            "consumer_lag_events",
            "Events stored after a durable consumer's acknowledged position",
            this.consumer_lag.clone(),
        );
        r.register("rollouts", "Rollouts by cluster and phase", this.rollouts.clone());
        r.register(
            "rollout_nodes",
            "Nodes of each rollout still running (or paused, halted) by phase",
            this.rollout_nodes.clone(),
        );
        this
    }

    /// Reads the scrape-time values, then encodes everything (OpenMetrics).
    pub async fn render(&self) -> String {
        let _one = self.scrape.lock().await;
        self.head.set(self.store.head() as i64);
        self.leader.set(i64::from(self.store.leading().borrow().is_some()));
        self.nodes.clear();
        self.connected.clear();
        for (cluster, c) in self.liveness.census() {
            self.nodes
                .get_or_create(&vec![("cluster", cluster.clone()), ("state", "alive".into())])
                .set((c.nodes - c.lost) as i64);
            self.nodes.get_or_create(&vec![("cluster", cluster.clone()), ("state", "lost".into())]).set(c.lost as i64);
            self.connected.get_or_create(&vec![("cluster", cluster)]).set(c.connected as i64);
        }
        self.faults.clear();
        match self.store.unresolved_fault_counts().await {
            Ok(counts) => {
                for ((kind, severity, state), n) in counts {
                    let severity = nodekeeper_proto::v1::Severity::try_from(severity).unwrap_or_default();
                    let state = nodekeeper_proto::v1::FaultState::try_from(state).unwrap_or_default();
                    let labels = vec![
                        ("type", kind),
                        ("severity", severity.as_str_name().trim_start_matches("SEVERITY_").to_lowercase()),
                        ("state", state.as_str_name().trim_start_matches("FAULT_STATE_").to_lowercase()),
                    ];
                    self.faults.get_or_create(&labels).set(n as i64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot count faults"),
        }
        self.consumer_lag.clear();
        match self.store.list_consumers().await {
            Ok(consumers) => {
                for c in consumers {
                    let (owner, name) = crate::store::consumer_parts(&c.name);
                    let labels = vec![("consumer", name.to_owned()), ("owner", owner.to_owned())];
                    self.consumer_lag.get_or_create(&labels).set(c.lag as i64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read consumers"),
        }
        self.rollouts.clear();
        self.rollout_nodes.clear();
        match self.store.list_rollouts(vec![]).await {
            Ok(rollouts) => {
                use nodekeeper_proto::v1::RolloutPhase;
                for r in rollouts {
                    let spec = r.spec.clone().unwrap_or_default();
                    let phase = crate::rollout::phase_name(r.phase()).replace(' ', "_");
                    self.rollouts.get_or_create(&vec![("cluster", spec.cluster.clone()), ("phase", phase)]).inc();
                    // Finished rollouts keep no per-rollout series.
                    if matches!(r.phase(), RolloutPhase::Completed | RolloutPhase::RolledBack | RolloutPhase::Aborted) {
                        continue;
                    }
                    for n in &r.nodes {
                        let phase = n.phase().as_str_name().trim_start_matches("ROLLOUT_NODE_PHASE_").to_lowercase();
                        let labels =
                            vec![("cluster", spec.cluster.clone()), ("rollout", spec.name.clone()), ("phase", phase)];
                        self.rollout_nodes.get_or_create(&labels).inc();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read rollouts"),
        }
        nodekeeper_common::metrics::encode(&self.registry)
    }
}

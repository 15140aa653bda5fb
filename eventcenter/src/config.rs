//! The event center's configuration: a TOML file (`--config`), with flags overriding the common
//! settings. Unknown keys are rejected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nodekeeper_common::config::duration;
use serde::Deserialize;

/// Where `nodekeeper dev` and a default event center listen; the CLI's default server.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the gRPC listener.
    pub listen: SocketAddr,
    /// Folder of the SQLite store.
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    pub nodes: NodesConfig,
    pub limits: LimitsConfig,
    /// Remote detectors: how many replicas must agree before their verdict opens a fault.
    pub detectors: DetectorsConfig,
    /// Alertmanager: where ops alerts go and what the business-health gates read.
    pub alertmanager: AlertmanagerConfig,
    /// Ops alerts: their thresholds, and generic JSON webhooks besides Alertmanager.
    pub alerts: AlertsConfig,
    /// Prometheus `/metrics` listener (plain HTTP); unset: none.
    pub metrics_listen: Option<SocketAddr>,
    /// The rate-limit center: permits for risky operations, the circuit breaker.
    pub permits: PermitsConfig,
    /// Readiness gates O&M operators add, per cluster and label selector: conditions they report
    /// that must be True before a node takes pods, when it joins and when it is released after a
    /// repair (besides the built-in gates).
    pub readiness_gates: Vec<ReadinessGates>,
    /// Idle time after which a subscription gets a bookmark.
    #[serde(with = "duration")]
    pub bookmark_interval: Duration,
    /// How long shutdown waits for streams to drain before closing them.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// Mutual TLS: the center's certificate and key, and the CA clients must chain to.
    pub tls: Option<nodekeeper_common::tls::TlsFiles>,
    /// Serve plaintext without client identities. Development and tests only; logged at start.
    pub insecure: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// How long events are kept.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// How often the retention task runs.
    #[serde(with = "duration")]
    pub retention_interval: Duration,
    /// A group commit is flushed once it holds this many rows...
    pub commit_max_rows: usize,
    /// ...or this long after its first write arrived.
    #[serde(with = "duration")]
    pub commit_delay: Duration,
    /// Rows waiting for the writer before producers are made to wait (backpressure).
    pub max_pending_rows: usize,
    /// Bytes kept free on the store's disk: below them new events are refused (clients get
    /// RESOURCE_EXHAUSTED and retry; agents keep theirs), health of the writing services says
    /// NOT_SERVING and `NodekeeperStoreDiskLow` fires.
    pub min_free_bytes: u64,
    /// A PostgreSQL database shared by the center's replicas, as a libpq-style URL
    /// (`postgres://user@h1:5432,h2:5432/nodekeeper?target_session_attrs=read-write`); unset: the
    /// embedded SQLite store in `data_dir`. TLS as its `sslmode` says (`require`: never without).
    pub postgres_url: Option<String>,
    /// CA certificates (PEM) the database server's certificate must chain to (its host name is
    /// verified too); unset: the system's trust store.
    pub postgres_ca: Option<PathBuf>,
    /// A client certificate (PEM), with `postgres_key`, for a server that authenticates by
    /// certificate (`cert` in pg_hba.conf).
    pub postgres_cert: Option<PathBuf>,
    pub postgres_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// Heartbeat interval assumed when an agent does not announce one.
    #[serde(with = "duration")]
    pub default_heartbeat_interval: Duration,
    /// A node is lost after this many heartbeat intervals without one.
    pub grace_multiplier: u32,
    /// How often liveness is checked.
    #[serde(with = "duration")]
    pub check_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorsConfig {
    /// Detector replicas that must report the same verdict (AgentDown, KubeletDown,
    /// NodeUnreachable) about a node before it opens a fault; it clears when fewer than `quorum`
    /// still hold it.
    pub quorum: usize,
}

impl Default for DetectorsConfig {
    fn default() -> Self {
        Self { quorum: 1 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PermitsConfig {
    /// Lease of a permit when the request names none.
    #[serde(with = "duration")]
    pub default_lease: Duration,
    /// The longest lease granted.
    #[serde(with = "duration")]
    pub max_lease: Duration,
    /// Per operation (isolate, evict, reboot, restart-component, reinstall-component,
    /// reinstall-os, hardware-repair, release) and cluster ("*": every cluster without its own).
    pub policy: Vec<PermitPolicy>,
    /// The breaker trips when faults open on more than this share of a cluster's nodes within
    /// `breaker_window`; then only releases are granted until a person resets it.
    pub breaker_fault_share: f64,
    #[serde(with = "duration")]
    pub breaker_window: Duration,
    /// Business-health gates: while one is closed for a cluster, only releases are granted there.
    pub gate: Vec<GateConfig>,
}

/// One business-health gate: an Alertmanager query (`alerts`) or a metric reported to the center
/// (`metric` with `min` and/or `max`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// A cluster, or "*" for every cluster.
    #[serde(default = "any_cluster")]
    pub cluster: String,
    /// Alertmanager matchers, e.g. `alertname="PodCreationFailing"`; `{cluster}` is replaced by
    /// the cluster asking. Closed while an active, unsilenced alert matches them all.
    #[serde(default)]
    pub alerts: Vec<String>,
    /// A metric reported with `ReportMetric`, e.g. "pod_creation_success_rate".
    pub metric: Option<String>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// A metric value older than this is unknown.
    #[serde(default = "default_max_age", with = "duration")]
    pub max_age: Duration,
    /// What an unknown state (Alertmanager not answering, no fresh metric) means: "deny" or "allow".
    #[serde(default = "default_when_unknown")]
    pub when_unknown: String,
}

/// Conditions that must be True before the nodes a cluster and selector name take pods.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadinessGates {
    /// A cluster, or "*" for every cluster.
    #[serde(default = "any_cluster")]
    pub cluster: String,
    /// Nodes whose labels match, "k=v,k2=v2"; empty: every node of the cluster.
    #[serde(default)]
    pub selector: String,
    /// Condition types O&M operators report, e.g. "LogCollectorReady": each must be True.
    pub conditions: Vec<String>,
}

fn default_max_age() -> Duration {
    Duration::from_secs(300)
}

fn default_when_unknown() -> String {
    "deny".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertmanagerConfig {
    /// Base URL of Alertmanager (its v2 API), e.g. "http://alertmanager:9093"; unset: no ops
    /// alerts, and no alert gates.
    pub url: Option<String>,
    /// Firing alerts are sent again this often; each says it ends after three of these, so that
    /// Alertmanager resolves what a stopped center no longer sends.
    #[serde(with = "duration")]
    pub resend_interval: Duration,
    /// How long a gate's Alertmanager answer is used before it is asked again.
    #[serde(with = "duration")]
    pub query_interval: Duration,
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for AlertmanagerConfig {
    fn default() -> Self {
        Self {
            url: None,
            resend_interval: Duration::from_secs(60),
            query_interval: Duration::from_secs(15),
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// URLs that receive every alert batch as JSON (Alertmanager's webhook payload), besides
    /// or instead of Alertmanager.
    pub webhooks: Vec<String>,
    /// Webhooks get the firing alerts again this often (Alertmanager's own default).
    #[serde(with = "duration")]
    pub webhook_repeat_interval: Duration,
    /// `NodekeeperHeartbeatLoss` fires for a cluster when more than this share of its nodes...
    pub heartbeat_loss_share: f64,
    /// ...and at least this many have lost their heartbeat.
    pub heartbeat_loss_min_nodes: u64,
    /// `NodekeeperSubscriberLag` fires for a durable consumer this many events behind.
    pub subscriber_lag_events: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            webhook_repeat_interval: Duration::from_secs(4 * 3600),
            heartbeat_loss_share: 0.05,
            heartbeat_loss_min_nodes: 3,
            subscriber_lag_events: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermitPolicy {
    pub operation: String,
    #[serde(default = "any_cluster")]
    pub cluster: String,
    /// Permits held at once.
    pub max_in_flight: Option<u32>,
    /// Permits granted within `window`.
    pub max_per_window: Option<u32>,
    #[serde(default = "default_window", with = "duration")]
    pub window: Duration,
    /// Isolation only: the largest share of the cluster's nodes isolated at once.
    pub max_share: Option<f64>,
}

fn any_cluster() -> String {
    "*".into()
}

fn default_window() -> Duration {
    Duration::from_secs(3600)
}

impl Default for PermitsConfig {
    fn default() -> Self {
        let p = |operation: &str, in_flight: u32, per_hour: u32, share: Option<f64>| PermitPolicy {
            operation: operation.into(),
            cluster: any_cluster(),
            max_in_flight: Some(in_flight),
            max_per_window: Some(per_hour),
            window: default_window(),
            max_share: share,
        };
        Self {
            default_lease: Duration::from_secs(1800),
            max_lease: Duration::from_secs(6 * 3600),
            policy: vec![
                p("isolate", 20, 100, Some(0.1)),
                p("evict", 20, 200, None),
                p("reboot", 5, 30, None),
                p("restart-component", 20, 200, None),
                p("reinstall-component", 10, 50, None),
                p("reinstall-os", 2, 10, None),
                p("hardware-repair", 5, 20, None),
            ],
            breaker_fault_share: 0.3,
            breaker_window: Duration::from_secs(300),
            gate: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most observations in one batch or report request.
    pub max_batch: usize,
    /// Observations (agent batches and reports) one identity may send per second...
    pub observations_per_second: u32,
    /// ...and at once above that rate. At least max_batch.
    pub observations_burst: u32,
    /// Streams (agent sessions, subscriptions) one identity may hold open at once.
    pub max_streams_per_identity: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: PathBuf::from("/var/lib/nodekeeper-eventcenter"),
            store: StoreConfig::default(),
            nodes: NodesConfig::default(),
            limits: LimitsConfig::default(),
            detectors: DetectorsConfig::default(),
            alertmanager: AlertmanagerConfig::default(),
            alerts: AlertsConfig::default(),
            metrics_listen: None,
            permits: PermitsConfig::default(),
            readiness_gates: Vec::new(),
            bookmark_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            tls: None,
            insecure: false,
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), String> {
        match &self.postgres_url {
            Some(url) => {
                url.parse::<tokio_postgres::Config>().map_err(|e| format!("store.postgres_url: {e}"))?;
            }
            None => {
                let tls = [("postgres_ca", &self.postgres_ca), ("postgres_cert", &self.postgres_cert)];
                if let Some((key, _)) = tls.iter().find(|(_, v)| v.is_some()) {
                    return Err(format!("store.{key}: set only with store.postgres_url"));
                }
            }
        }
        if self.postgres_cert.is_some() != self.postgres_key.is_some() {
            return Err("store.postgres_cert and store.postgres_key: expected both or neither".into());
        }
        Ok(())
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 24 * 3600),
            retention_interval: Duration::from_secs(60),
            commit_max_rows: 8192,
            commit_delay: Duration::from_millis(1),
            max_pending_rows: 200_000,
            min_free_bytes: 256 << 20,
            postgres_url: None,
            postgres_ca: None,
            postgres_cert: None,
            postgres_key: None,
        }
    }
}

impl Default for NodesConfig {
    fn default() -> Self {
        Self {
            default_heartbeat_interval: Duration::from_secs(10),
            grace_multiplier: 3,
            check_interval: Duration::from_millis(250),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_batch: 1000,
            observations_per_second: 5000,
            observations_burst: 10_000,
            max_streams_per_identity: 16,
        }
    }
}

impl Config {
    /// Checks what types alone cannot; returns a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        self.store.validate()?;
        for p in &self.permits.policy {
            if crate::permits::operation(&p.operation).is_none() {
                return Err(format!(
                    "permits.policy: unknown operation {:?}: expected isolate, evict, reboot, restart-component, reinstall-component, reinstall-os, hardware-repair or release",
                    p.operation
                ));
            }
        }
        for (i, g) in self.permits.gate.iter().enumerate() {
            let key = format!("permits.gate[{i}]");
            match (g.alerts.is_empty(), &g.metric) {
                (false, None) if self.alertmanager.url.is_none() => {
                    return Err(format!("{key}.alerts: needs alertmanager.url"));
                }
                (false, None) => {}
                (true, Some(_)) if g.min.is_none() && g.max.is_none() => {
                    return Err(format!("{key}.metric: expected min, max or both"));
                }
                (true, Some(_)) => {}
                _ => return Err(format!("{key}: expected either alerts (matchers) or metric, not both")),
            }
            if !matches!(g.when_unknown.as_str(), "deny" | "allow") {
                return Err(format!("{key}.when_unknown: expected \"deny\" or \"allow\", got {:?}", g.when_unknown));
            }
        }
        for (i, o) in self.readiness_gates.iter().enumerate() {
            let key = format!("readiness_gates[{i}]");
            if !o.selector.is_empty() {
                crate::selector::parse(&o.selector).map_err(|e| format!("{key}.selector: {e}"))?;
            }
            if o.conditions.is_empty() {
                return Err(format!("{key}.conditions: expected at least one condition type"));
            }
            for c in &o.conditions {
                nodekeeper_common::names::event_type(c).map_err(|e| format!("{key}.conditions: {e}"))?;
            }
        }
        if let Some(url) = &self.alertmanager.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!("alertmanager.url: expected an http:// or https:// URL, got {url:?}"));
        }
        for (i, url) in self.alerts.webhooks.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("alerts.webhooks[{i}]: expected an http:// or https:// URL, got {url:?}"));
            }
        }
        if !(0.0..=1.0).contains(&self.alerts.heartbeat_loss_share) {
            return Err(format!(
                "alerts.heartbeat_loss_share: expected a share between 0 and 1, got {}",
                self.alerts.heartbeat_loss_share
            ));
        }
        if !(0.0..=1.0).contains(&self.permits.breaker_fault_share) {
            return Err("permits.breaker_fault_share must be between 0 and 1".into());
        }
        if self.detectors.quorum == 0 {
            return Err("detectors.quorum must be at least 1".into());
        }
        if self.store.commit_max_rows == 0 {
            return Err("store.commit_max_rows must be at least 1".into());
        }
        if self.store.max_pending_rows < self.limits.max_batch {
            return Err("store.max_pending_rows must be at least limits.max_batch".into());
        }
        if self.store.retention < Duration::from_secs(1) {
            return Err("store.retention must be at least 1s".into());
        }
        if self.nodes.grace_multiplier == 0 {
            return Err("nodes.grace_multiplier must be at least 1".into());
        }
        if self.tls.is_none() && !self.insecure {
            return Err("tls: mutual TLS is the default; set tls.ca, tls.cert and tls.key, or insecure = true \
                        (--insecure) for development"
                .into());
        }
        if (self.limits.observations_burst as usize) < self.limits.max_batch || self.limits.observations_per_second == 0
        {
            return Err(
                "limits.observations_burst must be at least limits.max_batch, and observations_per_second above 0"
                    .into(),
            );
        }
        if self.limits.max_streams_per_identity == 0 {
            return Err("limits.max_streams_per_identity must be at least 1".into());
        }
        if self.limits.max_batch == 0 {
            return Err("limits.max_batch must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_permit_policies_are_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/eventcenter.toml");
        let cfg: Config = nodekeeper_common::config::load(&path).unwrap();
        let key = |p: &PermitPolicy| {
            (p.operation.clone(), p.cluster.clone(), p.max_in_flight, p.max_per_window, p.window, p.max_share)
        };
        let shipped: Vec<_> = cfg.permits.policy.iter().map(key).collect();
        let defaults: Vec<_> = PermitsConfig::default().policy.iter().map(key).collect();
        assert_eq!(shipped, defaults);
    }

    #[test]
    fn shipped_example_config_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/eventcenter.toml");
        let cfg: Config = nodekeeper_common::config::load(&path).unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn gates_are_checked_and_their_errors_name_the_key() {
        let check = |toml: &str| {
            nodekeeper_common::config::parse::<Config>(
                std::path::Path::new("ec.toml"),
                &format!("insecure = true\n{toml}"),
            )
            .unwrap()
            .validate()
        };
        let e = check("[[permits.gate]]\nalerts = ['alertname=\"X\"']\n").unwrap_err();
        assert_eq!(e, "permits.gate[0].alerts: needs alertmanager.url");
        let e = check("[[permits.gate]]\nmetric = \"m\"\n").unwrap_err();
        assert_eq!(e, "permits.gate[0].metric: expected min, max or both");
        let e = check("[[permits.gate]]\nmetric = \"m\"\nmin = 1.0\nwhen_unknown = \"maybe\"\n").unwrap_err();
        assert!(e.starts_with("permits.gate[0].when_unknown: expected"), "{e}");
        let e = check("[alertmanager]\nurl = \"alertmanager:9093\"\n").unwrap_err();
        assert!(e.starts_with("alertmanager.url: expected an http:// or https:// URL"), "{e}");
        check("[alertmanager]\nurl = \"http://am:9093\"\n[[permits.gate]]\nalerts = ['alertname=\"X\"']\n").unwrap();
        let e = check("[[readiness_gates]]\nselector = \"pool\"\nconditions = [\"LogsReady\"]\n").unwrap_err();
        assert!(e.starts_with("readiness_gates[0].selector: invalid selector"), "{e}");
        let e = check("[[readiness_gates]]\nconditions = []\n").unwrap_err();
        assert_eq!(e, "readiness_gates[0].conditions: expected at least one condition type");
        check("[[readiness_gates]]\nselector = \"pool=gpu\"\nconditions = [\"LogsReady\"]\n").unwrap();
    }

    #[test]
    fn unknown_key_rejected() {
        let e = nodekeeper_common::config::parse::<Config>(
            std::path::Path::new("ec.toml"),
            "[store]\nretension = \"1d\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("store.retension"), "{e}");
    }
}

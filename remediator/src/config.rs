//! The remediator's configuration (TOML). Unknown keys are rejected.

use std::path::PathBuf;
use std::time::Duration;

use nodekeeper_common::config::duration;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This remediator's name: its durable consumer on the center, the producer of its steps
    /// (with mutual TLS, its certificate's name) and the owner written on the nodes it isolates.
    pub name: String,
    /// The cluster it remediates (one remediator per cluster).
    pub cluster: String,
    /// The event center.
    pub center: String,
    pub tls: Option<nodekeeper_common::tls::TlsFiles>,
    /// Allow an http:// center (no TLS): development and tests only.
    pub insecure: bool,
    /// Plans are recorded in the faults' timelines and printed; nothing is done.
    pub dry_run: bool,
    /// Prometheus `/metrics` listener (plain HTTP); unset: none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// A kubeconfig; unset: the in-cluster config, else the default kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// Where a new durable consumer starts: "now", or "oldest" (every retained event; faults
    /// that are no longer open are left alone). A known consumer resumes where it acknowledged.
    pub start_from: String,
    /// Active remediations are looked at again this often.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// At most this many remediations of one node within `budget_window`; beyond, the node stays
    /// isolated and its fault is escalated.
    pub budget_attempts: u32,
    #[serde(with = "duration")]
    pub budget_window: Duration,
    /// How long a step may take (a permit denied and asked again, a node coming back from a
    /// reboot, a repair) before the fault is escalated.
    #[serde(with = "duration")]
    pub step_deadline: Duration,
    /// How long to wait for labelled pods to leave before going on.
    #[serde(with = "duration")]
    pub migration_timeout: Duration,
    /// Evict the labelled pods through the Eviction API (honours PodDisruptionBudgets).
    pub evict: bool,
    /// Webhooks (POST, JSON) for hardware repair and OS reinstall tickets.
    pub hardware_repair_webhook: Option<String>,
    pub reinstall_os_webhook: Option<String>,
    /// Playbooks, by recommended action or fault type; the first that matches applies.
    pub playbook: Vec<Playbook>,
    /// The center's conditions written on the Kubernetes Nodes.
    pub node_conditions: NodeConditionsConfig,
    pub kubernetes_nodes: KubernetesNodesConfig,
    pub leader_election: LeaderElectionConfig,
}

/// Several replicas, one acting: leader election through a coordination.k8s.io Lease.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    /// Off: this process acts alone (one remediator per cluster, as under systemd).
    pub enabled: bool,
    /// The Lease's namespace (in a pod: its own, from the downward API).
    pub namespace: String,
    /// The Lease's name; default "nodekeeper-remediator-<cluster>".
    pub lease_name: String,
    /// A replica's name in the Lease; default: the host (pod) name and a random suffix.
    pub identity: String,
    /// How long a lease not renewed stays its holder's.
    #[serde(with = "duration")]
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops (shorter than lease_duration).
    #[serde(with = "duration")]
    pub renew_deadline: Duration,
    /// How often each replica tries to take or renew the lease.
    #[serde(with = "duration")]
    pub retry_period: Duration,
}

impl Default for LeaderElectionConfig {
    /// client-go's defaults.
    fn default() -> Self {
        Self {
            enabled: false,
            namespace: "nodekeeper".into(),
            lease_name: String::new(),
            identity: String::new(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The cluster's Kubernetes Nodes kept in step with the center: labels synced, new nodes
/// onboarded (startup taint removed when their readiness gates hold), deleted nodes
/// decommissioned.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesNodesConfig {
    /// Off in a dry run, and without Kubernetes access.
    pub enabled: bool,
    /// How often every Node is listed (labels, startup taints, deletions).
    #[serde(with = "duration")]
    pub sync_period: Duration,
    /// How often the gates of the nodes waiting to onboard are checked.
    #[serde(with = "duration")]
    pub onboarding_check: Duration,
    /// The taint a new node registers with (kubelet `--register-with-taints`), removed when its
    /// gates hold.
    pub startup_taint: String,
    /// More nodes than this gone from Kubernetes in one pass are left alone (a wrong kubeconfig
    /// or a broken list must not decommission a cluster); `nodekeeper nodes delete` takes them.
    pub max_decommissions_per_pass: usize,
}

impl Default for KubernetesNodesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sync_period: Duration::from_secs(60),
            onboarding_check: Duration::from_secs(5),
            startup_taint: "nodekeeper.io/not-ready".into(),
            max_decommissions_per_pass: 10,
        }
    }
}

/// The kubelet's and the node controller's condition types: never ours to write.
pub const KUBERNETES_TYPES: [&str; 5] =
    ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable"];

/// The center's conditions on the Nodes' `status.conditions`, as node-problem-detector writes them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConditionsConfig {
    /// Off in a dry run, and without Kubernetes access.
    pub enabled: bool,
    /// Every node's conditions are written at least this often (lastHeartbeatTime), as
    /// node-problem-detector's `--k8s-exporter-heartbeat-period`.
    #[serde(with = "duration")]
    pub heartbeat_period: Duration,
    /// The field manager of the writes.
    pub field_manager: String,
    /// The Node condition type of a center condition type, where they differ (e.g.
    /// `RaidDegraded = "StorageDegraded"`); unlisted types keep their names, node-problem-detector's
    /// (KernelDeadlock, ReadonlyFilesystem, ...), so configs written for it work unchanged.
    pub rename: std::collections::BTreeMap<String, String>,
}

impl Default for NodeConditionsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            heartbeat_period: Duration::from_secs(300),
            field_manager: "nodekeeper".into(),
            rename: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Playbook {
    /// Recommended actions (restart-component, reinstall-component, reboot, reinstall-os,
    /// hardware-repair, manual) this playbook handles...
    #[serde(default)]
    pub actions: Vec<String>,
    /// ...or fault types (e.g. NodeUnreachable).
    #[serde(default)]
    pub types: Vec<String>,
    /// Steps in order: isolate, label-pods, evict, wait-migration, restart-component,
    /// reinstall-component, reboot, hardware-repair, reinstall-os, verify, release, escalate.
    pub steps: Vec<String>,
}

pub const STEPS: [&str; 12] = [
    "isolate",
    "label-pods",
    "evict",
    "wait-migration",
    "restart-component",
    "reinstall-component",
    "reboot",
    "hardware-repair",
    "reinstall-os",
    "verify",
    "release",
    "escalate",
];

fn playbook(actions: &[&str], types: &[&str], steps: &[&str]) -> Playbook {
    Playbook {
        actions: actions.iter().map(|s| (*s).to_owned()).collect(),
        types: types.iter().map(|s| (*s).to_owned()).collect(),
        steps: steps.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// The default playbooks. `verify` ends the remediation when the node healed (then releases it if
/// it was isolated) and otherwise goes on to the next step.
pub fn default_playbooks() -> Vec<Playbook> {
    vec![
        // The node is gone for us: fence it and call a person.
        playbook(&[], &["NodeUnreachable", "AgentDown"], &["isolate", "label-pods", "escalate"]),
        playbook(
            &["restart-component", "reinstall-component"],
            &[],
            &[
                "restart-component",
                "verify",
                "reinstall-component",
                "verify",
                "isolate",
                "label-pods",
                "wait-migration",
                "reboot",
                "verify",
                "release",
                "escalate",
            ],
        ),
        playbook(
            &["reboot"],
            &[],
            &["isolate", "label-pods", "wait-migration", "reboot", "verify", "release", "escalate"],
        ),
        playbook(
            &["hardware-repair"],
            &[],
            &["isolate", "label-pods", "wait-migration", "hardware-repair", "verify", "release", "escalate"],
        ),
        playbook(
            &["reinstall-os"],
            &[],
            &["isolate", "label-pods", "wait-migration", "reinstall-os", "verify", "release", "escalate"],
        ),
        playbook(&["manual"], &[], &["isolate", "label-pods", "escalate"]),
    ]
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "remediator".into(),
            cluster: String::new(),
            center: "https://127.0.0.1:7443".into(),
            tls: None,
            insecure: false,
            dry_run: false,
            metrics_listen: None,
            kubeconfig: None,
            start_from: "now".into(),
            poll_interval: Duration::from_secs(2),
            budget_attempts: 5,
            budget_window: Duration::from_secs(7 * 24 * 3600),
            step_deadline: Duration::from_secs(30 * 60),
            migration_timeout: Duration::from_secs(10 * 60),
            evict: false,
            hardware_repair_webhook: None,
            reinstall_os_webhook: None,
            playbook: default_playbooks(),
            node_conditions: NodeConditionsConfig::default(),
            kubernetes_nodes: KubernetesNodesConfig::default(),
            leader_election: LeaderElectionConfig::default(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        nodekeeper_common::names::cluster(&self.cluster).map_err(|e| format!("cluster: {e}"))?;
        nodekeeper_common::names::producer(&self.name).map_err(|e| format!("name: {e}"))?;
        if self.node_conditions.heartbeat_period < Duration::from_secs(1) {
            return Err("node_conditions.heartbeat_period: expected at least 1s".into());
        }
        if self.node_conditions.field_manager.is_empty() {
            return Err("node_conditions.field_manager: expected a name".into());
        }
        for (from, to) in &self.node_conditions.rename {
            nodekeeper_common::names::event_type(to).map_err(|e| format!("node_conditions.rename.{from}: {e}"))?;
            if KUBERNETES_TYPES.contains(&to.as_str()) {
                return Err(format!("node_conditions.rename.{from}: {to} is Kubernetes' own condition type"));
            }
        }
        let l = &self.leader_election;
        if l.enabled
            && !(l.retry_period < l.renew_deadline
                && l.renew_deadline < l.lease_duration
                && l.lease_duration >= Duration::from_secs(1))
        {
            return Err("leader_election: expected retry_period < renew_deadline < lease_duration (at least 1s)".into());
        }
        if l.enabled && l.namespace.is_empty() {
            return Err("leader_election.namespace: expected the Lease's namespace".into());
        }
        let k = &self.kubernetes_nodes;
        if k.sync_period < Duration::from_secs(1) || k.onboarding_check < Duration::from_millis(100) {
            return Err(
                "kubernetes_nodes: expected sync_period of at least 1s and onboarding_check of at least 100ms".into()
            );
        }
        if k.startup_taint.is_empty() || k.startup_taint.len() > 317 {
            return Err("kubernetes_nodes.startup_taint: expected a taint key of 1 to 317 bytes".into());
        }
        for (i, p) in self.playbook.iter().enumerate() {
            if p.actions.is_empty() && p.types.is_empty() {
                return Err(format!("playbook[{i}]: expected actions or types to match"));
            }
            if let Some(s) = p.steps.iter().find(|s| !STEPS.contains(&s.as_str())) {
                return Err(format!("playbook[{i}].steps: unknown step {s:?}: expected one of {}", STEPS.join(", ")));
            }
        }
        if !matches!(self.start_from.as_str(), "now" | "oldest") {
            return Err(format!("start_from: expected \"now\" or \"oldest\", got {:?}", self.start_from));
        }
        if self.budget_attempts == 0 {
            return Err("budget_attempts must be at least 1".into());
        }
        if self.tls.is_none() && !self.insecure {
            return Err("tls: mutual TLS is the default; set tls.ca, tls.cert and tls.key, or insecure = true".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/remediator.toml");
        nodekeeper_common::config::load(&path).unwrap()
    }

    #[test]
    fn the_shipped_config_parses_and_its_playbooks_are_the_defaults() {
        let cfg = shipped();
        cfg.validate().unwrap();
        assert_eq!(cfg.playbook, default_playbooks());
    }

    #[test]
    fn bad_playbooks_and_keys_are_named() {
        let parse = |toml: &str| {
            nodekeeper_common::config::parse::<Config>(
                std::path::Path::new("r.toml"),
                &format!("cluster = \"c1\"\ninsecure = true\n{toml}"),
            )
        };
        let e = parse("[[playbook]]\nactions = [\"reboot\"]\nsteps = [\"isolate\", \"reboto\"]\n").unwrap().validate();
        assert!(e.unwrap_err().starts_with("playbook[0].steps: unknown step \"reboto\""));
        let e = parse("[[playbook]]\nsteps = [\"isolate\"]\n").unwrap().validate();
        assert_eq!(e.unwrap_err(), "playbook[0]: expected actions or types to match");
        let e = parse("start_from = \"yesterday\"\n").unwrap().validate().unwrap_err();
        assert!(e.starts_with("start_from: expected"), "{e}");
        let e = parse("budget_atempts = 3\n").unwrap_err().to_string();
        assert!(e.contains("budget_atempts"), "{e}");
    }

    #[test]
    fn the_in_cluster_config_parses_and_elects_a_leader() {
        use yaml_rust2::YamlLoader;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/remediator.yaml");
        let docs = YamlLoader::load_from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let map = docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap")).expect("the ConfigMap");
        let text = map["data"]["remediator.toml"].as_str().expect("remediator.toml in the ConfigMap");
        let cfg: Config = nodekeeper_common::config::parse(&path, text).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.leader_election.enabled && cfg.kubeconfig.is_none() && !cfg.dry_run);
        assert_eq!(cfg.leader_election.namespace, "nodekeeper");
        let deployment = docs.iter().find(|d| d["kind"].as_str() == Some("Deployment")).expect("the Deployment");
        assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(2));
    }

    #[test]
    fn leader_election_timings_are_checked() {
        let parse = |toml: &str| {
            nodekeeper_common::config::parse::<Config>(
                std::path::Path::new("r.toml"),
                &format!("cluster = \"c1\"\ninsecure = true\n[leader_election]\nenabled = true\n{toml}"),
            )
            .unwrap()
            .validate()
        };
        parse("").unwrap();
        let e = parse("renew_deadline = \"20s\"\n").unwrap_err();
        assert!(e.starts_with("leader_election: expected retry_period < renew_deadline < lease_duration"), "{e}");
    }
}

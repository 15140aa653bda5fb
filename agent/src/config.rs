//! The agent's configuration: a TOML file (`--config`). Unknown keys are rejected.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use nodekeeper_common::config::duration;
use serde::Deserialize;

/// Port of the agent's status listener (gRPC health, /metrics, local Emit).
pub const DEFAULT_STATUS_PORT: u16 = 7444;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node name; default: the hostname, lowercased.
    pub node_name: Option<String>,
    pub cluster: String,
    /// Where the agent keeps its outbox and state.
    pub state_dir: PathBuf,
    /// The event center's address.
    pub center: String,
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// How often the inventory is collected again (changes are sent to the center).
    #[serde(with = "duration")]
    pub inventory_interval: Duration,
    /// Labels of the node, used to select desired state.
    pub labels: HashMap<String, String>,
    pub outbox: OutboxConfig,
    pub status: StatusConfig,
    pub paths: Paths,
    /// How long shutdown waits for the center to acknowledge what is in flight.
    #[serde(with = "duration")]
    pub flush_timeout: Duration,
    /// Mutual TLS to the center (an https:// center): this node's certificate and key, and the CA.
    pub tls: Option<nodekeeper_common::tls::TlsFiles>,
    /// Allow an http:// center (no TLS): development and tests only.
    pub insecure: bool,
    /// Health monitors.
    pub monitors: MonitorsConfig,
    /// The component manager (desired RPM components).
    pub component_manager: ComponentManagerConfig,
    /// What a permitted reboot command runs (an argument vector, no shell).
    pub reboot_command: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComponentManagerConfig {
    pub enabled: bool,
    /// Follow this local spec file instead of the center's desired state.
    pub spec_file: Option<PathBuf>,
    /// Install into this root instead of / (rpm/dnf --installroot).
    pub installroot: Option<PathBuf>,
    /// `$releasever` for dnf in an installroot (empty: dnf's own detection).
    pub releasever: String,
    /// Config files may only be written below these directories.
    pub config_roots: Vec<PathBuf>,
    #[serde(with = "duration")]
    pub reconcile_interval: Duration,
    /// The longest a package transaction, a hook or a unit restart may take.
    #[serde(with = "duration")]
    pub step_timeout: Duration,
    /// How often a pass also verifies the converged components' files against rpm (`rpm -V`)
    /// and reinstalls what does not verify; "0s": only after an interruption.
    #[serde(with = "duration")]
    pub verify_interval: Duration,
    pub rpm: PathBuf,
    pub dnf: PathBuf,
    pub systemctl: PathBuf,
    /// A command prefix that runs each dnf transaction outside the agent's sandbox, e.g.
    /// `["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--"]` (the packaged
    /// config); empty: dnf runs as the agent's child.
    pub transaction_runner: Vec<String>,
    /// Keep the components' packages out of every other dnf run on the node (dnf's main
    /// `excludepkgs` in /etc/dnf/dnf.conf, the agent's entries only), so that a plain
    /// `dnf upgrade` does not move them.
    pub version_lock: bool,
}

impl Default for ComponentManagerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            spec_file: None,
            installroot: None,
            releasever: String::new(),
            config_roots: vec![PathBuf::from("/etc")],
            reconcile_interval: Duration::from_secs(300),
            step_timeout: Duration::from_secs(600),
            verify_interval: Duration::from_secs(24 * 3600),
            rpm: "rpm".into(),
            dnf: "dnf".into(),
            systemctl: "systemctl".into(),
            transaction_runner: Vec::new(),
            version_lock: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorsConfig {
    pub enabled: bool,
    /// The built-in kernel log rules (packaging/rules/kernel-monitor.toml) on `paths.kmsg`.
    pub kernel_rules: bool,
    /// More monitors: rule files in node-problem-detector's JSON format (unmodified) or
    /// nodekeeper's TOML format; log monitors and custom plugin monitors.
    pub rule_files: Vec<PathBuf>,
    /// Each log monitor's budget: lines matched per second, and the burst above it. Lines beyond
    /// it are counted and dropped (a LogFlood event says so).
    pub lines_per_second: f64,
    pub burst: f64,
    /// Custom plugin commands running at once, for the whole agent.
    pub plugin_concurrency: usize,
    pub hardware: HardwareConfig,
    pub components: ComponentsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardwareConfig {
    pub enabled: bool,
    #[serde(with = "duration")]
    pub interval: Duration,
    pub edac: bool,
    pub thermal: bool,
    pub nic: bool,
    /// Interfaces to watch; empty: every physical one.
    pub interfaces: Vec<String>,
    /// Carrier changes within `flap_window` that make a link flapping.
    pub flap_threshold: u64,
    #[serde(with = "duration")]
    pub flap_window: Duration,
    /// Mount points that must be read-write when they are mounted.
    pub writable_mounts: Vec<String>,
    /// Paths whose file systems' disk and inode usage are watched.
    pub disk_paths: Vec<PathBuf>,
    pub disk_threshold_percent: f64,
    pub inode_threshold_percent: f64,
    pub psi: bool,
    pub psi_cpu_some_percent: f64,
    pub psi_memory_full_percent: f64,
    pub psi_io_full_percent: f64,
    pub clock: bool,
    #[serde(with = "duration")]
    pub clock_max_error: Duration,
    /// smartctl to run for SMART health; empty: off. Skipped when not installed.
    pub smartctl: PathBuf,
    #[serde(with = "duration")]
    pub smart_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComponentsConfig {
    pub enabled: bool,
    #[serde(with = "duration")]
    pub interval: Duration,
    pub systemctl: PathBuf,
    /// Timeout of each probe (systemctl, health endpoint, socket).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Starts within `restart_window` that make a component restart frequently.
    pub restart_count: usize,
    #[serde(with = "duration")]
    pub restart_window: Duration,
    /// The components; default containerd, docker and kubelet.
    pub watch: Vec<crate::monitor::components::ComponentWatch>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Bytes of observations kept while the center does not acknowledge them. When full, the
    /// oldest low-severity observations are dropped first; condition transitions never are.
    pub max_bytes: u64,
    /// Observations per batch sent to the center.
    pub batch_size: usize,
    /// Batches awaiting acknowledgement at once.
    pub window: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    pub port: u16,
    /// Addresses to listen on; default: 127.0.0.1 and the node's address toward the center.
    pub listen: Vec<std::net::IpAddr>,
}

/// Roots of the host's pseudo file systems, so tests can point the agent at fixtures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub etc: PathBuf,
    /// The kernel log the built-in kernel rules read.
    pub kmsg: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: None,
            cluster: "default".into(),
            state_dir: PathBuf::from("/var/lib/nodekeeper"),
            center: "http://127.0.0.1:7443".into(),
            heartbeat_interval: Duration::from_secs(10),
            inventory_interval: Duration::from_secs(300),
            labels: HashMap::new(),
            outbox: OutboxConfig::default(),
            status: StatusConfig::default(),
            paths: Paths::default(),
            flush_timeout: Duration::from_secs(5),
            tls: None,
            insecure: false,
            monitors: MonitorsConfig::default(),
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            component_manager: ComponentManagerConfig::default(),
        }
    }
}

const WATCHED_PATHS: [&str; 5] = ["/", "/var/lib/kubelet", "/var/lib/containerd", "/var/lib/docker", "/var/log"];

impl Default for MonitorsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            kernel_rules: true,
            rule_files: Vec::new(),
            lines_per_second: 1000.0,
            burst: 5000.0,
            plugin_concurrency: 3,
            hardware: HardwareConfig::default(),
            components: ComponentsConfig::default(),
        }
    }
}

impl Default for HardwareConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(60),
            edac: true,
            thermal: true,
            nic: true,
            interfaces: Vec::new(),
            flap_threshold: 6,
            flap_window: Duration::from_secs(600),
            writable_mounts: WATCHED_PATHS.iter().map(|s| s.to_string()).collect(),
            disk_paths: WATCHED_PATHS.iter().map(PathBuf::from).collect(),
            disk_threshold_percent: 90.0,
            inode_threshold_percent: 90.0,
            psi: true,
            psi_cpu_some_percent: 80.0,
            psi_memory_full_percent: 20.0,
            psi_io_full_percent: 30.0,
            clock: true,
            clock_max_error: Duration::from_secs(1),
            smartctl: PathBuf::from("smartctl"),
            smart_interval: Duration::from_secs(3600),
        }
    }
}

impl Default for ComponentsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(30),
            systemctl: PathBuf::from("systemctl"),
            timeout: Duration::from_secs(5),
            restart_count: 5,
            restart_window: Duration::from_secs(1200),
            watch: crate::monitor::components::default_components(),
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { max_bytes: 64 << 20, batch_size: 200, window: 4 }
    }
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self { port: DEFAULT_STATUS_PORT, listen: Vec::new() }
    }
}

impl Default for Paths {
    fn default() -> Self {
        Self { proc: "/proc".into(), sys: "/sys".into(), etc: "/etc".into(), kmsg: "/dev/kmsg".into() }
    }
}

impl Config {
    /// Checks what types alone cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.reboot_command.first().is_none_or(String::is_empty) {
            return Err("reboot_command: expected a program and its arguments, e.g. [\"systemctl\", \"reboot\"]".into());
        }
        nodekeeper_common::names::cluster(&self.cluster).map_err(|e| format!("cluster: {e}"))?;
        if let Some(n) = &self.node_name {
            nodekeeper_common::names::node(n).map_err(|e| format!("node_name: {e}"))?;
        }
        nodekeeper_common::tls::check_center(&self.center, self.tls.is_some(), self.insecure)?;
        if self.heartbeat_interval < Duration::from_millis(100) {
            return Err("heartbeat_interval must be at least 100ms".into());
        }
        if self.outbox.batch_size == 0 || self.outbox.batch_size > 1000 {
            return Err("outbox.batch_size must be between 1 and 1000".into());
        }
        if self.outbox.window == 0 {
            return Err("outbox.window must be at least 1".into());
        }
        if self.outbox.max_bytes < 4096 {
            return Err("outbox.max_bytes must be at least 4096".into());
        }
        let m = &self.monitors;
        if m.lines_per_second.is_nan() || m.lines_per_second <= 0.0 || m.burst.is_nan() || m.burst < 1.0 {
            return Err("monitors.lines_per_second must be above 0 and monitors.burst at least 1".into());
        }
        if m.plugin_concurrency == 0 {
            return Err("monitors.plugin_concurrency must be at least 1".into());
        }
        for (key, d) in [
            ("monitors.hardware.interval", m.hardware.interval),
            ("monitors.hardware.smart_interval", m.hardware.smart_interval),
            ("monitors.components.interval", m.components.interval),
        ] {
            if d < Duration::from_millis(100) {
                return Err(format!("{key} must be at least 100ms"));
            }
        }
        if m.components.restart_count == 0 {
            return Err("monitors.components.restart_count must be at least 1".into());
        }
        for w in &m.components.watch {
            nodekeeper_common::names::component(&w.name).map_err(|e| format!("monitors.components.watch name: {e}"))?;
        }
        let c = &self.component_manager;
        if c.reconcile_interval < Duration::from_millis(100) {
            return Err("component_manager.reconcile_interval must be at least 100ms".into());
        }
        if c.config_roots.iter().any(|r| !r.is_absolute()) {
            return Err("component_manager.config_roots must be absolute paths".into());
        }
        if let Some(f) = &c.spec_file {
            crate::components::spec::load(f).map_err(|e| format!("component_manager.spec_file: {e}"))?;
        }
        for f in &m.rule_files {
            crate::monitor::rules::load(f).map_err(|e| format!("monitors.rule_files: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
        let cfg: Config = nodekeeper_common::config::load(&path).unwrap();
        cfg.validate().unwrap();
        // The packaged config writes component config files exactly where the hardened unit lets it.
        let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/nodekeeper-agent.service");
        let unit = std::fs::read_to_string(unit).unwrap();
        let writable: Vec<PathBuf> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("ReadWritePaths="))
            .flat_map(|l| l.split_whitespace().map(|p| PathBuf::from(p.trim_start_matches('-'))))
            .collect();
        let mut expected = cfg.component_manager.config_roots.clone();
        expected.push("/etc/dnf".into()); // the version lock
        assert_eq!(writable, expected);
        assert!(cfg.component_manager.version_lock);
        assert_eq!(cfg.component_manager.transaction_runner.first().map(String::as_str), Some("systemd-run"));
    }

    #[test]
    fn shipped_component_spec_parses_and_validates() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/components.toml");
        let specs = crate::components::spec::load(&path).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(crate::components::spec::packages(&specs[1]), ["kubelet", "kubeadm", "kubectl", "cri-tools"]);
        crate::components::spec::validate_all(&specs, &[PathBuf::from("/etc")], None).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let cfg: Config =
            nodekeeper_common::config::parse(std::path::Path::new("a.toml"), "cluster = \"Bad_Cluster\"").unwrap();
        assert!(cfg.validate().unwrap_err().starts_with("cluster:"));
        let e =
            nodekeeper_common::config::parse::<Config>(std::path::Path::new("a.toml"), "[outbox]\nmax_bytes = \"big\"")
                .unwrap_err()
                .to_string();
        assert!(e.contains("`outbox.max_bytes`"), "{e}");
    }
}

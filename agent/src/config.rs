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
        Self { proc: "/proc".into(), sys: "/sys".into(), etc: "/etc".into() }
    }
}

impl Config {
    /// Checks what types alone cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        nodekeeper_common::names::cluster(&self.cluster).map_err(|e| format!("cluster: {e}"))?;
        if let Some(n) = &self.node_name {
            nodekeeper_common::names::node(n).map_err(|e| format!("node_name: {e}"))?;
        }
        if self.center.starts_with("https://") {
            if self.tls.is_none() {
                return Err("tls: an https:// center needs tls.ca, tls.cert and tls.key".into());
            }
        } else if self.center.starts_with("http://") {
            if !self.insecure {
                return Err(format!(
                    "center: {:?} is plaintext; use https:// with [tls], or set insecure = true (development only)",
                    self.center
                ));
            }
        } else {
            return Err(format!("center: expected an https:// (or, insecure, http://) address, got {:?}", self.center));
        }
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

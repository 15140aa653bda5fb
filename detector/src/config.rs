//! The detector's configuration: a TOML file (`--config`). Unknown keys are rejected.

use std::time::Duration;

use nodekeeper_common::config::duration;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This replica's name: the producer id of its reports (with TLS: its certificate's name).
    pub name: String,
    /// The event center's address.
    pub center: String,
    /// Clusters to watch (empty: every cluster the center shows this detector).
    pub clusters: Vec<String>,
    /// This replica's place among `replicas`: the background sweep is split among them;
    /// suspected nodes are probed by all.
    pub replica: usize,
    pub replicas: usize,
    /// Every node of this replica's share is probed once per sweep.
    #[serde(with = "duration")]
    pub sweep_interval: Duration,
    /// Suspected nodes (heartbeats late, or a failed probe) are probed this often.
    #[serde(with = "duration")]
    pub suspect_interval: Duration,
    /// How often the node list and heartbeat times are read from the center.
    #[serde(with = "duration")]
    pub refresh_interval: Duration,
    #[serde(with = "duration")]
    pub probe_timeout: Duration,
    /// Consecutive failed probes that confirm a verdict.
    pub confirmations: u32,
    /// Suspicion level (phi) of late heartbeats that makes a node suspected.
    pub phi_threshold: f64,
    /// When more than this share of the probed nodes is unreachable at once, the detector
    /// suspects itself (partitioned) and declares nothing.
    pub partition_share: f64,
    /// The kubelet's port (TCP connect); 0: not probed.
    pub kubelet_port: u16,
    /// The port of the kubelet's plain-HTTP `/healthz` (its `healthzPort`, 10248), GET on every
    /// probe; 0: not probed. The kubelet binds it to 127.0.0.1 unless its `healthzBindAddress`
    /// says otherwise, so it is off by default.
    pub kubelet_healthz_port: u16,
    /// An ICMP echo in the probes of suspects (it tells a node whose ports are filtered from one
    /// that is gone), where this process may open a ping or raw socket (the
    /// `net.ipv4.ping_group_range` sysctl, or CAP_NET_RAW); without, it is skipped with a warning.
    pub icmp: bool,
    /// How often views that a node is down are sent again (so that a restarted center has them).
    #[serde(with = "duration")]
    pub repeat_interval: Duration,
    /// Probes in flight at once.
    pub concurrency: usize,
    /// Prometheus /metrics listener; empty: none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub tls: Option<nodekeeper_common::tls::TlsFiles>,
    pub insecure: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "detector".into(),
            center: "https://127.0.0.1:7443".into(),
            clusters: Vec::new(),
            replica: 0,
            replicas: 1,
            sweep_interval: Duration::from_secs(30),
            suspect_interval: Duration::from_secs(1),
            refresh_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(2),
            confirmations: 3,
            phi_threshold: 8.0,
            partition_share: 0.5,
            kubelet_port: 10250,
            kubelet_healthz_port: 0,
            icmp: true,
            repeat_interval: Duration::from_secs(300),
            concurrency: 256,
            metrics_listen: None,
            tls: None,
            insecure: false,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        nodekeeper_common::names::producer(&self.name).map_err(|e| format!("name: {e}"))?;
        for c in &self.clusters {
            nodekeeper_common::names::cluster(c).map_err(|e| format!("clusters: {e}"))?;
        }
        if self.replicas == 0 || self.replica >= self.replicas {
            return Err(format!("replica must be below replicas ({} of {})", self.replica, self.replicas));
        }
        if self.confirmations == 0 {
            return Err("confirmations must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.partition_share) {
            return Err("partition_share must be between 0 and 1".into());
        }
        for (k, d) in [
            ("sweep_interval", self.sweep_interval),
            ("suspect_interval", self.suspect_interval),
            ("refresh_interval", self.refresh_interval),
            ("probe_timeout", self.probe_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return Err(format!("{k} must be at least 10ms"));
            }
        }
        nodekeeper_common::tls::check_center(&self.center, self.tls.is_some(), self.insecure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/detector.toml");
        let cfg: Config = nodekeeper_common::config::load(&path).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.sweep_interval, Config::default().sweep_interval);
    }
}

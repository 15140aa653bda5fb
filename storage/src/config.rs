//! The storage syncer's configuration (TOML). Unknown keys are rejected.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nodekeeper_common::config::duration;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This syncer's name: its durable consumer on the center and the producer of its events
    /// (with mutual TLS, its certificate's name).
    pub name: String,
    /// The cluster whose nodes the targets' lists follow (one syncer per cluster).
    pub cluster: String,
    /// The event center.
    pub center: String,
    pub tls: Option<nodekeeper_common::tls::TlsFiles>,
    /// Allow an http:// center (no TLS): development and tests only.
    pub insecure: bool,
    /// Plans are recorded as events and logged; no target is changed.
    pub dry_run: bool,
    /// Prometheus `/metrics` listener (plain HTTP); unset: none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the entries each target has been given are remembered (for the grace of those no
    /// longer wanted), one JSON file per target.
    pub state_dir: PathBuf,
    /// Every target's actual list is read and repaired this often (drift), besides the passes
    /// the center's node events start.
    #[serde(with = "duration")]
    pub resync_interval: Duration,
    /// Alertmanager's base URL, for `NodekeeperStorageAclGuard` while a guard holds a target's
    /// removals; unset: the guard is only logged, recorded and counted in `/metrics`.
    pub alertmanager: Option<String>,
    #[serde(rename = "target")]
    pub targets: Vec<Target>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "storage".into(),
            cluster: String::new(),
            center: "http://127.0.0.1:7443".into(),
            tls: None,
            insecure: false,
            dry_run: false,
            metrics_listen: None,
            state_dir: "/var/lib/nodekeeper-storage".into(),
            resync_interval: Duration::from_secs(60),
            alertmanager: None,
            targets: Vec::new(),
        }
    }
}

/// What a target's list holds of each node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clients {
    /// The node's iSCSI initiator name (IQN, EUI or NAA).
    Initiators,
    /// The node's interface addresses (NFS clients), within `networks` when given.
    Addresses,
}

/// One storage access list kept equal to the cluster's nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Unique among the targets; names its state file, events and metrics.
    pub name: String,
    pub clients: Clients,
    /// Only nodes with all these labels (the agent's and Kubernetes'); empty: every node.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Addresses only: the storage networks a client address must be in (CIDR); empty: every
    /// address except loopback and link-local.
    #[serde(default)]
    pub networks: Vec<ipnet::IpNet>,
    /// An entry no node wants any more (its node decommissioned, or given a new address or
    /// initiator name) stays this long before it is removed. Entries no node ever had (edits on
    /// the target) are removed at once.
    #[serde(with = "duration", default = "default_grace")]
    pub grace: Duration,
    /// At most this share of the list (at least one entry) is removed within `guard_window`;
    /// more is refused, alerted and waits for a person (`nodekeeper storage force`): a broken
    /// feed must not lock a cluster out of its volumes, at once or a few entries at a time.
    #[serde(default = "default_share")]
    pub max_remove_share: f64,
    #[serde(with = "duration", default = "default_guard_window")]
    pub guard_window: Duration,
    pub backend: Backend,
}

fn default_grace() -> Duration {
    Duration::from_secs(600)
}

fn default_share() -> f64 {
    0.5
}

fn default_guard_window() -> Duration {
    Duration::from_secs(600)
}

/// Where a list lives and how it is changed. No value ever reaches a shell.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Backend {
    /// A tgt (Linux SCSI target framework) target: its ACL through `tgtadm` bind/unbind, by
    /// initiator name or address.
    Tgt {
        /// The target's id.
        tid: u32,
        /// tgtd's management port (`tgtd -C`); unset: tgtd's default.
        control_port: Option<u16>,
        #[serde(default = "default_tgtadm")]
        tgtadm: PathBuf,
    },
    /// An nfs-ganesha export: its clients between the lines `# BEGIN nodekeeper-storage <target>`
    /// and `# END nodekeeper-storage <target>` inside its EXPORT block of `config`, then ganesha
    /// (the pid in `pid_file`) signalled to reload its exports.
    Ganesha {
        config: PathBuf,
        pid_file: PathBuf,
        #[serde(default = "default_access_type")]
        access_type: String,
    },
    /// NetApp ONTAP (REST API, 9.6 and later): initiator names in `igroup`, or client addresses
    /// as the client matches of rule `rule_index` of `export_policy`, in SVM `svm`.
    Ontap {
        /// The cluster or SVM management address, e.g. "https://ontap-mgmt.example".
        url: String,
        svm: String,
        igroup: Option<String>,
        export_policy: Option<String>,
        #[serde(default = "default_rule_index")]
        rule_index: u32,
        username: String,
        /// A file holding the password (its trailing newline ignored), read at each pass.
        password_file: PathBuf,
        /// The CA bundle (PEM) that signed ONTAP's certificate; unset: the system's roots.
        ca: Option<PathBuf>,
    },
    /// Any other storage, through commands (argv, no shell): `list` prints one entry per line;
    /// `add` and `remove` get the entry as the argument written `{entry}`.
    Command { list: Vec<String>, add: Vec<String>, remove: Vec<String> },
}

fn default_rule_index() -> u32 {
    1
}

fn default_access_type() -> String {
    "RW".into()
}

fn default_tgtadm() -> PathBuf {
    "tgtadm".into()
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        nodekeeper_common::names::cluster(&self.cluster).map_err(|e| format!("cluster: {e}"))?;
        nodekeeper_common::names::producer(&self.name).map_err(|e| format!("name: {e}"))?;
        if self.tls.is_none() && !self.insecure {
            return Err("tls: mutual TLS is the default; set tls.ca, tls.cert and tls.key, or insecure = true".into());
        }
        if self.resync_interval < Duration::from_secs(1) {
            return Err("resync_interval: expected at least 1s".into());
        }
        if self.targets.is_empty() {
            return Err("target: expected at least one [[target]]".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            nodekeeper_common::names::cluster(&t.name).map_err(|e| format!("target[{i}].name: {e}"))?;
            if !names.insert(&t.name) {
                return Err(format!("target[{i}].name: {} is used twice", t.name));
            }
            if !(t.max_remove_share > 0.0 && t.max_remove_share <= 1.0) {
                return Err(format!(
                    "target[{i}].max_remove_share: expected a share in (0, 1], got {}",
                    t.max_remove_share
                ));
            }
            if t.guard_window.is_zero() {
                return Err(format!("target[{i}].guard_window: expected a duration above 0"));
            }
            if !t.networks.is_empty() && t.clients != Clients::Addresses {
                return Err(format!("target[{i}].networks: only for clients = \"addresses\""));
            }
            if let Backend::Tgt { control_port: Some(p), .. } = &t.backend
                && *p > 32_767
            {
                return Err(format!("target[{i}].backend.control_port: tgtd takes 0 to 32767, got {p}"));
            }
            if let Backend::Ganesha { access_type, .. } = &t.backend {
                if t.clients != Clients::Addresses {
                    return Err(format!("target[{i}].clients: a ganesha export's clients are \"addresses\""));
                }
                if !["RW", "RO", "MDONLY", "MDONLY_RO", "None"].contains(&access_type.as_str()) {
                    return Err(format!("target[{i}].backend.access_type: expected RW, RO, MDONLY, MDONLY_RO or None"));
                }
            }
            if let Backend::Ontap { url, igroup, export_policy, .. } = &t.backend {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| format!("target[{i}].backend.url: expected an http(s) URL, got {url:?}: {e}"))?;
                if !["https", "http"].contains(&parsed.scheme()) {
                    return Err(format!("target[{i}].backend.url: expected an http(s) URL, got {url:?}"));
                }
                match (t.clients, igroup, export_policy) {
                    (Clients::Initiators, Some(_), None) | (Clients::Addresses, None, Some(_)) => {}
                    (Clients::Initiators, _, _) => {
                        return Err(format!(
                            "target[{i}].backend: initiators live in an igroup: expected igroup (and no export_policy)"
                        ));
                    }
                    (Clients::Addresses, _, _) => {
                        return Err(format!(
                            "target[{i}].backend: addresses live in an export policy rule: expected export_policy (and no igroup)"
                        ));
                    }
                }
            }
            if let Backend::Command { list, add, remove } = &t.backend {
                for (key, argv) in [("list", list), ("add", add), ("remove", remove)] {
                    if argv.is_empty() {
                        return Err(format!("target[{i}].backend.{key}: expected a command (argv)"));
                    }
                }
                for (key, argv) in [("add", add), ("remove", remove)] {
                    if !argv.iter().any(|a| a == "{entry}") {
                        return Err(format!("target[{i}].backend.{key}: expected an argument \"{{entry}}\""));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config =
            nodekeeper_common::config::parse(std::path::Path::new("storage.toml"), text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn a_tgt_target_and_a_command_target_parse_with_defaults() {
        let c = parse(
            r#"
            cluster = "c1"
            insecure = true
            [[target]]
            name = "vol1"
            clients = "initiators"
            backend = { kind = "tgt", tid = 1, control_port = 7 }
            [[target]]
            name = "nfs"
            clients = "addresses"
            networks = ["10.0.0.0/8"]
            grace = "1m"
            selector = { pool = "db" }
            backend = { kind = "command", list = ["acl", "ls"], add = ["acl", "add", "{entry}"], remove = ["acl", "rm", "{entry}"] }
            "#,
        )
        .unwrap();
        assert_eq!(c.targets[0].grace, Duration::from_secs(600));
        assert_eq!(c.targets[0].max_remove_share, 0.5);
        assert!(matches!(c.targets[0].backend, Backend::Tgt { tid: 1, control_port: Some(7), .. }));
        assert_eq!(c.targets[1].networks[0].to_string(), "10.0.0.0/8");
        assert_eq!(c.targets[1].selector["pool"], "db");
    }

    #[test]
    fn the_packaged_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/storage.toml");
        let c: Config = nodekeeper_common::config::load(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.targets.len(), 2);
        assert!(c.tls.is_some());
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = "cluster = \"c1\"\ninsecure = true\n[[target]]\nname = \"t\"\nclients = \"initiators\"\n";
        let e = parse(&format!("{base}backend = {{ kind = \"tgt\", tid = 1 }}\nmax_remove_share = 2.0\n")).unwrap_err();
        assert!(e.contains("target[0].max_remove_share"), "{e}");
        let e = parse(&format!("{base}backend = {{ kind = \"nas\" }}\n")).unwrap_err();
        assert!(e.contains("storage.toml") && e.contains("backend") && e.contains("unknown variant"), "{e}");
        let e = parse(&format!(
            "{base}backend = {{ kind = \"command\", list = [\"l\"], add = [\"a\"], remove = [\"r\", \"{{entry}}\"] }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("target[0].backend.add"), "{e}");
        let e = parse(&format!("{base}networks = [\"10.0.0.0/33\"]\nbackend = {{ kind = \"tgt\", tid = 1 }}\n"))
            .unwrap_err();
        assert!(e.contains("networks"), "{e}");
        let e = parse(&format!("{base}backend = {{ kind = \"tgt\", tid = 1, control_port = 40000 }}\n")).unwrap_err();
        assert!(e.contains("target[0].backend.control_port: tgtd takes 0 to 32767"), "{e}");
        let e = parse("cluster = \"c1\"\ninsecure = true\n").unwrap_err();
        assert!(e.contains("at least one [[target]]"), "{e}");
        let e = parse(&format!("{base}backend = {{ kind = \"tgt\", tid = 1 }}\n").replace("insecure = true\n", ""))
            .unwrap_err();
        assert!(e.contains("mutual TLS is the default"), "{e}");
    }
}

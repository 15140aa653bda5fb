//! The remediator with real processes: an event center, a real agent reading a fixture kernel
//! log, and the remediator acting on a fake Kubernetes API server (`nodekeeper_tests::kubeapi`:
//! no real API server can run here). The agent's reboot command is a harmless script that gives
//! the fixture a new boot id; the test then restarts the agent as the node's boot would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nodekeeper_tests::kubeapi::{self, cordoned_and_tainted};
use nodekeeper_tests::{Agent, AgentSpec, EventCenter, bin, cli, json_lines, stored_events, wait_for};

const CENTER: &str = r#"
[nodes]
check_interval = "100ms"
[[permits.policy]]
operation = "isolate"
max_in_flight = 10
max_share = 1.0
"#;

/// Only the log monitors (the hardware and component checks would read this machine).
const LOGS_ONLY: &str = "[monitors]\n[monitors.hardware]\nenabled = false\n[monitors.components]\nenabled = false\n";

const DEADLOCK: &str = "INFO: task dockerd:1234 blocked for more than 120 seconds.";
const TAINT: &str = "nodekeeper.io/fault";

/// A fixture host: /proc with a boot id, a kernel log in /dev/kmsg's format, and a reboot script
/// that starts a new boot (a new boot id, an empty kernel log).
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc/sys/kernel/random")).unwrap();
        let h = Host { dir };
        std::fs::write(h.boot_id_path(), "0f2b6a3c-1d4e-4f50-8a9b-000000000001\n").unwrap();
        std::fs::write(h.kmsg(), "").unwrap();
        let script = h.dir.path().join("reboot.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nprintf '0f2b6a3c-1d4e-4f50-8a9b-000000000002\\n' > {}\n: > {}\n",
                h.boot_id_path().display(),
                h.kmsg().display()
            ),
        )
        .unwrap();
        h
    }

    fn boot_id_path(&self) -> PathBuf {
        self.dir.path().join("proc/sys/kernel/random/boot_id")
    }

    fn kmsg(&self) -> PathBuf {
        self.dir.path().join("kmsg")
    }

    fn boot_id(&self) -> String {
        std::fs::read_to_string(self.boot_id_path()).unwrap().trim().to_owned()
    }

    /// The agent config for this host.
    fn agent_config(&self) -> String {
        format!(
            "reboot_command = [\"/bin/sh\", \"{}\"]\n[paths]\nproc = \"{}\"\nkmsg = \"{}\"\n",
            self.dir.path().join("reboot.sh").display(),
            self.dir.path().join("proc").display(),
            self.kmsg().display()
        )
    }

    fn log(&self, line: &str) {
        let mut f = std::fs::OpenOptions::new().append(true).open(self.kmsg()).unwrap();
        writeln!(f, "3,1,1000000,-;{line}").unwrap();
    }
}

struct Remediator {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Remediator {
    fn start(center: &str, kubeconfig: &Path, extra: &str) -> Remediator {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("remediator.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"remediator-c1\"\ncluster = \"c1\"\ncenter = \"{center}\"\ninsecure = true\nkubeconfig = \"{}\"\npoll_interval = \"200ms\"\nstep_deadline = \"60s\"\nmigration_timeout = \"1s\"\n{extra}",
                kubeconfig.display()
            ),
        )
        .unwrap();
        let child = Command::new(bin("nodekeeper-remediator"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nodekeeper-remediator");
        Remediator { child, _dir: dir }
    }
}

impl Drop for Remediator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn fault_ids(center: &EventCenter, kind: &str) -> Vec<u64> {
    let (code, out, err) = cli(&center.url(), &["faults", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    json_lines(&out)
        .into_iter()
        .filter(|f| f["type"] == kind)
        .filter_map(|f| f["id"].as_u64().or_else(|| f["id"].as_str()?.parse().ok()))
        .collect()
}

/// The remediation steps recorded on the fault, in order.
async fn steps(center: &EventCenter, fault: u64) -> Vec<String> {
    let got = nodekeeper_proto::v1::fleet_service_client::FleetServiceClient::new(center.channel().await)
        .get_fault(nodekeeper_proto::v1::GetFaultRequest { id: fault })
        .await
        .unwrap()
        .into_inner();
    got.events.iter().filter(|e| e.r#type == "RemediationStep").map(|e| e.attributes["step"].clone()).collect()
}

/// Runs the kernel-fault loop on node-r up to the release; `cordoned_before`: someone else
/// cordoned the node first.
async fn kernel_fault_loop(cordoned_before: bool) {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    api.kube.add_node("node-r");
    api.kube.add_pod("shop", "web-1", "node-r", Some("ReplicaSet"));
    api.kube.add_pod("kube-system", "log-agent-x", "node-r", Some("DaemonSet"));
    if cordoned_before {
        api.kube.cordon("node-r");
    }
    let host = Host::new();
    let config = host.agent_config();
    let mut agent =
        Agent::start(AgentSpec { extra: &config, monitors: LOGS_ONLY, ..AgentSpec::new("node-r", &center.url()) })
            .await;
    wait_for("the agent to connect", Duration::from_secs(20), || async {
        agent.status().await.connected.then_some(())
    })
    .await;
    let _remediator = Remediator::start(&center.url(), &api.kubeconfig, "");
    // Another controller writes the node between the remediator's read and its write, twice.
    api.kube.interfere(2);

    host.log(DEADLOCK);
    wait_for("node-r isolated", Duration::from_secs(30), || async {
        (cordoned_and_tainted(&api.kube.node("node-r"), TAINT) == (true, true)).then_some(())
    })
    .await;
    let fault = fault_ids(&center, "KernelDeadlock").await[0];
    let node = api.kube.node("node-r");
    assert_eq!(node["metadata"]["annotations"]["nodekeeper.io/isolated-by"], "remediator-c1");
    assert_eq!(node["metadata"]["annotations"]["nodekeeper.io/fault-id"], fault.to_string());
    assert!(api.kube.conflicts() >= 1, "the interfering writer caused a 409 that was retried");
    wait_for("the app pod labelled", Duration::from_secs(30), || async {
        let pod = api.kube.pod("shop", "web-1")?;
        (pod["metadata"]["labels"]["nodekeeper.io/to-be-migrated"] == "true").then_some(())
    })
    .await;
    let ds = api.kube.pod("kube-system", "log-agent-x").unwrap();
    assert!(ds["metadata"]["labels"]["nodekeeper.io/to-be-migrated"].is_null(), "DaemonSet pods stay: {ds}");
    let patches: Vec<String> = api.kube.requests().into_iter().filter(|r| r.starts_with("PATCH")).collect();
    assert!(patches.iter().all(|r| r.ends_with("application/merge-patch+json")), "{patches:?}");

    // The reboot: the agent runs its reboot command (our script: a new boot id), and the node
    // comes back as after a real reboot, its agent started again.
    wait_for("the reboot command", Duration::from_secs(60), || async {
        let results = stored_events(center.channel().await, "node-r", "CommandResult").await;
        results.iter().any(|e| e.attributes.get("success").is_some_and(|s| s == "true")).then_some(())
    })
    .await;
    assert_eq!(host.boot_id(), "0f2b6a3c-1d4e-4f50-8a9b-000000000002");
    // Still isolated while it is down.
    assert_eq!(cordoned_and_tainted(&api.kube.node("node-r"), TAINT), (true, true));
    agent.kill9();
    agent.spawn().await;

    // Back in a new boot, its kernel condition cleared: the gates hold and the node is released.
    wait_for("node-r released", Duration::from_secs(60), || async {
        (!cordoned_and_tainted(&api.kube.node("node-r"), TAINT).1).then_some(())
    })
    .await;
    let node = api.kube.node("node-r");
    assert_eq!(node["spec"]["unschedulable"] == true, cordoned_before, "uncordoned only if we cordoned it: {node}");
    assert!(node["metadata"]["annotations"]["nodekeeper.io/isolated-by"].is_null(), "{node}");
    assert_eq!(
        steps(&center, fault).await,
        ["start", "isolate", "label-pods", "wait-migration", "reboot", "verify", "release"]
    );
    let (code, out, _) = cli(&center.url(), &["faults", "show", &fault.to_string()]).await;
    assert_eq!(code, 0);
    for step in ["isolate:", "label-pods:", "reboot:", "verify:", "release:"] {
        assert!(out.contains(step), "faults show lists {step}\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_fault_is_isolated_migrated_rebooted_verified_and_released() {
    kernel_fault_loop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_someone_else_cordoned_is_never_uncordoned() {
    kernel_fault_loop(true).await;
}

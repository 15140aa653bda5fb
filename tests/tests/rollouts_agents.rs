//! Rollouts driven by the center's controller through 20 real agents, each with its component
//! manager on its own installroot and real RPMs from a local repository (rpmbuild, createrepo_c,
//! dnf): a good version in waves with a bake and a `kill -9` of the center mid-wave, a bad
//! version that halts after the first wave and is rolled back by a person, and one that rolls
//! back by itself; a real Alertmanager receives the ops alerts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekeeper_tests::alertmanager::Alertmanager;
use nodekeeper_tests::rpmnode::{Node, transactions};
use nodekeeper_tests::{Agent, AgentSpec, EventCenter, cli, json_lines, rpm_installed, rpm_repo, wait_for};
use serde_json::Value;

const NODES: usize = 20;

/// The demo component at `version`, its health check reading the node's own file (the agents
/// run in their installroots).
fn component(version: &str) -> String {
    format!(
        r#"[[component]]
name = "demo"
package = "nk-demo"
version = "{version}"
[[component.repositories]]
id = "nk-test"
base_url = "{}"
[component.health_check]
command = ["/bin/sh", "-c", "grep -qx ok usr/lib/nk-demo/HEALTH"]
timeout = "2s"
deadline = "2s"
"#,
        rpm_repo().url()
    )
}

fn rollout_file(dir: &Path, name: &str, version: &str, strategy: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\ncluster = \"c1\"\nselector = \"pool=gpu\"\n[strategy]\n{strategy}\n{}",
        component(version)
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn show(url: &str, name: &str) -> Value {
    let (code, out, err) = cli(url, &["rollouts", "show", name, "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    json_lines(&out).remove(0)
}

/// Waits until the rollout is in `phase` (ROLLOUT_PHASE_...); returns `rollouts show`.
async fn wait_phase(url: &str, name: &str, phase: &str) -> Value {
    wait_for(&format!("rollout {name} {phase}"), Duration::from_secs(240), || async {
        let shown = show(url, name).await;
        (shown["rollout"]["phase"] == phase).then_some(shown)
    })
    .await
}

fn node_phases(shown: &Value) -> HashMap<String, String> {
    shown["rollout"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap().to_owned(), n["phase"].as_str().unwrap().to_owned()))
        .collect()
}

/// The timeline's events of `kind` per node.
fn per_node(shown: &Value, kind: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in shown["events"].as_array().unwrap().iter().filter(|e| e["type"] == kind) {
        *out.entry(e["node"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    out
}

fn kinds(shown: &Value) -> Vec<String> {
    shown["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

fn upgrades(root: &Path) -> usize {
    transactions(root).iter().filter(|(action, _)| action.contains("Upgrade")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_move_real_nodes_in_waves_halt_and_roll_back() {
    let am = Alertmanager::start().await;
    let mut center = EventCenter::start(&format!(
        "[nodes]\ncheck_interval = \"50ms\"\n[alertmanager]\nurl = \"{}\"\nresend_interval = \"200ms\"\n",
        am.url
    ))
    .await;
    let url = center.url();
    let mut fleet = Vec::new();
    for i in 0..NODES {
        let n = Node::new();
        let extra = format!(
            "labels = {{ pool = \"gpu\" }}\n[component_manager]\ninstallroot = \"{}\"\nreleasever = \"1\"\nsystemctl = \"{}\"\nreconcile_interval = \"1h\"\n",
            n.root().display(),
            n.path("systemctl").display()
        );
        let name = format!("gpu-{i:02}");
        let root = n.root();
        let agent = Agent::start(AgentSpec { extra: &extra, cwd: Some(&root), ..AgentSpec::new(&name, &url) }).await;
        fleet.push((name, n, agent));
    }
    for (_, _, a) in &fleet {
        a.wait_connected().await;
    }
    // Every node at 1.0 first.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.toml");
    std::fs::write(&base, component("1.0-1")).unwrap();
    let (code, out, err) =
        cli(&url, &["components", "set", "--cluster", "c1", "--selector", "pool=gpu", base.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let all_at = |version: &'static str| {
        let roots: Vec<PathBuf> = fleet.iter().map(|(_, n, _)| n.root()).collect();
        async move { roots.iter().all(|r| rpm_installed(r, "nk-demo").as_deref() == Some(version)).then_some(()) }
    };
    wait_for("every node at 1.0", Duration::from_secs(240), || all_at("0:1.0-1")).await;
    wait_for("every node converged", Duration::from_secs(60), || async {
        let (_, out, _) = cli(&url, &["components", "list", "-o", "json"]).await;
        let nodes = json_lines(&out);
        (nodes.len() == NODES && nodes.iter().all(|n| n["converged"] == true)).then_some(())
    })
    .await;

    // A good version, waves 1, 25%, 100%, 5 nodes at once, a 2 s bake; the center killed -9 in
    // the middle of the last wave.
    let strategy = "waves = [\"1\", \"25%\", \"100%\"]\nmax_parallel = 5\nbake = \"2s\"";
    let file = rollout_file(dir.path(), "demo-1.1", "1.1-1", strategy);
    let (code, out, err) = cli(&url, &["rollouts", "create", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "rollout demo-1.1 created: 20 node(s) in waves 1: 1, 25%: 4, 100%: 15");
    wait_for("the last wave changing", Duration::from_secs(240), || async {
        let shown = show(&url, "demo-1.1").await;
        let changing = node_phases(&shown).values().any(|p| p == "ROLLOUT_NODE_PHASE_CHANGING");
        (shown["rollout"]["wave"] == 2 && changing).then_some(())
    })
    .await;
    center.kill9();
    center.spawn().await;
    let shown = wait_phase(&url, "demo-1.1", "ROLLOUT_PHASE_COMPLETED").await;
    wait_for("every node at 1.1", Duration::from_secs(60), || all_at("0:1.1-1")).await;
    for (name, n, _) in &fleet {
        assert_eq!(upgrades(&n.root()), 1, "{name} was upgraded once");
    }
    let started = per_node(&shown, "RolloutNodeStarted");
    let changed = per_node(&shown, "RolloutNodeChanged");
    assert_eq!(started.len(), NODES, "{started:?}");
    assert!(started.values().all(|c| *c == 1), "no node commanded twice: {started:?}");
    assert_eq!(changed, started, "every node's change is in the timeline");
    // Waves in order: a wave starts only after the one before changed and baked.
    let events = shown["events"].as_array().unwrap();
    let wave_of = |e: &Value| e["attributes"]["wave"].as_str().map(|w| w.parse::<u32>().unwrap());
    let ms = |e: &Value| humantime::parse_rfc3339(e["time"].as_str().unwrap()).unwrap();
    for wave in 1..3u32 {
        let baked = events
            .iter()
            .position(|e| {
                e["type"] == "RolloutWaveChanged"
                    && e["message"].as_str().unwrap().starts_with(&format!("wave {wave} of 3"))
            })
            .unwrap();
        let next = events
            .iter()
            .position(|e| {
                e["type"] == "RolloutWaveStarted"
                    && e["message"].as_str().unwrap().starts_with(&format!("wave {} of 3", wave + 1))
            })
            .unwrap();
        let last_change =
            events.iter().rposition(|e| e["type"] == "RolloutNodeChanged" && wave_of(e) == Some(wave)).unwrap();
        let first_next =
            events.iter().position(|e| e["type"] == "RolloutNodeStarted" && wave_of(e) == Some(wave + 1)).unwrap();
        assert!(last_change < baked && baked < next && next < first_next, "wave {wave} in order: {:?}", kinds(&shown));
        let bake = ms(&events[next]).duration_since(ms(&events[baked])).unwrap();
        assert!(bake >= Duration::from_millis(1900), "wave {wave} baked {bake:?}");
    }
    let (_, out, _) = cli(&url, &["components", "list", "-o", "json"]).await;
    assert!(
        json_lines(&out).iter().all(|n| n["components"][0]["desiredVersion"] == "1.1-1" && n["converged"] == true),
        "the selector now desires 1.1: {out}"
    );

    // A bad version (its health check fails): halts after the first wave; the rest untouched.
    let strategy = "waves = [\"1\", \"25%\", \"100%\"]\nmax_parallel = 5\nbake = \"2s\"\non_failure = \"halt\"";
    let file = rollout_file(dir.path(), "demo-1.2", "1.2-1", strategy);
    let (code, _, err) = cli(&url, &["rollouts", "create", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let shown = wait_phase(&url, "demo-1.2", "ROLLOUT_PHASE_HALTED").await;
    let phases = node_phases(&shown);
    assert_eq!(phases["gpu-00"], "ROLLOUT_NODE_PHASE_FAILED");
    assert!(
        phases.iter().filter(|(n, _)| *n != "gpu-00").all(|(_, p)| p == "ROLLOUT_NODE_PHASE_WAITING"),
        "{phases:?}"
    );
    assert!(shown["rollout"]["reason"].as_str().unwrap().contains("gpu-00: demo"), "{}", shown["rollout"]["reason"]);
    wait_for("the halted alert", Duration::from_secs(20), || async {
        (!am.active(&["alertname=\"NodekeeperRolloutHalted\"", "rollout=\"demo-1.2\""]).await.is_empty()).then_some(())
    })
    .await;
    // A person rolls it back: the failed node returns to 1.1 at the center's word.
    let (code, _, err) = cli(&url, &["rollouts", "rollback", "demo-1.2", "--reason", "bad build"]).await;
    assert_eq!(code, 0, "{err}");
    let shown = wait_phase(&url, "demo-1.2", "ROLLOUT_PHASE_ROLLED_BACK").await;
    assert_eq!(node_phases(&shown)["gpu-00"], "ROLLOUT_NODE_PHASE_ROLLED_BACK");
    let touched = per_node(&shown, "RolloutNodeStarted");
    assert_eq!(touched.keys().collect::<Vec<_>>(), ["gpu-00"], "later waves never touched");
    for (name, n, _) in &fleet {
        assert_eq!(rpm_installed(&n.root(), "nk-demo").as_deref(), Some("0:1.1-1"), "{name}");
        if name != "gpu-00" {
            assert_eq!(upgrades(&n.root()), 1, "{name} untouched by the bad rollout");
        }
    }
    wait_for("the rolled-back alert", Duration::from_secs(20), || async {
        (!am.active(&["alertname=\"NodekeeperRolloutRolledBack\"", "rollout=\"demo-1.2\""]).await.is_empty())
            .then_some(())
    })
    .await;

    // The failed node's DemoUpgradeFailed fault ended when it was back at its desired version.
    wait_for("gpu-00's fault resolved", Duration::from_secs(30), || async {
        let (_, out, _) = cli(&url, &["faults", "list", "-o", "json"]).await;
        let faults = json_lines(&out);
        let ended = faults.iter().all(|f| f["state"] == "FAULT_STATE_RESOLVED");
        (faults.len() == 1 && faults[0]["type"] == "DemoUpgradeFailed" && ended).then_some(())
    })
    .await;

    // With `rollback`: two nodes fail in the first wave, over a budget of one, and both are
    // brought back by the controller itself.
    let strategy =
        "waves = [\"2\", \"100%\"]\nmax_parallel = 2\nbake = \"2s\"\nfailure_budget = \"1\"\non_failure = \"rollback\"";
    let file = rollout_file(dir.path(), "demo-1.2-again", "1.2-1", strategy);
    let (code, _, err) = cli(&url, &["rollouts", "create", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let shown = wait_phase(&url, "demo-1.2-again", "ROLLOUT_PHASE_ROLLED_BACK").await;
    let phases = node_phases(&shown);
    let back: Vec<&String> =
        phases.iter().filter(|(_, p)| *p == "ROLLOUT_NODE_PHASE_ROLLED_BACK").map(|(n, _)| n).collect();
    assert_eq!(back.len(), 2, "{phases:?}");
    assert_eq!(per_node(&shown, "RolloutNodeStarted").len(), 2, "later waves never touched");
    let k = kinds(&shown);
    assert!(k.contains(&"RolloutRollbackStarted".to_owned()) && k.last().unwrap() == "RolloutRolledBack", "{k:?}");
    for (name, n, _) in &fleet {
        assert_eq!(rpm_installed(&n.root(), "nk-demo").as_deref(), Some("0:1.1-1"), "{name}");
    }
}

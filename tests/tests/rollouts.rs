//! Fleet rollouts as the center takes them: a rollout file checked whole (nothing stored when
//! anything is wrong), planned in waves, listed, shown with its timeline, and controlled by people.
//! Real event center and CLI processes; hand-driven agent streams register the nodes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nodekeeper_tests::alertmanager::Alertmanager;
use nodekeeper_tests::simnode::Sim;
use nodekeeper_tests::{
    AgentConn, EventCenter, Remediator, cli, free_port, hello, http_get, json_lines, kubeapi, metric_where, wait_for,
};

/// Nodes n00.. of cluster c1 in pool `pool`, registered (their streams kept open).
async fn nodes(center: &EventCenter, n: usize, pool: &str) -> Vec<AgentConn> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut h = hello("c1", &format!("{pool}-{i:02}"), "b1");
        h.labels.insert("pool".into(), pool.into());
        out.push(AgentConn::connect(&center.url(), h).await.unwrap());
    }
    out
}

/// A rollout file of kubelet 1.31.2 to pool `gpu` in waves `waves`, with `extra` TOML lines in
/// [strategy] (a 1 m bake unless they set one) and `version` for the component.
fn rollout_file(dir: &Path, name: &str, waves: &str, extra: &str, version: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let bake = if extra.contains("bake") { "" } else { "bake = \"1m\"\n" };
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ncluster = \"c1\"\nselector = \"pool=gpu\"\n[strategy]\nwaves = [{waves}]\n{bake}{extra}\n\
             [[component]]\nname = \"kubelet\"\npackage = \"kubelet\"\nversion = \"{version}\"\n"
        ),
    )
    .unwrap();
    path
}

async fn stored(center: &EventCenter) -> Vec<serde_json::Value> {
    let (code, out, err) = cli(&center.url(), &["rollouts", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    json_lines(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_checked_whole_and_nothing_is_stored_when_anything_is_wrong() {
    let center = EventCenter::start("").await;
    let _nodes = nodes(&center, 4, "gpu").await;
    let dir = tempfile::tempdir().unwrap();
    let create = |file: PathBuf| {
        let url = center.url();
        async move { cli(&url, &["rollouts", "create", "-f", file.to_str().unwrap()]).await }
    };
    let good = r#""1", "100%""#;

    let cases = [
        (rollout_file(dir.path(), "typo", good, "wavez = 3", "1.31.2-1"), "unknown field `wavez`"),
        (
            rollout_file(dir.path(), "partial", r#""1", "50%""#, "", "1.31.2-1"),
            "strategy.waves: the last wave must be \"100%\", got \"50%\"",
        ),
        (rollout_file(dir.path(), "unordered", good, "", "1.31.2"), "invalid version \"1.31.2\""),
        (
            rollout_file(dir.path(), "budget", good, "on_failure = \"retry\"", "1.31.2-1"),
            "strategy.on_failure \"retry\"",
        ),
    ];
    for (file, expected) in cases {
        let (code, _, err) = create(file.clone()).await;
        assert_eq!(code, 6, "{}: {err}", file.display());
        assert!(err.contains(expected), "{}: {err}", file.display());
    }
    // The file's name and the line are in a file error.
    let (_, _, err) = create(dir.path().join("typo.toml")).await;
    assert!(err.contains("typo.toml") && err.contains("strategy.wavez"), "{err}");
    // A selector matching nothing.
    let nothing = dir.path().join("nothing.toml");
    std::fs::write(
        &nothing,
        std::fs::read_to_string(rollout_file(dir.path(), "nothing", good, "", "1.31.2-1"))
            .unwrap()
            .replace("pool=gpu", "pool=tpu"),
    )
    .unwrap();
    let (code, _, err) = create(nothing).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("selector \"pool=tpu\" matches no node of cluster c1"), "{err}");
    assert_eq!(stored(&center).await, Vec::<serde_json::Value>::new());

    // A good one is stored; the same name again is refused.
    let (code, out, err) = create(rollout_file(dir.path(), "kubelet-1.31.2", good, "", "1.31.2-1")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "rollout kubelet-1.31.2 created: 4 node(s) in waves 1: 1, 100%: 3");
    let (code, _, err) = create(rollout_file(dir.path(), "kubelet-1.31.2", good, "", "1.31.2-1")).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("a rollout named kubelet-1.31.2 exists"), "{err}");
    assert_eq!(stored(&center).await.len(), 1);
}

/// A maintenance window that is not open now nor in the next days' hours the test runs in: the
/// weekday four days from now, one minute.
fn closed_window() -> String {
    let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let days_since_epoch =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    // 1970-01-01 was a Thursday.
    let today = ((days_since_epoch + 3) % 7) as usize;
    format!("[[strategy.window]]\ndays = [\"{}\"]\nstart = \"00:00\"\nend = \"00:01\"\n", days[(today + 4) % 7])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_planned_in_waves_shown_and_controlled_by_people() {
    let center = EventCenter::start("").await;
    let _gpu = nodes(&center, 20, "gpu").await;
    let _cpu = nodes(&center, 3, "cpu").await;
    let dir = tempfile::tempdir().unwrap();
    // Outside its only maintenance window: planned and started, but no node changes.
    let strategy = format!("max_parallel = 4\n{}", closed_window());
    let file = rollout_file(dir.path(), "kubelet-1.31.2", r#""1", "25%", "100%""#, &strategy, "1.31.2-1");
    let (code, out, err) = cli(&center.url(), &["rollouts", "create", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "rollout kubelet-1.31.2 created: 20 node(s) in waves 1: 1, 25%: 4, 100%: 15");

    let shown = wait_for("the rollout waiting for its window", Duration::from_secs(20), || async {
        let (_, out, _) = cli(&center.url(), &["rollouts", "show", "kubelet-1.31.2", "-o", "json"]).await;
        let shown = json_lines(&out).remove(0);
        (shown["rollout"]["phase"] == "ROLLOUT_PHASE_WAITING").then_some(shown)
    })
    .await;
    assert_eq!(shown["rollout"]["reason"], "outside its maintenance windows");
    let nodes = shown["rollout"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 20, "only the gpu pool");
    assert!(
        nodes
            .iter()
            .all(|n| n["node"].as_str().unwrap().starts_with("gpu-") && n["phase"] == "ROLLOUT_NODE_PHASE_WAITING")
    );
    assert_eq!(nodes[0]["node"], "gpu-00");
    assert_eq!(shown["rollout"]["spec"]["strategy"]["maxParallel"], 4);
    assert_eq!(shown["rollout"]["spec"]["strategy"]["onFailure"], "ROLLOUT_FAILURE_ACTION_HALT");

    // A person pauses, resumes and aborts; what cannot be done is refused and changes nothing.
    let control = |args: &'static [&'static str]| {
        let url = center.url();
        async move { cli(&url, args).await }
    };
    let (code, out, err) = control(&["rollouts", "pause", "kubelet-1.31.2", "--reason", "change freeze"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paused (pause by insecure: change freeze)"), "{out}");
    let (code, _, err) = control(&["rollouts", "pause", "kubelet-1.31.2"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the rollout is paused: it cannot pause"), "{err}");
    let (code, out, _) = control(&["rollouts", "resume", "kubelet-1.31.2"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("progressing"), "{out}");
    let (code, out, _) = control(&["rollouts", "abort", "kubelet-1.31.2", "--reason", "wrong build"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("aborted"), "{out}");
    let (code, _, err) = control(&["rollouts", "rollback", "kubelet-1.31.2"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("the rollout is aborted: it cannot rollback"), "{err}");
    let (code, _, err) = control(&["rollouts", "resume", "no-such-rollout"]).await;
    assert_eq!(code, 4, "{err}");

    // The timeline has every decision with who made it: people's and the controller's.
    let (_, out, _) = cli(&center.url(), &["rollouts", "show", "kubelet-1.31.2", "-o", "json"]).await;
    let events = json_lines(&out)[0]["events"].as_array().unwrap().clone();
    let by_people: Vec<&str> = events
        .iter()
        .filter(|e| e["attributes"]["issuer"] == "insecure")
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(by_people, ["RolloutCreated", "RolloutPaused", "RolloutResumed", "RolloutAborted"]);
    assert!(events.iter().all(|e| e["attributes"]["rollout"] == "kubelet-1.31.2"));
    assert!(
        events.iter().any(|e| e["type"] == "RolloutWaiting"
            && e["attributes"]["issuer"] == "center rollout controller"
            && e["message"] == "waiting: outside its maintenance windows"),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e["type"] == "RolloutNodeStarted"), "no node changed outside the window");
    let (_, table, _) = cli(&center.url(), &["rollouts", "list"]).await;
    assert!(table.lines().nth(1).unwrap().contains("aborted"), "{table}");
}

async fn show(url: &str, name: &str) -> serde_json::Value {
    let (code, out, err) = cli(url, &["rollouts", "show", name, "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    json_lines(&out).remove(0)
}

/// Waits until `check` holds of `rollouts show NAME`; returns it.
async fn wait_rollout(
    url: &str,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(what, Duration::from_secs(60), || async {
        let shown = show(url, name).await;
        check(&shown).then_some(shown)
    })
    .await
}

fn count(shown: &serde_json::Value, kind: &str) -> usize {
    shown["events"].as_array().unwrap().iter().filter(|e| e["type"] == kind).count()
}

fn phase_is(shown: &serde_json::Value, phase: &str) -> bool {
    shown["rollout"]["phase"] == phase
}

fn event_time(e: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(e["time"].as_str().unwrap()).unwrap()
}

/// Simulated nodes gpu-NN of pool gpu (heartbeats, component status as the desired state says).
fn sim_nodes(sim: &Sim, range: std::ops::Range<usize>) {
    for i in range {
        let mut h = hello("c1", &format!("gpu-{i:02}"), "b1");
        h.labels.insert("pool".into(), "gpu".into());
        tokio::spawn(sim.clone().run(h));
    }
}

const GATED: &str = r#"
[nodes]
check_interval = "50ms"
[[permits.gate]]
alerts = ['alertname="PodCreationFailing"', 'cluster="{cluster}"']
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_waits_on_alerts_and_freezes_takes_newcomers_and_leaves_its_versions_to_the_selector() {
    let am = Alertmanager::start().await;
    let metrics = free_port();
    let config = format!(
        "metrics_listen = \"127.0.0.1:{metrics}\"\n{GATED}\n[alertmanager]\nurl = \"{}\"\nquery_interval = \"200ms\"\n",
        am.url
    );
    let center = EventCenter::start(&config).await;
    let url = center.url();
    let sim = Sim::new(url.clone(), Duration::from_millis(500));
    sim_nodes(&sim, 0..12);
    wait_for("12 nodes", Duration::from_secs(20), || async {
        let (_, out, _) = cli(&url, &["nodes", "list", "-o", "json"]).await;
        (json_lines(&out).len() == 12).then_some(())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let strategy = "max_parallel = 2\nbake = \"1s\"";
    // 5% of 12 nodes is no more than the first wave's one: that wave takes none, and is passed
    // over without a bake.
    let file = rollout_file(dir.path(), "kubelet-1.31.2", r#""1", "5%", "50%", "100%""#, strategy, "1.31.2-1");
    let (code, out, err) = cli(&url, &["rollouts", "create", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1: 1, 5%: 0, 50%: 5, 100%: 6"), "{out}");
    let name = "kubelet-1.31.2";
    wait_rollout(&url, name, "the first wave done", |s| count(s, "RolloutWaveChanged") >= 1).await;

    // An alert in Alertmanager holds it within one evaluation (the gate's query interval and a
    // pass of the controller); resolved, it goes on by itself.
    let posted = SystemTime::now();
    am.post(&[("alertname", "PodCreationFailing"), ("cluster", "c1")], false).await;
    let shown =
        wait_rollout(&url, name, "the alert to hold the rollout", |s| phase_is(s, "ROLLOUT_PHASE_WAITING")).await;
    let reason = shown["rollout"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("business health: 1 alert(s) firing") && reason.contains("PodCreationFailing"),
        "{reason}"
    );
    let held = shown["events"].as_array().unwrap().iter().rfind(|e| e["type"] == "RolloutWaiting").unwrap().clone();
    let within = event_time(&held).duration_since(posted).unwrap();
    assert!(within < Duration::from_millis(1500), "held {within:?} after the alert");
    let started = count(&shown, "RolloutNodeStarted");
    // A node that joins the selector now goes into the last wave.
    sim_nodes(&sim, 12..13);
    let shown = wait_rollout(&url, name, "the newcomer planned", |s| count(s, "RolloutNodeAdded") == 1).await;
    let newcomer =
        shown["rollout"]["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "gpu-12").unwrap().clone();
    assert_eq!(newcomer["wave"], 3, "{newcomer}");
    assert_eq!(count(&shown, "RolloutNodeStarted"), started, "no node started while the alert fires");
    am.post(&[("alertname", "PodCreationFailing"), ("cluster", "c1")], true).await;
    wait_rollout(&url, name, "the rollout to go on", |s| count(s, "RolloutContinued") >= 1).await;

    // A freeze holds it too.
    let (code, _, err) = cli(&url, &["freeze", "--cluster", "c1", "--reason", "black friday"]).await;
    assert_eq!(code, 0, "{err}");
    let shown =
        wait_rollout(&url, name, "the freeze to hold the rollout", |s| phase_is(s, "ROLLOUT_PHASE_WAITING")).await;
    assert_eq!(shown["rollout"]["reason"], "frozen: black friday");
    let text = http_get(&format!("http://127.0.0.1:{metrics}/metrics")).await;
    let waiting = metric_where(&text, "nodekeeper_eventcenter_rollout_nodes", "phase=\"waiting\"").unwrap_or(0.0);
    let changed = metric_where(&text, "nodekeeper_eventcenter_rollout_nodes", "phase=\"changed\"").unwrap_or(0.0);
    assert!(waiting > 0.0 && changed > 0.0 && waiting + changed <= 13.0, "{text}");
    let (code, _, err) = cli(&url, &["unfreeze", "--cluster", "c1"]).await;
    assert_eq!(code, 0, "{err}");

    // Completed: every node changed once, and the selector now desires the version, so a node
    // that joins after gets it.
    let shown = wait_rollout(&url, name, "the rollout completed", |s| phase_is(s, "ROLLOUT_PHASE_COMPLETED")).await;
    assert_eq!(count(&shown, "RolloutNodeStarted"), 13);
    assert_eq!(count(&shown, "RolloutNodeChanged"), 13);
    let waves: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "RolloutWaveChanged" || e["type"] == "RolloutWaveStarted")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(waves.len(), 5, "three waves baked, two started, the empty one passed over: {waves:?}");
    assert!(waves.iter().all(|m| !m.starts_with("wave 2 of 4")), "{waves:?}");
    sim_nodes(&sim, 13..14);
    wait_for("the late node given the rollout's version", Duration::from_secs(20), || async {
        let seen = sim.seen.lock().unwrap();
        seen.iter()
            .any(|(n, _, d)| {
                n == "gpu-13" && d.components.iter().any(|c| c.name == "kubelet" && c.version == "1.31.2-1")
            })
            .then_some(())
    })
    .await;
    let text = http_get(&format!("http://127.0.0.1:{metrics}/metrics")).await;
    assert_eq!(metric_where(&text, "nodekeeper_eventcenter_rollouts", "phase=\"completed\""), Some(1.0), "{text}");
}

/// The types of a node's events in the timeline, in order.
fn node_steps(shown: &serde_json::Value, node: &str) -> Vec<String> {
    shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["node"] == node)
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_rollout_cordons_and_drains_each_node_before_its_change_and_uncordons_only_its_own() {
    let center = EventCenter::start("[nodes]\ncheck_interval = \"50ms\"\n").await;
    let url = center.url();
    let api = kubeapi::Server::start().await;
    for i in 0..4 {
        let node = format!("gpu-{i:02}");
        api.kube.add_node(&node);
        api.kube.add_pod("apps", &format!("web-{i}"), &node, Some("ReplicaSet"));
    }
    // Someone else cordoned gpu-02; a PodDisruptionBudget holds gpu-01's pod for now.
    api.kube.cordon("gpu-02");
    api.kube.block_eviction("apps", "web-1", true);
    let sim = Sim::new(url.clone(), Duration::from_millis(500));
    sim_nodes(&sim, 0..4);
    let _remediator =
        Remediator::start(&url, &api.kubeconfig, "[[playbook]]\ntypes = [\"NoSuchFault\"]\nsteps = [\"escalate\"]\n");
    wait_for("4 nodes", Duration::from_secs(20), || async {
        let (_, out, _) = cli(&url, &["nodes", "list", "-o", "json"]).await;
        (json_lines(&out).len() == 4).then_some(())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let strategy = "max_parallel = 2\nbake = \"1s\"\ndrain = true";
    let file = rollout_file(dir.path(), "kubelet-1.31.2", r#""1", "100%""#, strategy, "1.31.2-1");
    let (code, _, err) = cli(&url, &["rollouts", "create", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let name = "kubelet-1.31.2";

    // gpu-01 stays cordoned, draining, unchanged while its pod cannot be evicted.
    let shown = wait_rollout(&url, name, "gpu-01 draining", |s| {
        s["rollout"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "gpu-01" && n["phase"] == "ROLLOUT_NODE_PHASE_DRAINING")
    })
    .await;
    assert!(!node_steps(&shown, "gpu-01").contains(&"RolloutNodeStarted".to_owned()));
    wait_for("gpu-01 cordoned", Duration::from_secs(20), || async {
        (api.kube.node("gpu-01")["spec"]["unschedulable"] == true).then_some(())
    })
    .await;
    assert!(api.kube.pod("apps", "web-1").is_some(), "the budget holds the pod");
    api.kube.block_eviction("apps", "web-1", false);

    let shown = wait_rollout(&url, name, "the rollout completed", |s| phase_is(s, "ROLLOUT_PHASE_COMPLETED")).await;
    for i in 0..4 {
        let node = format!("gpu-{i:02}");
        assert_eq!(
            node_steps(&shown, &node),
            [
                "RolloutNodeDraining",
                "RolloutNodeDrained",
                "RolloutNodeStarted",
                "RolloutNodeChanged",
                "RolloutNodeUncordoning",
                "RolloutNodeUncordoned"
            ],
            "{node}: cordoned and drained before its change, uncordoned after"
        );
        assert!(api.kube.pod("apps", &format!("web-{i}")).is_none(), "{node}'s pod evicted");
        let cordoned = api.kube.node(&node)["spec"]["unschedulable"] == true;
        assert_eq!(cordoned, node == "gpu-02", "{node}: only the node someone else cordoned stays cordoned");
        let annotations = &api.kube.node(&node)["metadata"]["annotations"];
        assert!(annotations.get("nodekeeper.io/cordoned-for-rollout").is_none_or(|v| v.is_null()), "{annotations}");
    }
    let drained = shown["events"].as_array().unwrap().iter().find(|e| e["type"] == "RolloutNodeDrained").unwrap();
    assert_eq!(drained["attributes"]["issuer"], "insecure", "recorded by the remediator");
}

//! Fleet rollouts as the center takes them: a rollout file checked whole (nothing stored when
//! anything is wrong), planned in waves, listed, shown with its timeline, and controlled by people.
//! Real event center and CLI processes; hand-driven agent streams register the nodes.

use std::path::{Path, PathBuf};

use nodekeeper_tests::{AgentConn, EventCenter, cli, hello, json_lines};

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
/// [strategy] and `version` for the component.
fn rollout_file(dir: &Path, name: &str, waves: &str, extra: &str, version: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ncluster = \"c1\"\nselector = \"pool=gpu\"\n[strategy]\nwaves = [{waves}]\nbake = \"1m\"\n{extra}\n\
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_planned_in_waves_shown_and_controlled_by_people() {
    let center = EventCenter::start("").await;
    let _gpu = nodes(&center, 20, "gpu").await;
    let _cpu = nodes(&center, 3, "cpu").await;
    let dir = tempfile::tempdir().unwrap();
    let file = rollout_file(dir.path(), "kubelet-1.31.2", r#""1", "25%", "100%""#, "max_parallel = 4", "1.31.2-1");
    let (code, out, err) = cli(&center.url(), &["rollouts", "create", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "rollout kubelet-1.31.2 created: 20 node(s) in waves 1: 1, 25%: 4, 100%: 15");

    let (code, out, err) = cli(&center.url(), &["rollouts", "show", "kubelet-1.31.2", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let shown = &json_lines(&out)[0];
    let nodes = shown["rollout"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 20, "only the gpu pool");
    assert!(
        nodes
            .iter()
            .all(|n| n["node"].as_str().unwrap().starts_with("gpu-") && n["phase"] == "ROLLOUT_NODE_PHASE_WAITING")
    );
    assert_eq!(nodes[0]["node"], "gpu-00");
    assert_eq!(shown["rollout"]["phase"], "ROLLOUT_PHASE_PENDING");
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

    // The timeline has every decision with who made it.
    let (_, out, _) = cli(&center.url(), &["rollouts", "show", "kubelet-1.31.2", "-o", "json"]).await;
    let events = json_lines(&out)[0]["events"].as_array().unwrap().clone();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["RolloutCreated", "RolloutPaused", "RolloutResumed", "RolloutAborted"]);
    assert!(
        events
            .iter()
            .all(|e| e["attributes"]["rollout"] == "kubelet-1.31.2" && e["attributes"]["issuer"] == "insecure")
    );
    let (_, table, _) = cli(&center.url(), &["rollouts", "list"]).await;
    assert!(table.lines().nth(1).unwrap().contains("aborted"), "{table}");
}

//! The in-cluster manifests (`packaging/kubernetes/`): valid against the Kubernetes OpenAPI
//! schema (offline, with the PyPI package kubernetes-validate, which carries the schemas; installed
//! by scripts/install-test-deps.sh), and a ClusterRole that grants exactly what the remediator
//! uses. Every test that talks to the fake API server runs under the shipped RBAC rules (403 for
//! anything else); here one remediator goes through everything it does to Kubernetes, and every
//! rule must have been needed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekeeper_proto::v1::{
    Observation, RecommendedAction, ReportRequest, Severity, report_service_client::ReportServiceClient,
};
use nodekeeper_tests::{AgentConn, EventCenter, Remediator, condition_report, hello, kubeapi, wait_for};
use serde_json::json;

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// kubernetes-validate: on the PATH, or where scripts/install-test-deps.sh puts it.
fn kubernetes_validate() -> PathBuf {
    let installed = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/nodekeeper-test-tools/venv/bin/kubernetes-validate"))
        .filter(|p| p.exists());
    installed.unwrap_or_else(|| PathBuf::from("kubernetes-validate"))
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schema() {
    let files = manifests();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["namespace.yaml", "rbac.yaml", "remediator.yaml"]);
    let out = std::process::Command::new(kubernetes_validate())
        .args(["--strict", "--kubernetes-version", "1.31.0"])
        .args(&files)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubernetes-validate (scripts/install-test-deps.sh installs it)")
        .wait_with_output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for resource in [
        "namespace/nodekeeper",
        "serviceaccount/nodekeeper-remediator",
        "clusterrole/nodekeeper-remediator",
        "clusterrolebinding/nodekeeper-remediator",
        "role/nodekeeper-remediator-leader-election",
        "rolebinding/nodekeeper-remediator-leader-election",
        "configmap/nodekeeper-remediator",
        "deployment/nodekeeper-remediator",
    ] {
        assert!(text.contains(&format!("passed for resource {resource} ")), "{resource}: {text}");
    }
}

#[test]
fn requests_the_rules_do_not_grant_are_forbidden() {
    use axum::http::Method;
    let access = |m: Method, path: &str, q: Option<&str>| kubeapi::rbac::access(&m, path, q);
    let own = |ns: &str, group: &str, resource: &str, verb: &str| {
        (ns.to_owned(), group.to_owned(), resource.to_owned(), verb.to_owned())
    };
    assert_eq!(access(Method::GET, "/api/v1/nodes", None), own("", "", "nodes", "list"));
    assert_eq!(access(Method::GET, "/api/v1/nodes", Some("watch=true")), own("", "", "nodes", "watch"));
    assert_eq!(access(Method::PATCH, "/api/v1/nodes/n1/status", None), own("", "", "nodes/status", "patch"));
    assert_eq!(
        access(Method::POST, "/api/v1/namespaces/shop/pods/web-1/eviction", None),
        own("shop", "", "pods/eviction", "create")
    );
    assert_eq!(
        access(Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/nodekeeper/leases/l", None),
        own("nodekeeper", "coordination.k8s.io", "leases", "update")
    );
    let rules = kubeapi::rbac::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/rbac.yaml"));
    // The Lease only in the remediator's namespace; no deletions anywhere.
    assert!(rules.contains(&own("nodekeeper", "coordination.k8s.io", "leases", "update")));
    assert!(!rules.iter().any(|r| r.1 == "coordination.k8s.io" && r.0.is_empty()), "{rules:?}");
    assert!(!rules.iter().any(|r| r.3 == "delete"), "{rules:?}");
}

/// A remediator that does everything it does to Kubernetes, quickly: leader election, node sync
/// with onboarding, conditions and Events, and a playbook that isolates, labels, evicts and
/// releases.
const EVERYTHING: &str = "poll_interval = \"200ms\"\nstep_deadline = \"60s\"\nmigration_timeout = \"1s\"\nevict = true\n\
    [[playbook]]\ntypes = [\"RbacFault\"]\nsteps = [\"isolate\", \"label-pods\", \"evict\", \"verify\", \"release\"]\n\
    [leader_election]\nenabled = true\nnamespace = \"nodekeeper\"\nlease_duration = \"4s\"\nrenew_deadline = \"3s\"\nretry_period = \"300ms\"\n\
    [kubernetes_nodes]\nsync_period = \"1s\"\nonboarding_check = \"200ms\"\n\
    [node_conditions]\nheartbeat_period = \"1s\"\n";

const CENTER: &str = "[nodes]\ncheck_interval = \"100ms\"\n[permits]\nbreaker_fault_share = 1.0\n\
    [[permits.policy]]\noperation = \"isolate\"\nmax_in_flight = 10\nmax_share = 1.0\n";

fn oom(seq: u64) -> Observation {
    Observation {
        sequence: seq,
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: "OOMKilling".into(),
        message: "Killed process 4242 (java)".into(),
        severity: Severity::Warning as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_role_grants_what_the_remediator_uses_and_nothing_more() {
    let center = EventCenter::start(CENTER).await;
    let api = kubeapi::Server::start().await;
    api.kube.register_node("n1", json!({ "pool": "a" }), &["nodekeeper.io/not-ready"]);
    api.kube.add_pod("shop", "web-1", "n1", Some("ReplicaSet"));
    let mut h = hello("c1", "n1", "b1");
    h.heartbeat_interval = Some(nodekeeper_common::time::to_duration(Duration::from_secs(60)));
    let mut agent = AgentConn::connect(&center.url(), h).await.unwrap();
    let _remediator = Remediator::start(&center.url(), &api.kubeconfig, EVERYTHING);

    // A fault to remediate, then (the remediator following by then) a temporary problem twice:
    // an Event, then its count raised.
    let report =
        |id: &str, holds: bool| condition_report(id, "c1", "n1", "RbacFault", holds, RecommendedAction::Manual);
    ReportServiceClient::new(center.channel().await)
        .report(ReportRequest { producer: "test-operator".into(), reports: vec![report("f1", true)] })
        .await
        .unwrap();
    wait_for("the node isolated", Duration::from_secs(30), || async {
        kubeapi::cordoned_and_tainted(&api.kube.node("n1"), "nodekeeper.io/fault").1.then_some(())
    })
    .await;
    // The playbook evicts before it verifies; a fault cleared before that would end it early and
    // leave the eviction rule unused (CI saw that race).
    wait_for("the pod evicted", Duration::from_secs(30), || async {
        api.kube.pod("shop", "web-1").is_none().then_some(())
    })
    .await;
    agent.send_acked(1, vec![oom(1)]).await;
    agent.send_acked(2, vec![oom(2)]).await;
    ReportServiceClient::new(center.channel().await)
        .report(ReportRequest { producer: "test-operator".into(), reports: vec![report("f2", false)] })
        .await
        .unwrap();

    // The release comes after the fault clears (every rule may be used before it).
    wait_for("the node released", Duration::from_secs(30), || async {
        (api.kube.node("n1")["spec"]["unschedulable"] == json!(null)).then_some(())
    })
    .await;

    // Every rule was needed; nothing was asked that the rules do not grant (it would have been
    // refused, and the wait would not end).
    let rules = api.kube.rbac_rules();
    let every = wait_for("every rule used", Duration::from_secs(60), || async {
        (api.kube.rbac_used() == rules).then_some(())
    });
    let settled = tokio::time::timeout(Duration::from_secs(30), every).await;
    let unused: Vec<_> = rules.difference(&api.kube.rbac_used()).cloned().collect();
    assert!(settled.is_ok(), "rules the remediator never needed: {unused:?}");
    assert_eq!(api.kube.node("n1")["spec"]["unschedulable"], json!(null), "released");
    assert!(api.kube.events().iter().any(|e| e["count"] == 2), "{:?}", api.kube.events());

    // And what is not granted is refused, as the API server refuses it.
    nodekeeper_common::tls::install_default_provider();
    let forbidden = reqwest::Client::new().delete(format!("{}/api/v1/nodes/n1", api.url)).send().await.unwrap();
    assert_eq!(forbidden.status(), 403);
    let body: serde_json::Value = forbidden.json().await.unwrap();
    assert_eq!(body["reason"], "Forbidden");
}

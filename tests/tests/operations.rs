//! Operations: every service's `/metrics` checked by `promtool check metrics` (Debian's
//! prometheus package), and the center's ops alerts for fleet-wide heartbeat loss and a lagging
//! subscriber, created in and resolved from a real Alertmanager and delivered to a JSON webhook.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_proto::v1::{
    AckConsumerRequest, AcquirePermitRequest, Heartbeat, Operation, RecommendedAction, ReportRequest, StartPosition,
    SubscribeRequest, agent_message, event_service_client::EventServiceClient,
    permit_service_client::PermitServiceClient, report_service_client::ReportServiceClient,
};
use nodekeeper_tests::alertmanager::Alertmanager;
use nodekeeper_tests::storage::Tgt;
use nodekeeper_tests::{
    Agent, AgentConn, AgentSpec, EventCenter, KillOnDrop, LOGS_ONLY, bin, cli, condition_report, free_port, hello,
    http_get, json_lines, metric, metric_where, wait_for,
};
use tokio::io::AsyncWriteExt;

/// Runs `promtool check metrics` on `text`; panics with its complaints.
async fn promtool(service: &str, text: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-test-deps.sh installs Debian's prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool on {service}'s metrics: {said}\n{text}");
}

/// Writes a service's config into `dir` and returns its path, for `--config`.
fn config_file(dir: &std::path::Path, service: &str, text: &str) -> String {
    let path = dir.join(format!("{service}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A detector sweeping every second, talking plaintext to `center`, /metrics on `metrics`.
fn detector_toml(center: &str, metrics: u16) -> String {
    format!(
        "name = \"d1\"\ncenter = \"{center}\"\ninsecure = true\nsweep_interval = \"1s\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n"
    )
}

/// A dry-run remediator of cluster c1 (no Kubernetes needed), /metrics on `metrics`.
fn remediator_toml(center: &str, metrics: u16) -> String {
    format!(
        "name = \"r1\"\ncluster = \"c1\"\ncenter = \"{center}\"\ninsecure = true\ndry_run = true\nstart_from = \"oldest\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n"
    )
}

/// A storage syncer of cluster c1 keeping the ACL of `tgt`'s target, /metrics on `metrics`.
fn storage_toml(center: &str, metrics: u16, tgt: &Tgt, state: &std::path::Path) -> String {
    format!(
        "name = \"s1\"\ncluster = \"c1\"\ncenter = \"{center}\"\ninsecure = true\nresync_interval = \"1s\"\nstate_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n[[target]]\nname = \"vol\"\nclients = \"initiators\"\n{}",
        state.display(),
        tgt.backend_toml()
    )
}

/// A node of cluster c1 with an initiator name, registered through its own short stream.
async fn register_initiator(center: &str) {
    let mut h = hello("c1", "iscsi-1", "00000000-0000-4000-8000-0000000000a1");
    h.inventory = Some(nodekeeper_proto::v1::Inventory {
        iscsi_initiator_name: "iqn.2026-12.io.example:iscsi-1".into(),
        ..Default::default()
    });
    drop(AgentConn::connect(center, h).await.unwrap());
}

/// Waits until the syncer's target holds one entry and it made `passes` passes; its metrics.
async fn storage_synced(metrics: u16, passes: f64) -> String {
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    wait_for("the storage syncer's passes", Duration::from_secs(30), || async {
        let text = nodekeeper_tests::try_http_get(&url).await.ok()?;
        (metric(&text, "nodekeeper_storage_entries")? == 1.0
            && metric(&text, "nodekeeper_storage_passes_total")? >= passes)
            .then_some(text)
    })
    .await
}

/// Starts one of our services with `config`; killed when dropped.
fn spawn_service(dir: &std::path::Path, service: &str, config: &str) -> KillOnDrop {
    let config = config_file(dir, service, config);
    KillOnDrop(
        std::process::Command::new(bin(service)).args(["--config", &config]).env("RUST_LOG", "warn").spawn().unwrap(),
    )
}

/// The body of a GET with an OpenMetrics Accept header, as Prometheus sends it.
async fn openmetrics(url: &str) -> (String, String) {
    nodekeeper_common::tls::install_default_provider();
    let r = reqwest::Client::new()
        .get(url)
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .unwrap();
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    (ct, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_metrics_that_promtool_accepts() {
    let center_metrics = free_port();
    let center = EventCenter::start(&format!(
        "metrics_listen = \"127.0.0.1:{center_metrics}\"\n[[permits.policy]]\noperation = \"reboot\"\nmax_in_flight = 1\n"
    ))
    .await;
    let url = center.url();
    let host = nodekeeper_tests::FixtureHost::new();
    let mut spec = AgentSpec::new("m1", &url);
    let paths = host.paths();
    spec.extra = &paths;
    spec.monitors = LOGS_ONLY;
    let agent = Agent::start(spec).await;

    let dir = tempfile::tempdir().unwrap();
    let (detector_metrics, remediator_metrics) = (free_port(), free_port());
    let _detector = spawn_service(dir.path(), "nodekeeper-detector", &detector_toml(&url, detector_metrics));
    let _remediator = spawn_service(dir.path(), "nodekeeper-remediator", &remediator_toml(&url, remediator_metrics));

    // Something to count: a fault, a granted and a denied permit (in another cluster, whose
    // breaker the fault does not trip), probes, remediation steps.
    let ch = center.channel().await;
    ReportServiceClient::new(ch.clone())
        .report(ReportRequest {
            producer: "ops-test".into(),
            reports: vec![condition_report("r1", "c1", "m1", "KernelDeadlock", true, RecommendedAction::Reboot)],
        })
        .await
        .unwrap();
    for node in ["m1", "m2"] {
        PermitServiceClient::new(ch.clone())
            .acquire_permit(AcquirePermitRequest {
                operation: Operation::Reboot as i32,
                cluster: "c2".into(),
                node: node.into(),
                fault_id: 1,
                lease: None,
            })
            .await
            .unwrap();
    }

    let center_url = format!("http://127.0.0.1:{center_metrics}/metrics");
    let text = wait_for("the center's metrics", Duration::from_secs(20), || async {
        let text = nodekeeper_tests::try_http_get(&center_url).await.ok()?;
        (metric_where(&text, "nodekeeper_eventcenter_unresolved_faults", r#"type="KernelDeadlock""#) == Some(1.0))
            .then_some(text)
    })
    .await;
    promtool("the event center", &text).await;
    assert!(text.contains(r#"{type="KernelDeadlock",severity=""#), "faults by type and severity: {text}");
    assert_eq!(
        metric_where(&text, "nodekeeper_eventcenter_permit_decisions_total", r#"decision="granted""#),
        Some(1.0)
    );
    assert_eq!(
        metric_where(&text, "nodekeeper_eventcenter_permit_decisions_total", r#"reason="max_in_flight""#),
        Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "nodekeeper_eventcenter_events_stored_total").unwrap() >= 3.0, "{text}");
    assert!(metric(&text, "nodekeeper_eventcenter_store_commit_seconds_count").unwrap() >= 1.0, "{text}");
    assert_eq!(metric_where(&text, "nodekeeper_eventcenter_nodes", r#"state="alive""#), Some(1.0), "{text}");
    // No series names a node: the center counts, it does not list.
    assert!(!text.contains("node=\""), "{text}");

    let agent_url = format!("{}/metrics", agent.status_url());
    let text = http_get(&agent_url).await;
    promtool("the agent", &text).await;
    assert!(metric(&text, "nodekeeper_agent_outbox_depth").is_some(), "{text}");
    assert!(metric_where(&text, "nodekeeper_agent_monitor_cpu_seconds_total", "monitor=\"log/").is_some(), "{text}");

    let detector_url = format!("http://127.0.0.1:{detector_metrics}/metrics");
    let text = wait_for("the detector's probes", Duration::from_secs(20), || async {
        let text = nodekeeper_tests::try_http_get(&detector_url).await.ok()?;
        (metric(&text, "nodekeeper_detector_probes_total")? >= 1.0).then_some(text)
    })
    .await;
    promtool("the detector", &text).await;
    assert!(metric(&text, "nodekeeper_detector_probe_seconds_count").unwrap() >= 1.0, "{text}");

    let remediator_url = format!("http://127.0.0.1:{remediator_metrics}/metrics");
    let text = wait_for("the remediator's steps", Duration::from_secs(20), || async {
        let text = nodekeeper_tests::try_http_get(&remediator_url).await.ok()?;
        (metric(&text, "nodekeeper_remediator_steps_total")? >= 1.0).then_some(text)
    })
    .await;
    promtool("the remediator", &text).await;

    let tgt = Tgt::start("127.0.0.1".parse().unwrap()).await;
    register_initiator(&url).await;
    let storage_metrics = free_port();
    let state = dir.path().join("storage-state");
    let _storage = spawn_service(dir.path(), "nodekeeper-storage", &storage_toml(&url, storage_metrics, &tgt, &state));
    let text = storage_synced(storage_metrics, 1.0).await;
    promtool("the storage syncer", &text).await;
    assert_eq!(metric_where(&text, "nodekeeper_storage_changes_total", r#"op="add""#), Some(1.0), "{text}");
    let storage_url = format!("http://127.0.0.1:{storage_metrics}/metrics");

    // Prometheus asks for OpenMetrics and gets it.
    for url in [&center_url, &agent_url, &detector_url, &remediator_url, &storage_url] {
        let (content_type, body) = openmetrics(url).await;
        assert!(content_type.starts_with("application/openmetrics-text"), "{url}: {content_type}");
        assert!(body.ends_with("# EOF\n"), "{url}: {body}");
    }
}

/// A webhook receiver: every JSON body posted to it.
async fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            store.lock().unwrap().push(serde_json::from_str(&body).expect("the webhook body is JSON"));
            async { "ok" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), got)
}

/// The newest status the webhook was told for the alert named `name` (with `label=value`).
fn webhook_status(got: &Mutex<Vec<serde_json::Value>>, name: &str) -> Option<String> {
    got.lock().unwrap().iter().rev().find_map(|payload| {
        payload["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["status"].as_str().unwrap_or_default().to_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_loss_and_subscriber_lag_alert_and_resolve() {
    let am = Alertmanager::start().await;
    let (hook, got) = webhook().await;
    let center = EventCenter::start(&format!(
        "[nodes]\ndefault_heartbeat_interval = \"300ms\"\ngrace_multiplier = 3\ncheck_interval = \"50ms\"\n\
         [alertmanager]\nurl = \"{}\"\nresend_interval = \"500ms\"\n\
         [alerts]\nwebhooks = [\"{hook}\"]\nheartbeat_loss_share = 0.5\nheartbeat_loss_min_nodes = 2\nsubscriber_lag_events = 5\n",
        am.url
    ))
    .await;
    let url = center.url();

    // Four nodes connect, then fall silent: all four lose their heartbeat.
    let mut conns = Vec::new();
    for i in 0..4 {
        conns.push(AgentConn::connect(&url, hello("c1", &format!("h{i}"), "b1")).await.unwrap());
    }
    let loss = ["alertname=\"NodekeeperHeartbeatLoss\"", "cluster=\"c1\""];
    // It fires once more than half are lost (the nodes' graces end one after another, so it may
    // first say 3 of 4) and then says all four.
    let alert = wait_for("the heartbeat loss alert for all four", Duration::from_secs(20), || async {
        am.active(&loss)
            .await
            .into_iter()
            .find(|a| a["annotations"]["summary"].as_str().is_some_and(|s| s.starts_with("4 of 4 nodes of cluster c1")))
    })
    .await;
    assert_eq!(alert["labels"]["severity"], "critical");
    wait_for("the webhook told", Duration::from_secs(10), || async {
        (webhook_status(&got, "NodekeeperHeartbeatLoss").as_deref() == Some("firing")).then_some(())
    })
    .await;

    // Three come back and keep beating: 1 of 4 lost is under the threshold, the alert resolves.
    let beating: Vec<_> = conns.drain(..3).collect();
    let beats = tokio::spawn(async move {
        loop {
            for c in &beating {
                c.send(agent_message::Msg::Heartbeat(Heartbeat::default())).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    wait_for("the heartbeat loss alert resolved", Duration::from_secs(20), || async {
        am.active(&loss).await.is_empty().then_some(())
    })
    .await;
    wait_for("the webhook told it resolved", Duration::from_secs(10), || async {
        (webhook_status(&got, "NodekeeperHeartbeatLoss").as_deref() == Some("resolved")).then_some(())
    })
    .await;

    // A durable consumer that stops acknowledging falls behind.
    let ch = center.channel().await;
    let mut events = EventServiceClient::new(ch.clone());
    let _sub = events
        .subscribe(SubscribeRequest { consumer: "slow".into(), start: StartPosition::Now as i32, ..Default::default() })
        .await
        .unwrap();
    let reports = (0..10)
        .map(|i| condition_report(&format!("lag-{i}"), "c1", "h0", &format!("Lag{i}"), true, RecommendedAction::None))
        .collect();
    ReportServiceClient::new(ch.clone()).report(ReportRequest { producer: "ops-test".into(), reports }).await.unwrap();
    let lag = ["alertname=\"NodekeeperSubscriberLag\"", "consumer=\"slow\""];
    let alert = wait_for("the subscriber lag alert", Duration::from_secs(20), || async {
        am.active(&lag).await.into_iter().next()
    })
    .await;
    assert_eq!(alert["labels"]["severity"], "warning");
    let (code, out, err) = cli(&url, &["consumers", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let slow = json_lines(&out).into_iter().find(|c| c["name"] == "slow").expect("the consumer is listed");
    assert!(slow["lag"].as_str().unwrap().parse::<u64>().unwrap() >= 10, "{slow}");
    events
        .ack_consumer(AckConsumerRequest { consumer: "slow".into(), cursor: center_head(&ch).await.to_string() })
        .await
        .unwrap();
    wait_for("the subscriber lag alert resolved", Duration::from_secs(20), || async {
        am.active(&lag).await.is_empty().then_some(())
    })
    .await;
    let (code, _, err) = cli(&url, &["consumers", "delete", "slow"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!cli(&url, &["consumers", "list"]).await.1.contains("slow"));
    beats.abort();
}

/// The newest committed cursor.
async fn center_head(ch: &tonic::transport::Channel) -> u64 {
    let r = EventServiceClient::new(ch.clone())
        .list_events(nodekeeper_proto::v1::ListEventsRequest { limit: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    r.head_cursor.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_taken_during_ingest_restores_into_a_working_center() {
    let center = EventCenter::start("").await;
    let ch = center.channel().await;
    // Reports keep arriving while the backup runs.
    let writer = {
        let ch = ch.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let reports = (0..50)
                    .map(|j| {
                        condition_report(
                            &format!("b-{i}-{j}"),
                            "c1",
                            "n1",
                            "Backup",
                            j % 2 == 0,
                            RecommendedAction::None,
                        )
                    })
                    .collect();
                ReportServiceClient::new(ch.clone())
                    .report(ReportRequest { producer: "ops-test".into(), reports })
                    .await
                    .unwrap();
            }
        })
    };
    wait_for("some events", Duration::from_secs(20), || async { (center_head(&ch).await >= 500).then_some(()) }).await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("ec.db");
    let backup = |to: std::path::PathBuf| {
        tokio::process::Command::new(bin("nodekeeper-eventcenter"))
            .arg("--data-dir")
            .arg(&center.data_dir)
            .arg("backup")
            .arg("--to")
            .arg(to)
            .env("RUST_LOG", "warn")
            .status()
    };
    assert!(backup(copy.clone()).await.unwrap().success());
    let live_head = center_head(&ch).await;
    writer.abort();
    assert_eq!(backup(copy.clone()).await.unwrap().code(), Some(1), "an existing file is not overwritten");

    // The copy is a store a center opens: every event up to its moment, without a gap.
    let mut restored = EventCenter::new("");
    std::fs::create_dir_all(&restored.data_dir).unwrap();
    std::fs::copy(&copy, restored.data_dir.join("eventcenter.db")).unwrap();
    restored.spawn().await;
    let rch = restored.channel().await;
    let head = center_head(&rch).await;
    assert!((500..=live_head).contains(&head), "backup head {head}, live head {live_head}");
    let mut after = String::new();
    let mut expected = 1;
    loop {
        let r = EventServiceClient::new(rch.clone())
            .list_events(nodekeeper_proto::v1::ListEventsRequest {
                after_cursor: after,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for e in &r.events {
            assert_eq!(e.cursor.parse::<u64>().unwrap(), expected);
            expected += 1;
        }
        if r.events.is_empty() {
            break;
        }
        after = r.next_cursor;
    }
    assert_eq!(expected - 1, head);
}

/// The fields of one native journal protocol datagram (`KEY=value` lines; a value with a newline
/// is `KEY\n<64-bit little-endian length><bytes>\n`).
fn journal_fields(mut d: &[u8]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    while !d.is_empty() {
        let end = d.iter().position(|b| *b == b'\n').unwrap_or(d.len());
        let line = &d[..end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[(end + 1).min(d.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let len = u64::from_le_bytes(d[end + 1..end + 9].try_into().unwrap()) as usize;
            out.insert(key, String::from_utf8_lossy(&d[end + 9..end + 9 + len]).into_owned());
            d = &d[(end + 10 + len).min(d.len())..];
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_logs_carry_each_field_and_the_level() {
    // On a machine where journald runs, its socket is there and the entries go to the real journal.
    let socket = std::path::Path::new("/run/systemd/journal/socket");
    let marker = format!("/nonexistent-{}/copy.db", std::process::id());
    let run = || {
        tokio::process::Command::new(bin("nodekeeper-eventcenter"))
            .args(["--log-format", "journald", "--data-dir", "/nonexistent-store", "backup", "--to", &marker])
            .status()
    };
    // A socket file nobody listens on is what a failed run of this test left.
    if socket.exists() && std::os::unix::net::UnixDatagram::unbound().unwrap().connect(socket).is_err() {
        std::fs::remove_file(socket).unwrap();
    }
    let fields = if socket.exists() {
        assert_eq!(run().await.unwrap().code(), Some(1));
        let out = tokio::process::Command::new("journalctl")
            .args(["-o", "json", "--no-pager", &format!("TO={marker}")])
            .output()
            .await
            .unwrap();
        let entry = json_lines(&String::from_utf8_lossy(&out.stdout)).pop().expect("the entry is in the journal");
        entry.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect()
    } else {
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let journal = tokio::net::UnixDatagram::bind(socket).unwrap();
        assert_eq!(run().await.unwrap().code(), Some(1));
        let mut buf = vec![0u8; 65536];
        let mut found = None;
        while found.is_none() {
            let n = tokio::time::timeout(Duration::from_secs(10), journal.recv(&mut buf)).await.unwrap().unwrap();
            let f = journal_fields(&buf[..n]);
            if f.get("MESSAGE").map(String::as_str) == Some("backup failed") {
                found = Some(f);
            }
        }
        drop(journal);
        std::fs::remove_file(socket).unwrap();
        found.unwrap()
    };
    assert_eq!(fields["PRIORITY"], "3", "an error: {fields:?}");
    assert!(fields["ERROR"].contains("no store here"), "{fields:?}");
    assert_eq!(fields["TARGET"], "nodekeeper_eventcenter", "{fields:?}");
}

/// Every system call in systemd's named groups, expanded (`systemd-analyze syscall-filter`).
async fn syscall_groups() -> std::collections::HashMap<String, Vec<String>> {
    let out = tokio::process::Command::new("systemd-analyze").arg("syscall-filter").output().await.unwrap();
    let mut groups = std::collections::HashMap::<String, Vec<String>>::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let word = line.split_whitespace().next().unwrap_or_default().to_owned();
        if line.starts_with('@') {
            groups.insert(word.clone(), Vec::new());
            current = Some(word);
        } else if !word.is_empty() && !word.starts_with('#') {
            groups.get_mut(current.as_ref().unwrap()).unwrap().push(word);
        }
    }
    groups
}

fn expand(groups: &std::collections::HashMap<String, Vec<String>>, item: &str) -> std::collections::HashSet<String> {
    match groups.get(item) {
        Some(members) => members.iter().flat_map(|m| expand(groups, m)).collect(),
        None => std::collections::HashSet::from([item.to_owned()]),
    }
}

/// The system calls a unit's `SystemCallFilter=` lines allow.
fn allowed_by(
    unit: &str,
    groups: &std::collections::HashMap<String, Vec<String>>,
) -> std::collections::HashSet<String> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(unit))
        .unwrap();
    let mut allowed = std::collections::HashSet::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("SystemCallFilter=")) {
        match line.strip_prefix('~') {
            Some(denied) => denied.split_whitespace().flat_map(|i| expand(groups, i)).for_each(|s| {
                allowed.remove(&s);
            }),
            None => allowed.extend(line.split_whitespace().flat_map(|i| expand(groups, i))),
        }
    }
    allowed
}

/// A service run under `strace -f -c`; on `stop`, SIGTERM to the service, then strace's summary.
struct Traced {
    strace: tokio::process::Child,
    summary: std::path::PathBuf,
}

impl Traced {
    fn start(dir: &std::path::Path, name: &str, args: &[&str]) -> Traced {
        let summary = dir.join(format!("{name}.strace"));
        let strace = tokio::process::Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&summary)
            .arg(bin(name))
            .args(args)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("strace (scripts/install-test-deps.sh installs it)");
        Traced { strace, summary }
    }

    /// Stops the service as systemd would (SIGTERM) and returns the system calls it made.
    async fn stop(mut self) -> Vec<String> {
        let strace = self.strace.id().unwrap();
        let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).unwrap();
        for pid in children.split_whitespace() {
            nodekeeper_tests::signal(pid.parse().unwrap(), "TERM");
        }
        self.strace.wait().await.unwrap();
        std::fs::read_to_string(&self.summary)
            .unwrap()
            .lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && !l.contains("total"))
            .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_makes_only_the_system_calls_its_unit_allows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let center = format!("http://127.0.0.1:{port}");
    let (center_metrics, status) = (free_port(), free_port());
    let (detector_metrics, remediator_metrics) = (free_port(), free_port());
    let center_config = config_file(
        d,
        "nodekeeper-eventcenter",
        &format!("insecure = true\nmetrics_listen = \"127.0.0.1:{center_metrics}\"\n"),
    );
    let data = d.join("data").display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let traced_center = Traced::start(
        d,
        "nodekeeper-eventcenter",
        &["--config", &center_config, "--listen", &listen, "--data-dir", &data],
    );
    wait_for("the center", Duration::from_secs(30), || async {
        nodekeeper_tests::health_ok(&center).await.then_some(())
    })
    .await;
    // The agent with every monitor, checks every second; the kernel log is a fixture file.
    let host = nodekeeper_tests::FixtureHost::new();
    let paths = host.paths();
    let spec = AgentSpec {
        node: "traced",
        heartbeat: "500ms",
        extra: &paths,
        monitors: "[monitors.hardware]\ninterval = \"1s\"\n[monitors.components]\ninterval = \"1s\"\n",
        ..AgentSpec::new("traced", &center)
    };
    let agent_config = config_file(d, "nodekeeper-agent", &Agent::config_for(&spec, &d.join("agent-state"), status));
    let agent = Traced::start(d, "nodekeeper-agent", &["--config", &agent_config]);
    let detector_config = config_file(d, "nodekeeper-detector", &detector_toml(&center, detector_metrics));
    let detector = Traced::start(d, "nodekeeper-detector", &["--config", &detector_config]);
    let remediator_config = config_file(d, "nodekeeper-remediator", &remediator_toml(&center, remediator_metrics));
    let remediator = Traced::start(d, "nodekeeper-remediator", &["--config", &remediator_config]);
    // The storage syncer on a real tgt: its tgtadm children run under its unit's filter too.
    let tgt = Tgt::start("127.0.0.1".parse().unwrap()).await;
    register_initiator(&center).await;
    let storage_metrics = free_port();
    let storage_config =
        config_file(d, "nodekeeper-storage", &storage_toml(&center, storage_metrics, &tgt, &d.join("storage-state")));
    let storage = Traced::start(d, "nodekeeper-storage", &["--config", &storage_config]);

    // Work for each: a kernel fault the agent reports and the remediator plans for, probes,
    // scrapes, checks run at least twice.
    let mut host = host;
    host.log(&["INFO: task jbd2/sda1-8:231 blocked for more than 120 seconds."]);
    let ch = tonic::transport::Channel::from_shared(center.clone()).unwrap().connect().await.unwrap();
    wait_for("the remediator's plan", Duration::from_secs(60), || async {
        let events = nodekeeper_tests::stored_events(ch.clone(), "traced", "RemediationStep").await;
        (!events.is_empty()).then_some(())
    })
    .await;
    wait_for("probes", Duration::from_secs(30), || async {
        let text =
            nodekeeper_tests::try_http_get(&format!("http://127.0.0.1:{detector_metrics}/metrics")).await.ok()?;
        (metric(&text, "nodekeeper_detector_probes_total")? >= 2.0).then_some(())
    })
    .await;
    for port in [center_metrics, remediator_metrics] {
        http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    }
    storage_synced(storage_metrics, 3.0).await;
    // The clock check (adjtimex) has run once it has a CPU series.
    wait_for("the agent's clock check", Duration::from_secs(30), || async {
        let text = nodekeeper_tests::try_http_get(&format!("http://127.0.0.1:{status}/metrics")).await.ok()?;
        metric_where(&text, "nodekeeper_agent_monitor_cpu_seconds_total", r#"monitor="check/clock""#)
    })
    .await;

    let groups = syscall_groups().await;
    let mut outside = Vec::new();
    for (traced, unit) in [
        (agent, "nodekeeper-agent.service"),
        (detector, "nodekeeper-detector.service"),
        (remediator, "nodekeeper-remediator.service"),
        (traced_center, "nodekeeper-eventcenter.service"),
        (storage, "nodekeeper-storage.service"),
    ] {
        let allowed = allowed_by(unit, &groups);
        let calls = traced.stop().await;
        assert!(calls.len() > 20, "{unit}: too few calls traced: {calls:?}");
        // As root SQLite hands its files to their owner with fchown; the center runs as its
        // own user, where SQLite does not.
        let exempt = |c: &String| unit == "nodekeeper-eventcenter.service" && c == "fchown";
        outside
            .extend(calls.into_iter().filter(|c| !allowed.contains(c) && !exempt(c)).map(|c| format!("{unit}: {c}")));
    }
    assert!(outside.is_empty(), "system calls the units' filters do not allow: {outside:?}");
}

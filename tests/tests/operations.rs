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
use nodekeeper_tests::{
    Agent, AgentConn, AgentSpec, EventCenter, KillOnDrop, LOGS_ONLY, bin, condition_report, free_port, hello, http_get,
    metric, metric_where, wait_for,
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
    let detector_metrics = free_port();
    let detector_config = dir.path().join("detector.toml");
    std::fs::write(
        &detector_config,
        format!(
            "name = \"d1\"\ncenter = \"{url}\"\ninsecure = true\nsweep_interval = \"1s\"\nicmp = false\nmetrics_listen = \"127.0.0.1:{detector_metrics}\"\n"
        ),
    )
    .unwrap();
    let _detector = KillOnDrop(
        std::process::Command::new(bin("nodekeeper-detector"))
            .arg("--config")
            .arg(&detector_config)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let remediator_metrics = free_port();
    let remediator_config = dir.path().join("remediator.toml");
    std::fs::write(
        &remediator_config,
        format!(
            "name = \"r1\"\ncluster = \"c1\"\ncenter = \"{url}\"\ninsecure = true\ndry_run = true\nstart_from = \"oldest\"\nmetrics_listen = \"127.0.0.1:{remediator_metrics}\"\n"
        ),
    )
    .unwrap();
    let _remediator = KillOnDrop(
        std::process::Command::new(bin("nodekeeper-remediator"))
            .arg("--config")
            .arg(&remediator_config)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );

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

    // Prometheus asks for OpenMetrics and gets it.
    for url in [&center_url, &agent_url, &detector_url, &remediator_url] {
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
    let alert = wait_for("the heartbeat loss alert", Duration::from_secs(20), || async {
        am.active(&loss).await.into_iter().next()
    })
    .await;
    assert_eq!(alert["labels"]["severity"], "critical");
    assert!(alert["annotations"]["summary"].as_str().unwrap().starts_with("4 of 4 nodes of cluster c1"), "{alert}");
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
    events
        .ack_consumer(AckConsumerRequest { consumer: "slow".into(), cursor: center_head(&ch).await.to_string() })
        .await
        .unwrap();
    wait_for("the subscriber lag alert resolved", Duration::from_secs(20), || async {
        am.active(&lag).await.is_empty().then_some(())
    })
    .await;
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

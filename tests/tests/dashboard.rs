//! The dashboard in a real browser (Debian's chromium through chromedriver): every page loads
//! without a console error and passes an axe-core audit with no serious violation; the overview's
//! numbers are the API's; a fault a real agent emits appears on the open page within 2 s and the
//! remediator's steps follow; an action done in the page is recorded with the operator's
//! identity; a subscriber of cluster c2 sees nothing of c1. Screenshots of each page are kept in
//! `target/dashboard-screenshots/`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Locator, key::Key};
use nodekeeper_proto::v1::{
    GetGuardStateRequest, ListNodesRequest, Liveness, fleet_service_client::FleetServiceClient,
    permit_service_client::PermitServiceClient,
};
use nodekeeper_tests::browser::Browser;
use nodekeeper_tests::pki::Pki;
use nodekeeper_tests::{
    Agent, AgentSpec, EventCenter, KillOnDrop, Remediator, bin, free_port, stored_events, wait_for,
};

const CENTER: &str = "[nodes]\ncheck_interval = \"50ms\"\n";

/// `nodekeeper dashboard` against `server`, with `extra` connection flags; its URL.
async fn dashboard(server: &str, extra: &[&str]) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new(bin("nodekeeper"))
        .args(["--server", server])
        .args(extra)
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn nodekeeper dashboard");
    let url = format!("http://127.0.0.1:{port}");
    let u = url.clone();
    wait_for("the dashboard", Duration::from_secs(20), || {
        let u = u.clone();
        async move { nodekeeper_tests::try_http_get(&format!("{u}/assets/app.css")).await.ok().map(drop) }
    })
    .await;
    (KillOnDrop(child), url)
}

/// Opens `path`, checks its title, console and accessibility, and keeps a screenshot.
async fn visit(b: &Browser, url: &str, path: &str, title: &str, shot: &str) {
    b.client.goto(&format!("{url}{path}")).await.unwrap();
    let got = b.client.title().await.unwrap();
    assert_eq!(got, format!("{title} · nodekeeper"), "{path}");
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "{path}: console errors: {errors:?}");
    let violations = b.accessibility_violations().await;
    assert!(violations.is_empty(), "{path}: accessibility: {violations:?}");
    b.screenshot(shot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_loads_clean_and_a_fault_appears_live_with_its_remediation() {
    let center = EventCenter::start(CENTER).await;
    let url = center.url();
    let agent = Agent::start(AgentSpec::new("node-a", &url)).await;
    let kube = nodekeeper_tests::kubeapi::Server::start().await;
    let _remediator = Remediator::start(&url, &kube.kubeconfig, "dry_run = true\nstart_from = \"oldest\"\n");
    let (_dash, dash) = dashboard(&url, &[]).await;
    let b = Browser::start().await;

    // The overview's numbers are the API's.
    visit(&b, &dash, "/", "Fleet", "overview").await;
    let nodes = FleetServiceClient::new(center.channel().await)
        .list_nodes(ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let alive = nodes.iter().filter(|n| n.liveness() == Liveness::Alive).count();
    assert_eq!(b.text("dd[data-count=nodes]").await.unwrap(), nodes.len().to_string());
    assert_eq!(b.text("dd[data-count=alive]").await.unwrap(), alive.to_string());
    assert_eq!(b.text("dd[data-count=fault]").await.unwrap(), "0");

    // Keyboard: the first Tab reaches the skip link, Enter moves to the content.
    b.client.find(Locator::Css("body")).await.unwrap().send_keys(&Key::Tab.to_string()).await.unwrap();
    let focused = b.client.execute("return document.activeElement.textContent", vec![]).await.unwrap();
    assert_eq!(focused, "Skip to content");

    // A fault emitted by the real agent appears on the open faults page within 2 s.
    visit(&b, &dash, "/faults", "Faults", "faults").await;
    let emitted = Instant::now();
    let status = Command::new(bin("nodekeeper-agent"))
        .args(["emit", "--port", &agent.status_port.to_string(), "--type", "KernelDeadlock"])
        .args(["--message", "task blocked for more than 120 seconds", "--condition", "true", "--action", "reboot"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let row = wait_for("the fault on the open page", Duration::from_secs(5), || async {
        let t = b.text("main table tbody").await?;
        t.contains("KernelDeadlock").then_some(t)
    })
    .await;
    let took = emitted.elapsed();
    assert!(took <= Duration::from_secs(2), "the fault appeared after {took:?}: {row}");
    assert!(b.console_errors().await.is_empty());

    // Keyboard: Tab reaches the fault's link; a live refresh keeps the focus on it; Enter opens it.
    let mut href = serde_json::Value::Null;
    for _ in 0..20 {
        b.client.find(Locator::Css("body")).await.unwrap().send_keys(&Key::Tab.to_string()).await.unwrap();
        href = b.client.execute("return document.activeElement.getAttribute('href')", vec![]).await.unwrap();
        if href.as_str().is_some_and(|h| h.starts_with("/faults/")) {
            break;
        }
    }
    assert!(href.as_str().is_some_and(|h| h.starts_with("/faults/")), "Tab never reached the fault: {href}");
    b.client.execute("document.querySelector('main h1').dataset.stale = '1'", vec![]).await.unwrap();
    let status = Command::new(bin("nodekeeper-agent"))
        .args(["emit", "--port", &agent.status_port.to_string(), "--type", "TaskHung", "--message", "again"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("a live refresh", Duration::from_secs(10), || async {
        let stale = b.client.execute("return document.querySelector('main h1').dataset.stale", vec![]).await.ok()?;
        stale.is_null().then_some(())
    })
    .await;
    let still = b.client.execute("return document.activeElement.getAttribute('href')", vec![]).await.unwrap();
    assert_eq!(still, href, "the refresh kept the keyboard focus");
    b.client.active_element().await.unwrap().send_keys(&Key::Enter.to_string()).await.unwrap();

    // Its page: the remediator's steps follow, live.
    wait_for("the remediation steps on the fault's page", Duration::from_secs(15), || async {
        b.text("ol.timeline").await.filter(|t| t.contains("RemediationStep")).map(drop)
    })
    .await;
    let path = b.client.current_url().await.unwrap().path().to_owned();
    let id = path.trim_start_matches("/faults/").to_owned();
    visit(&b, &dash, &path, &format!("Fault {id}"), "fault").await;
    visit(&b, &dash, "/nodes/c1/node-a", "Node node-a", "node").await;
    assert!(b.text("main").await.unwrap().contains("KernelDeadlock"));
    // Its recent events, newest first: the registration, the fault's event with its link.
    let recent = b.text("main ol.timeline").await.unwrap();
    assert!(recent.contains("NodeRegistered") && recent.contains("TaskHung"), "{recent}");
    assert!(recent.find("TaskHung") < recent.find("NodeRegistered"), "newest first: {recent}");
    b.client.find(Locator::Css(&format!("main ol.timeline a[href='/faults/{id}']"))).await.expect("the fault's link");
    visit(&b, &dash, "/rollouts", "Rollouts", "rollouts").await;
    // Guards: every permit policy of the cluster with its use, as the API has them.
    visit(&b, &dash, "/guards", "Guards", "guards").await;
    let guards = PermitServiceClient::new(center.channel().await)
        .get_guard_state(GetGuardStateRequest { include_limits: true })
        .await
        .unwrap()
        .into_inner();
    let c1 = guards.limits.iter().find(|l| l.cluster == "c1").expect("c1's limits");
    let rows = b.client.find_all(Locator::Css("main table[data-limits=c1] tbody tr")).await.unwrap();
    assert_eq!(rows.len(), c1.policies.len());
    for (row, p) in rows.iter().zip(&c1.policies) {
        let text = row.text().await.unwrap();
        let op = p.operation().as_str_name().trim_start_matches("OPERATION_").to_lowercase().replace('_', " ");
        assert!(text.starts_with(&op) && text.contains(&format!("{} / ", p.in_flight)), "{text} vs {p:?}");
    }
    visit(&b, &dash, "/confirm?action=freeze&cluster=c1", "Confirm", "confirm").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_the_identity_and_actions_carry_it() {
    let pki = Pki::new(&[("subscriber", "ops-c2", "c2"), ("node", "node-1", "c1"), ("node", "node-2", "c2")]).await;
    let center = pki.center(CENTER).await;
    let url = center.url();
    for (node, cluster) in [("node-1", "c1"), ("node-2", "c2")] {
        let ch = nodekeeper_tests::tls_channel(&url, &pki.files(node)).await.unwrap();
        nodekeeper_tests::AgentConn::connect_channel(ch, nodekeeper_tests::hello(cluster, node, "b1")).await.unwrap();
    }
    let server = url.trim_start_matches("https://").to_owned();
    let certs = pki.path().display().to_string();
    let (_ops, ops) = dashboard(&server, &["--certs", &certs, "--identity", "ops-c2"]).await;
    let (_admin, admin) = dashboard(&server, &["--certs", &certs, "--identity", "admin"]).await;
    let b = Browser::start().await;

    // The subscriber of c2: its cluster only; a c1 node's page is refused by the center.
    visit(&b, &ops, "/", "Fleet", "overview-subscriber-c2").await;
    let main = b.text("main").await.unwrap();
    assert!(main.contains("Cluster c2") && !main.contains("Cluster c1"), "{main}");
    b.client.goto(&format!("{ops}/nodes/c1/node-1")).await.unwrap();
    assert_eq!(b.client.title().await.unwrap(), "Forbidden · nodekeeper");
    assert!(!b.text("main").await.unwrap().contains("node-1 "), "nothing of c1 shown");
    b.client.goto(&format!("{ops}/faults?state=all")).await.unwrap();
    assert!(!b.text("main").await.unwrap().contains("c1"));

    // The admin freezes c1 from the page, with a confirmation; the center records the admin.
    b.client.goto(&format!("{admin}/confirm?action=freeze&cluster=c1")).await.unwrap();
    b.client.find(Locator::Id("reason")).await.unwrap().send_keys("disk firmware rollout").await.unwrap();
    b.client.find(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    let title = wait_for("the action's answer", Duration::from_secs(10), || async {
        b.client.title().await.ok().filter(|t| t != "Confirm · nodekeeper")
    })
    .await;
    let answer = b.text("main").await.unwrap();
    assert!(title == "Done · nodekeeper" && answer.contains("Done: frozen"), "{title}: {answer}");
    let guards = PermitServiceClient::new(center.channel().await)
        .get_guard_state(GetGuardStateRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(guards.clusters.iter().any(|g| g.cluster == "c1" && g.frozen), "{guards:?}");
    let frozen = stored_events(center.channel().await, "", "Frozen").await;
    assert_eq!(frozen.len(), 1, "{frozen:?}");
    assert_eq!(frozen[0].attributes["by"], "admin/admin");
    assert!(frozen[0].message.contains("disk firmware rollout"));

    // The subscriber may not: the center refuses, the page says so, nothing is recorded.
    b.client.goto(&format!("{ops}/confirm?action=unfreeze&cluster=c2")).await.unwrap();
    b.client.find(Locator::Id("reason")).await.unwrap().send_keys("try").await.unwrap();
    b.client.find(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    wait_for("the refusal", Duration::from_secs(10), || async {
        (b.client.title().await.ok()? == "Forbidden · nodekeeper").then_some(())
    })
    .await;
    assert!(stored_events(center.channel().await, "", "Unfrozen").await.is_empty());
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sites_cannot_use_the_dashboard_with_the_operators_credentials() {
    let center = EventCenter::start(CENTER).await;
    let (_dash, dash) = dashboard(&center.url(), &[]).await;
    nodekeeper_common::tls::install_default_provider();
    let http = reqwest::Client::new();
    // DNS rebinding: a request addressed to another name is refused.
    let r = http.get(format!("{dash}/")).header("host", "evil.example:80").send().await.unwrap();
    assert_eq!(r.status(), 421);
    // A cross-site post: no token, or a foreign origin, is refused, and nothing is done.
    let r = http
        .post(format!("{dash}/act"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("action=freeze&cluster=&reason=x&token=guess")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let guards = PermitServiceClient::new(center.channel().await)
        .get_guard_state(GetGuardStateRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!guards.global_frozen);
    // The pages forbid framing and foreign scripts.
    let r = http.get(format!("{dash}/")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'self'"), "{csp}");
}

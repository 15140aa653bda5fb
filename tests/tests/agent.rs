//! System tests of nodekeeper-agent with a real event center: separate processes, kill -9,
//! restarts, an outage, systemd notifications, `nodekeeper dev`, and the unit files.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    Condition, ConditionStatus, ListNodesRequest, Observation, Severity, fleet_service_client::FleetServiceClient,
};
use nodekeeper_tests::{
    Agent, AgentSpec, EventCenter, bin, cli, cli_in, free_port, json_lines, sequences, signal, stored_events, wait_for,
};
use tonic::transport::Channel;

const QUICK: &str = "[nodes]\ncheck_interval = \"50ms\"\n";

fn test_observation(i: u64) -> Observation {
    Observation {
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: "TestEvent".into(),
        message: format!("test observation {i}"),
        severity: Severity::Info as i32,
        ..Default::default()
    }
}

fn transition(open: bool) -> Observation {
    Observation {
        r#type: "KernelDeadlock".into(),
        severity: Severity::Error as i32,
        condition: Some(Condition {
            r#type: "KernelDeadlock".into(),
            status: if open { ConditionStatus::True } else { ConditionStatus::False } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_register_heartbeat_and_report() {
    let center = EventCenter::start(QUICK).await;
    let url = center.url();
    let mut agents = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        agents.push(Agent::start(AgentSpec { heartbeat: "200ms", ..AgentSpec::new(n, &url) }).await);
    }
    for a in &agents {
        assert_eq!(a.emit((1..=5).map(test_observation).collect()).await, vec![1, 2, 3, 4, 5]);
    }
    let ch = center.channel().await;
    for a in &agents {
        a.wait_drained().await;
        assert_eq!(sequences(&stored_events(ch.clone(), &a.node, "TestEvent").await), vec![1, 2, 3, 4, 5]);
    }
    let c = ch.clone();
    wait_for("heartbeats from every node", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let nodes =
                FleetServiceClient::new(c).list_nodes(ListNodesRequest::default()).await.ok()?.into_inner().nodes;
            (nodes.len() == 3 && nodes.iter().all(|n| n.last_heartbeat_time.is_some())).then_some(())
        }
    })
    .await;
    let (code, out, err) = cli(&url, &["nodes", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let nodes = json_lines(&out);
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["node-a", "node-b", "node-c"]);
    for n in &nodes {
        assert_eq!(n["connected"], true);
        assert!(!n["inventory"]["kernelVersion"].as_str().unwrap_or("").is_empty(), "inventory sent: {n}");
        assert!(n["inventory"]["cpuCount"].as_u64().unwrap_or(0) > 0, "{n}");
        assert_eq!(
            n["statusPort"].as_u64().map(|p| p as u16),
            agents.iter().find(|a| a.node == n["name"]).map(|a| a.status_port)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_kill_9_under_steady_load_loses_and_duplicates_nothing() {
    let mut center = EventCenter::start(QUICK).await;
    let url = center.url();
    let mut agents = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        agents.push(Agent::start(AgentSpec::new(n, &url)).await);
    }
    let mut emitted: HashMap<String, Vec<u64>> = HashMap::new();
    let started = Instant::now();
    let mut killed_at = None;
    let mut i = 0;
    // A steady rate: one observation per agent every 20 ms for about 4 s, the center down for
    // about 1.5 s of it.
    while started.elapsed() < Duration::from_secs(4) {
        for a in &agents {
            i += 1;
            emitted.entry(a.node.clone()).or_default().extend(a.emit(vec![test_observation(i)]).await);
        }
        if killed_at.is_none() && started.elapsed() > Duration::from_secs(1) {
            center.kill9();
            killed_at = Some(Instant::now());
        }
        if let Some(k) = killed_at
            && k.elapsed() > Duration::from_millis(1500)
            && !center.is_running()
        {
            center.spawn().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(center.is_running());
    let ch = center.channel().await;
    for a in &agents {
        a.wait_drained().await;
        let want = &emitted[&a.node];
        assert!(want.windows(2).all(|w| w[1] == w[0] + 1), "agent sequences are contiguous");
        let got = sequences(&stored_events(ch.clone(), &a.node, "TestEvent").await);
        assert_eq!(&got, want, "{}: every observation stored exactly once, in order", a.node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill_9_mid_stream_resends_from_its_outbox() {
    let center = EventCenter::start(QUICK).await;
    let mut agent = Agent::start(AgentSpec::new("node-a", &center.url())).await;
    let mut first = Vec::new();
    for chunk in 0..3 {
        first.extend(agent.emit((chunk * 1000 + 1..=chunk * 1000 + 1000).map(test_observation).collect()).await);
    }
    // Killed while most of the burst is still being sent.
    agent.kill9();
    agent.spawn().await;
    let second = agent.emit((1..=10).map(test_observation).collect()).await;
    assert_eq!(second[0], first.last().unwrap() + 1, "the sequence continues after the restart");
    agent.wait_drained().await;
    let got = sequences(&stored_events(center.channel().await, "node-a", "TestEvent").await);
    assert_eq!(got, (1..=3010).collect::<Vec<_>>(), "nothing lost, nothing duplicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_is_lost_within_its_grace_and_resumes_when_started() {
    let center = EventCenter::start(QUICK).await;
    // Heartbeat 300 ms: grace 900 ms.
    let mut agent = Agent::start(AgentSpec { heartbeat: "300ms", ..AgentSpec::new("node-a", &center.url()) }).await;
    let ch = center.channel().await;
    let c = ch.clone();
    wait_for("the node to register", Duration::from_secs(10), || {
        let c = c.clone();
        async move { (!stored_events(c, "node-a", "NodeRegistered").await.is_empty()).then_some(()) }
    })
    .await;
    let status = agent.terminate();
    assert!(status.success(), "SIGTERM: clean exit, got {status:?}");
    let stopped = Instant::now();
    let c = ch.clone();
    wait_for("NodeHeartbeatLost", Duration::from_secs(10), || {
        let c = c.clone();
        async move { (!stored_events(c, "node-a", "NodeHeartbeatLost").await.is_empty()).then_some(()) }
    })
    .await;
    // Its last heartbeat came at most one interval before the stop.
    assert!(stopped.elapsed() <= Duration::from_millis(900 + 1000), "lost after {:?}", stopped.elapsed());
    agent.spawn().await;
    let c = ch.clone();
    wait_for("NodeHeartbeatResumed", Duration::from_secs(10), || {
        let c = c.clone();
        async move { (!stored_events(c, "node-a", "NodeHeartbeatResumed").await.is_empty()).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_as_documented_and_reports_it_when_the_center_returns() {
    // The center is not running yet: its address is known but nothing listens there.
    let mut center = EventCenter::new(QUICK);
    let extra = "[outbox]\nmax_bytes = 8192\n";
    let agent = Agent::start(AgentSpec { extra, ..AgentSpec::new("node-a", &center.url()) }).await;
    agent.emit(vec![transition(true)]).await;
    for chunk in 0..10 {
        agent.emit((chunk * 20 + 1..=chunk * 20 + 20).map(test_observation).collect()).await;
    }
    agent.emit(vec![transition(false)]).await;
    let status = agent.status().await;
    assert!(!status.connected);
    assert!(status.outbox_dropped_total > 0, "a full outbox drops: {status:?}");
    assert!(status.outbox_bytes <= 8192 + 1024, "bounded: {status:?}");
    let dropped = status.outbox_dropped_total;

    center.spawn().await;
    agent.wait_drained().await;
    let ch = center.channel().await;
    let overflow = stored_events(ch.clone(), "node-a", "OutboxOverflow").await;
    assert_eq!(overflow.len(), 1, "one report of the drops");
    assert_eq!(overflow[0].attributes["dropped"], dropped.to_string());
    let transitions = stored_events(ch.clone(), "node-a", "KernelDeadlock").await;
    assert_eq!(transitions.len(), 2, "condition transitions are never dropped");
    let kept = sequences(&stored_events(ch.clone(), "node-a", "TestEvent").await);
    assert_eq!(kept.len() as u64 + dropped, 200, "what was not dropped arrived");
    // The oldest were dropped first: what arrived is the newest.
    assert_eq!(kept.last(), Some(&201), "{kept:?}");
    let c = ch.clone();
    wait_for("the drop count in the node's heartbeat", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let nodes =
                FleetServiceClient::new(c).list_nodes(ListNodesRequest::default()).await.ok()?.into_inner().nodes;
            (nodes.first()?.outbox_dropped_total == dropped).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_then_watchdog_pings_at_half_the_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let socket_path = tmp.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let center = EventCenter::start(QUICK).await;
    let env = vec![
        ("NOTIFY_SOCKET".to_owned(), socket_path.display().to_string()),
        ("WATCHDOG_USEC".to_owned(), "400000".to_owned()),
    ];
    let _agent = Agent::start_with_env(AgentSpec::new("node-a", &center.url()), env).await;
    let mut ready = false;
    let mut pings = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 4096];
    while pings.len() < 5 {
        assert!(Instant::now() < deadline, "ready={ready}, pings={}", pings.len());
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await.unwrap().unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        for line in msg.lines() {
            match line {
                "READY=1" => ready = true,
                "WATCHDOG=1" => {
                    assert!(ready, "READY comes before the first watchdog ping");
                    pings.push(Instant::now());
                }
                _ => {}
            }
        }
    }
    // Half of WatchdogSec (400 ms): about 200 ms apart on average. Each gap is measured when the
    // test reads the message, so one late read shortens the next gap: single gaps get a wide band.
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(mean >= Duration::from_millis(170) && mean <= Duration::from_millis(250), "{gaps:?}");
    for g in &gaps {
        assert!(*g >= Duration::from_millis(80) && *g <= Duration::from_millis(320), "{gaps:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_agent_config_names_file_and_key_and_exits_78() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("cluster = \"c1\"\nheartbeat_intervall = \"1s\"\n", "heartbeat_intervall"),
        ("[outbox]\nmax_bytes = \"lots\"\n", "outbox.max_bytes"),
        ("heartbeat_interval = \"soon\"\n", "heartbeat_interval"),
        ("cluster = \"Not_A_Cluster\"\n", "cluster"),
    ] {
        let path = tmp.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let out =
            tokio::process::Command::new(bin("nodekeeper-agent")).arg("--config").arg(&path).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(&path.display().to_string()), "names the file: {stderr}");
        assert!(stderr.contains(key), "names the key {key}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodekeeper_dev_runs_shows_this_machine_stops_on_sigint_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    // HOME of its own: dev leaves the CLI's admin credentials there, and the CLI finds them.
    let home = tmp.path().join("home");
    let port = free_port();
    let status_port = free_port();
    let dashboard = free_port();
    let server = format!("https://127.0.0.1:{port}");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    for run in 0..2 {
        let mut dev = tokio::process::Command::new(bin("nodekeeper"))
            .args(["dev", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--status-port", &status_port.to_string()])
            .args(["--dashboard", &format!("127.0.0.1:{dashboard}")])
            .env("HOME", &home)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (s, h) = (server.clone(), home.clone());
        let node = wait_for("this machine in nodes list", Duration::from_secs(30), || {
            let (s, h) = (s.clone(), h.clone());
            async move {
                let (code, out, _) = cli_in(Some(&h), &s, &["nodes", "list", "-o", "json"]).await;
                let nodes = json_lines(&out);
                (code == 0 && nodes.len() == 1 && nodes[0]["connected"] == true).then(|| nodes[0].clone())
            }
        })
        .await;
        assert_eq!(node["inventory"]["hostname"], hostname.as_str());
        // The dashboard, as the development admin, shows the machine's cluster.
        let page = format!("http://127.0.0.1:{dashboard}/");
        let overview = wait_for("the dashboard", Duration::from_secs(20), || async {
            nodekeeper_tests::try_http_get(&page).await.ok().filter(|p| p.contains("Cluster dev"))
        })
        .await;
        assert!(overview.contains(&format!("/nodes/dev/{hostname}")), "{overview}");
        // Over mutual TLS: the plain port answers nothing useful, the agent presented its certificate.
        assert!(home.join(".config/nodekeeper/pki/admin.pem").exists());
        let (code, out, _) = cli(&server.replace("https", "http"), &["nodes", "list"]).await;
        assert!(code != 0 && out.is_empty(), "plaintext is refused");
        if run == 0 {
            // A fault on this machine: the remediator, in dry run, records its plan on the fault.
            let emitted = tokio::process::Command::new(bin("nodekeeper-agent"))
                .args(["emit", "--port", &status_port.to_string(), "--type", "KernelDeadlock"])
                .args(["--message", "test", "--condition", "true", "--action", "reboot"])
                .output()
                .await
                .unwrap();
            assert!(emitted.status.success(), "{}", String::from_utf8_lossy(&emitted.stderr));
            let (s, h) = (server.clone(), home.clone());
            let plan = wait_for("the remediator's plan", Duration::from_secs(30), || {
                let (s, h) = (s.clone(), h.clone());
                async move {
                    let (_, list, _) = cli_in(Some(&h), &s, &["faults", "list", "-o", "json"]).await;
                    let fault = json_lines(&list).into_iter().find(|f| f["type"] == "KernelDeadlock")?;
                    let id = fault["id"]
                        .as_u64()
                        .map(|i| i.to_string())
                        .or_else(|| fault["id"].as_str().map(str::to_owned))?;
                    let (_, out, _) = cli_in(Some(&h), &s, &["faults", "show", &id]).await;
                    out.contains("[dry run] release").then_some(out)
                }
            })
            .await;
            for step in ["[dry run] isolate", "[dry run] label-pods", "[dry run] reboot"] {
                assert!(plan.contains(step), "{plan}");
            }
        }
        if run == 1 {
            // The second run found the first run's data: the node registered once, rebooted never.
            let (_, out, _) =
                cli_in(Some(&home), &server, &["events", "list", "--type", "NodeRegistered", "-o", "json"]).await;
            assert_eq!(json_lines(&out)[0]["events"].as_array().unwrap().len(), 1);
        }
        signal(dev.id().unwrap(), "INT");
        let status = tokio::time::timeout(Duration::from_secs(30), dev.wait()).await.unwrap().unwrap();
        assert!(status.success(), "dev exits cleanly on SIGINT: {status:?}");
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut dev.stdout.take().unwrap(), &mut out).await.unwrap();
        assert!(out.contains("nodekeeper dev is running") && out.contains("nodes list"), "{out}");
        assert!(out.contains(&format!("dashboard     http://127.0.0.1:{dashboard}/")), "{out}");
        let (code, _, _) = cli_in(Some(&home), &server, &["nodes", "list"]).await;
        assert_eq!(code, 3, "the event center stopped with it");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_systemd_unit_passes_systemd_analyze_verify() {
    let units_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let bin_dir = bin("nodekeeper").parent().unwrap().to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&units_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let hardening = [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=",
            "SystemCallFilter=@system-service",
            "SystemCallErrorNumber=EPERM",
            "RestrictAddressFamilies=",
        ];
        for required in ["Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=78"]
            .into_iter()
            .chain(hardening)
        {
            assert!(text.lines().any(|l| l.starts_with(required)), "{} lacks {required}", path.display());
        }
        // The services run as their system user; only the agent (the node's manager) and the
        // storage syncer (tgtd and ganesha answer root only) are root.
        let is_agent = path.file_name().unwrap() == "nodekeeper-agent.service";
        let is_root = is_agent || path.file_name().unwrap() == "nodekeeper-storage.service";
        assert_eq!(text.contains("\nUser=nodekeeper\n"), !is_root, "{}", path.display());
        // Verified against the binaries just built, where the package would install them.
        let unit = tmp.path().join(path.file_name().unwrap());
        std::fs::write(&unit, text.replace("/usr/bin/", &format!("{}/", bin_dir.display()))).unwrap();
        let out = tokio::process::Command::new("systemd-analyze").arg("verify").arg(&unit).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "{}: {stderr}", path.display());
        // systemd's own scoring of the sandbox (0 locked down .. 10 exposed): the services are
        // held to "OK" below 2, the agent (root, kernel log, devices) below 4.
        let out = tokio::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&unit)
            .output()
            .await
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let exposure: f64 = report
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for ")?.1.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {}: {report}", path.display()));
        let limit = if is_agent { 4.0 } else { 2.0 };
        assert!(exposure < limit, "{}: exposure {exposure} (limit {limit})", path.display());
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_inventory_reaches_the_center_as_an_event() {
    let center = EventCenter::start(QUICK).await;
    let etc = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(etc.path().join("iscsi")).unwrap();
    let initiator = etc.path().join("iscsi/initiatorname.iscsi");
    std::fs::write(&initiator, "InitiatorName=iqn.2004-10.com.example:node-a-old\n").unwrap();
    let extra = format!("inventory_interval = \"200ms\"\n[paths]\netc = \"{}\"\n", etc.path().display());
    let _agent = Agent::start(AgentSpec { extra: &extra, ..AgentSpec::new("node-a", &center.url()) }).await;
    let ch = center.channel().await;
    let node = |ch: Channel| async move {
        FleetServiceClient::new(ch)
            .get_node(nodekeeper_proto::v1::GetNodeRequest { cluster: "c1".into(), node: "node-a".into() })
            .await
            .ok()
            .map(|n| n.into_inner())
    };
    let c = ch.clone();
    wait_for("the node's first inventory", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let n = node(c).await?;
            (n.inventory?.iscsi_initiator_name == "iqn.2004-10.com.example:node-a-old").then_some(())
        }
    })
    .await;
    // The node was re-imaged with a new initiator name: storage ACLs must follow.
    std::fs::write(&initiator, "InitiatorName=iqn.2004-10.com.example:node-a-new\n").unwrap();
    let c = ch.clone();
    let changed = wait_for("NodeInventoryChanged", Duration::from_secs(10), || {
        let c = c.clone();
        async move { stored_events(c, "node-a", "NodeInventoryChanged").await.into_iter().next() }
    })
    .await;
    assert_eq!(changed.attributes["changed"], "iscsi_initiator_name");
    let n = node(ch).await.unwrap();
    assert_eq!(n.inventory.unwrap().iscsi_initiator_name, "iqn.2004-10.com.example:node-a-new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_outbox_before_the_agent_exits() {
    let center = EventCenter::start(QUICK).await;
    // Small batches, one in flight: most of the outbox is still unsent when SIGTERM arrives.
    let extra = "flush_timeout = \"20s\"\n[outbox]\nbatch_size = 10\nwindow = 1\n";
    let mut agent = Agent::start(AgentSpec { extra, ..AgentSpec::new("node-a", &center.url()) }).await;
    let mut emitted = Vec::new();
    for chunk in 0..2 {
        emitted.extend(agent.emit((chunk * 1000 + 1..=chunk * 1000 + 1000).map(test_observation).collect()).await);
    }
    assert!(agent.status().await.outbox_depth > 500, "the test needs a backlog at SIGTERM");
    let status = agent.terminate();
    assert!(status.success(), "{status:?}");
    // The agent is gone: whatever the center has, it had before the agent exited.
    let got = sequences(&stored_events(center.channel().await, "node-a", "TestEvent").await);
    assert_eq!(got, emitted, "everything stored was delivered before exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_answers_every_command_it_receives() {
    use nodekeeper_proto::v1::{RestartComponent, SendCommandRequest, send_command_request};
    let center = EventCenter::start(QUICK).await;
    let _agent = Agent::start(AgentSpec::new("node-a", &center.url())).await;
    let ch = center.channel().await;
    let req = SendCommandRequest {
        cluster: "c1".into(),
        node: "node-a".into(),
        action: Some(send_command_request::Action::RestartComponent(RestartComponent { component: "kubelet".into() })),
        ..Default::default()
    };
    let c = ch.clone();
    // Until the agent's stream is registered the node is "not connected".
    let sent = wait_for("the command to be accepted", Duration::from_secs(10), || {
        let (c, req) = (c.clone(), req.clone());
        async move { FleetServiceClient::new(c).send_command(req).await.ok().map(|r| r.into_inner()) }
    })
    .await;
    let c = ch.clone();
    let result = wait_for("the agent's answer", Duration::from_secs(10), || {
        let c = c.clone();
        async move { stored_events(c, "node-a", "CommandResult").await.into_iter().next() }
    })
    .await;
    assert_eq!(result.attributes["command_id"], sent.command_id);
    assert_eq!(result.attributes["success"], "false");
    // No component named kubelet is desired of this node: refused with the reason, not dropped.
    assert!(result.message.contains("no component \"kubelet\" is desired on this node"), "{}", result.message);
}

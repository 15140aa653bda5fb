//! What must never take a node off the map: observations the center would refuse (refused at
//! `Emit`, cut by the monitors, refused one by one in a batch), sequences beyond what a store
//! holds, an agent whose state was lost, reconnect backoff after healthy sessions, enum values
//! this contract does not define, and a center whose disk runs full.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    Condition, ConditionStatus, ListFaultsRequest, Observation, Report, ReportRequest, Severity,
    fleet_service_client::FleetServiceClient, report_service_client::ReportServiceClient,
};
use nodekeeper_tests::alertmanager::Alertmanager;
use nodekeeper_tests::{
    Agent, AgentConn, AgentSpec, EventCenter, LOGS_ONLY, cli, hello, json_lines, observation, sequences, stored_events,
    wait_for,
};
use tonic::Code;

const QUICK: &str = "[nodes]\ncheck_interval = \"50ms\"\n";

fn good(message: &str) -> Observation {
    Observation {
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: "Test".into(),
        message: message.into(),
        severity: Severity::Info as i32,
        ..Default::default()
    }
}

async fn messages(center: &EventCenter, node: &str, kind: &str) -> Vec<String> {
    stored_events(center.channel().await, node, kind).await.into_iter().map(|e| e.message).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_center_would_refuse_is_refused_at_emit_and_later_observations_arrive() {
    let center = EventCenter::start(QUICK).await;
    let agent = Agent::start(AgentSpec::new("node-p", &center.url())).await;
    agent.wait_connected().await;
    let cases: Vec<(&str, Observation)> = vec![
        ("message is 9000 bytes", Observation { message: "x".repeat(9000), ..good("") }),
        (
            "33 attributes",
            Observation { attributes: (0..33).map(|i| (format!("k{i}"), "v".into())).collect(), ..good("") },
        ),
        ("source is 129 bytes", Observation { source: "s".repeat(129), ..good("") }),
        (
            "condition type Other differs from the observation type Test",
            Observation {
                condition: Some(Condition {
                    r#type: "Other".into(),
                    status: ConditionStatus::True as i32,
                    ..Default::default()
                }),
                ..good("")
            },
        ),
    ];
    for (i, (why, bad)) in cases.into_iter().enumerate() {
        let err = agent.try_emit(vec![good("valid neighbour"), bad]).await.expect_err("refused at emit");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why) && err.message().contains("observation 1"), "{}", err.message());
        let marker = format!("good after {i}");
        agent.emit(vec![good(&marker)]).await;
        let sent = Instant::now();
        wait_for("the good observation", Duration::from_secs(2), || async {
            messages(&center, "node-p", "Test").await.contains(&marker).then_some(())
        })
        .await;
        assert!(sent.elapsed() < Duration::from_secs(2));
    }
    // Nothing of a refused call was stored, not even its valid neighbour.
    let stored = messages(&center, "node-p", "Test").await;
    assert_eq!(stored, vec!["good after 0", "good after 1", "good after 2", "good after 3"]);
    assert_eq!(agent.status().await.rejected_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_kilobyte_log_line_is_cut_to_the_limit_and_the_next_line_arrives() {
    let center = EventCenter::start(QUICK).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let rules = dir.path().join("app.toml");
    std::fs::write(
        &rules,
        format!(
            "source = \"app-monitor\"\n[log]\nkind = \"file\"\npath = \"{}\"\n[[rules]]\ntype = \"temporary\"\nreason = \"AppPanic\"\npattern = 'panic: .*'\n",
            log.display()
        ),
    )
    .unwrap();
    let monitors =
        format!("[monitors]\nkernel_rules = false\nrule_files = [\"{}\"]\n{}", rules.display(), &LOGS_ONLY[11..]);
    let agent = Agent::start(AgentSpec { monitors: &monitors, ..AgentSpec::new("node-l", &center.url()) }).await;
    agent.wait_connected().await;
    let long = format!("panic: {}\n", "x".repeat(10 * 1024));
    std::fs::write(&log, format!("{long}panic: short one\n")).unwrap();
    let written = Instant::now();
    let events = wait_for("both log lines", Duration::from_secs(2), || async {
        let e = stored_events(center.channel().await, "node-l", "AppPanic").await;
        (e.len() == 2).then_some(e)
    })
    .await;
    assert!(written.elapsed() < Duration::from_secs(2));
    assert!(events[0].message.len() <= nodekeeper_common::observation::MAX_TEXT_BYTES, "{}", events[0].message.len());
    assert!(events[0].message.starts_with("panic: xxx") && events[0].message.ends_with('…'));
    assert_eq!(events[0].attributes.get("truncated").map(String::as_str), Some("message"));
    assert_eq!(events[1].message, "panic: short one");
    assert!(!events[1].attributes.contains_key("truncated"));
    assert_eq!(agent.status().await.rejected_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stores_its_valid_observations_and_refuses_the_rest_one_by_one() {
    let center = EventCenter::start(QUICK).await;
    let url = center.url();
    let mut a = AgentConn::connect(&url, hello("c1", "n1", "b1")).await.unwrap();
    let too_long = Observation { message: "x".repeat(9000), ..observation(2) };
    let ack = a.send_acked(1, vec![observation(1), too_long, observation(3)]).await;
    assert_eq!((ack.stored, ack.duplicates, ack.last_sequence), (2, 0, 3));
    assert_eq!(ack.rejected.len(), 1);
    assert_eq!(ack.rejected[0].sequence, 2);
    assert!(ack.rejected[0].reason.contains("message is 9000 bytes"), "{:?}", ack.rejected);

    // The highest sequence a store holds is taken; beyond it, each is refused.
    let max = i64::MAX as u64;
    let ack = a.send_acked(2, vec![observation(max), observation(max + 2), observation(u64::MAX)]).await;
    assert_eq!(ack.stored, 1);
    let refused: Vec<u64> = ack.rejected.iter().map(|r| r.sequence).collect();
    assert_eq!(refused, vec![max + 2, u64::MAX]);
    assert!(ack.rejected.iter().all(|r| r.reason.contains("beyond the highest a store holds")), "{:?}", ack.rejected);
    // The stream is still open and takes more.
    assert_eq!(a.send_acked(3, vec![observation(max)]).await.duplicates, 1);
    drop(a);

    let again = AgentConn::connect(&url, hello("c1", "n1", "b1")).await.unwrap();
    assert_eq!(again.welcome.last_stored_sequence, max);
    assert_eq!(sequences(&stored_events(center.channel().await, "n1", "TestEvent").await), vec![1, 3, max]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enum_values_this_contract_does_not_define_are_stored_as_unspecified_with_the_number() {
    let center = EventCenter::start(QUICK).await;
    let url = center.url();
    let mut a = AgentConn::connect(&url, hello("c1", "n2", "b1")).await.unwrap();
    let newer = Observation { severity: 99, category: 99, action: 99, ..observation(1) };
    let opens = Observation {
        r#type: "NewerCondition".into(),
        severity: 99,
        condition: Some(Condition {
            r#type: "NewerCondition".into(),
            status: ConditionStatus::True as i32,
            ..Default::default()
        }),
        ..observation(2)
    };
    let ack = a.send_acked(1, vec![newer, opens]).await;
    assert_eq!((ack.stored, ack.rejected.len()), (2, 0));
    let e = &stored_events(center.channel().await, "n2", "TestEvent").await[0];
    assert_eq!((e.severity, e.category, e.action), (0, 0, 0));
    for field in ["severity", "category", "action"] {
        assert_eq!(e.attributes.get(&format!("unknown_{field}")).map(String::as_str), Some("99"), "{e:?}");
    }
    // The fault folds a severity it knows: an undefined number never ranks above CRITICAL.
    let faults = FleetServiceClient::new(center.channel().await)
        .list_faults(ListFaultsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .faults;
    let fault = faults.iter().find(|f| f.r#type == "NewerCondition").expect("the fault");
    assert_eq!(fault.severity, 0);
    // Every reader handles it: the CLI's table and JSON.
    let (code, out, err) = cli(&url, &["events", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let listed = &json_lines(&out)[0]["events"];
    let stored = listed.as_array().unwrap().iter().find(|e| e["node"] == "n2" && e["type"] == "TestEvent");
    let stored = stored.expect("listed");
    assert_eq!(stored["attributes"]["unknown_severity"], "99");
    let (code, out, err) = cli(&url, &["faults", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("NewerCondition"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_lost_its_state_continues_after_the_centers_sequence() {
    let mut center = EventCenter::start(QUICK).await;
    let mut agent = Agent::start(AgentSpec::new("node-s", &center.url())).await;
    agent.wait_connected().await;
    assert_eq!(agent.emit((1..=3).map(|i| good(&format!("before {i}"))).collect()).await, vec![1, 2, 3]);
    agent.wait_drained().await;

    // Lost while the center is up: the welcome says 3, the new outbox continues at 4.
    agent.terminate();
    std::fs::remove_dir_all(&agent.state_dir).unwrap();
    agent.spawn().await;
    agent.wait_connected().await;
    assert_eq!(agent.emit((1..=3).map(|i| good(&format!("after {i}"))).collect()).await, vec![4, 5, 6]);
    agent.wait_drained().await;

    // Lost again, and the new state emits before it reaches the center: renumbered on welcome.
    agent.terminate();
    std::fs::remove_dir_all(&agent.state_dir).unwrap();
    center.kill9();
    agent.spawn().await;
    assert_eq!(agent.emit((1..=2).map(|i| good(&format!("offline {i}"))).collect()).await, vec![1, 2]);
    center.spawn().await;
    agent.wait_connected().await;
    agent.wait_drained().await;

    let stored = messages(&center, "node-s", "Test").await;
    assert_eq!(
        stored,
        vec!["before 1", "before 2", "before 3", "after 1", "after 2", "after 3", "offline 1", "offline 2"]
    );
    let seqs = sequences(&stored_events(center.channel().await, "node-s", "Test").await);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

/// The `retry_in` of each "connection lost" line in an agent's log, in seconds.
fn retry_delays(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("connection to the event center lost"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("retry_in=")))
        .map(|d| match d.strip_suffix("ms") {
            Some(ms) => ms.parse::<f64>().unwrap() / 1000.0,
            None => d.trim_end_matches('s').parse::<f64>().unwrap(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_backoff_starts_over_after_a_healthy_session() {
    let mut center = EventCenter::start(QUICK).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let agent = Agent::start(AgentSpec { log: Some(&log), ..AgentSpec::new("node-b", &center.url()) }).await;
    let mut firsts = Vec::new();
    for _ in 0..6 {
        agent.wait_connected().await;
        // A healthy session: connected for a while (the scenario, not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let seen = std::fs::read_to_string(&log).unwrap().len();
        center.kill9();
        center.spawn().await;
        let first = wait_for("the agent's retry after the restart", Duration::from_secs(10), || async {
            retry_delays(&std::fs::read_to_string(&log).unwrap()[seen..]).first().copied()
        })
        .await;
        firsts.push(first);
    }
    // 1 s ± 20 %, every time; before the fix they grew: 0.8, 1.4, 2.7, 4.5, 6.7, 12.5 s.
    assert!(firsts.iter().all(|d| (0.8..=1.2).contains(d)), "first retries: {firsts:?}");
}

/// A small ext4 file system on a loop device, unmounted on drop.
struct SmallDisk {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        run("mkfs.ext4", &["-q", "-m", "0", image.to_str().unwrap()]);
        run("mount", &["-o", "loop", image.to_str().unwrap(), mount.to_str().unwrap()]);
        SmallDisk { mount, _dir: dir }
    }

    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mount).unwrap();
        s.blocks_available() * s.fragment_size()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        run("umount", &[self.mount.to_str().unwrap()]);
    }
}

/// Runs a setup command (mkfs, mount, fallocate) to completion.
#[allow(clippy::disallowed_methods)]
fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn writers_serving(center: &EventCenter) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let r = HealthClient::new(center.channel().await)
        .check(HealthCheckRequest { service: "nodekeeper.v1.AgentService".into() })
        .await
        .unwrap();
    r.into_inner().status == ServingStatus::Serving as i32
}

fn report(i: u64) -> Report {
    Report {
        report_id: format!("r{i}"),
        cluster: "c1".into(),
        node: "n9".into(),
        observation: Some(Observation { message: "z".repeat(4000), ..observation(0) }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_refused_early_alerted_and_recovered_with_nothing_lost() {
    const RESERVE: u64 = 24 << 20;
    let disk = SmallDisk::new(96);
    let am = Alertmanager::start().await;
    let mut center = EventCenter::new(&format!(
        "{QUICK}[store]\nmin_free_bytes = {RESERVE}\n[alertmanager]\nurl = \"{}\"\nresend_interval = \"500ms\"\n",
        am.url
    ));
    center.data_dir = disk.mount.join("data");
    center.spawn().await;
    // When room returns the center closes the stream so that the agent resends what it holds; the
    // agent's first reconnect waits up to 1.2 s (backoff with jitter), so the grace (three
    // heartbeats) must be longer than that on a loaded machine: 3 s, not the 1.5 s of 500 ms beats.
    let agent = Agent::start(AgentSpec { heartbeat: "1s", ..AgentSpec::new("node-d", &center.url()) }).await;
    agent.wait_connected().await;
    agent.emit((0..10).map(|i| good(&format!("before {i}"))).collect()).await;
    agent.wait_drained().await;

    // Leave 4 MiB above the reserve, then write reports until the center refuses them.
    let filler = disk.mount.join("filler");
    std::fs::File::create(&filler).unwrap().set_len(0).unwrap();
    run("fallocate", &["-l", &(disk.free() - RESERVE - (4 << 20)).to_string(), filler.to_str().unwrap()]);
    let mut reports = ReportServiceClient::new(center.channel().await);
    let mut i = 0;
    let refused = loop {
        let batch: Vec<Report> = (i..i + 20).map(report).collect();
        match reports.report(ReportRequest { producer: "filler".into(), reports: batch }).await {
            Ok(_) => i += 20,
            Err(status) => break status,
        }
        assert!(i < 100_000, "the reserve never refused");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("low on disk space"), "{}", refused.message());
    assert!(!refused.message().contains(disk.mount.to_str().unwrap()), "no server paths: {}", refused.message());
    assert!(disk.free() > RESERVE / 2, "refused early, with {} bytes still free", disk.free());
    assert!(!writers_serving(&center).await, "the writers' health says NOT_SERVING");
    let low = ["alertname=\"NodekeeperStoreDiskLow\""];
    let alert =
        wait_for("the disk alert", Duration::from_secs(20), || async { am.active(&low).await.into_iter().next() })
            .await;
    assert_eq!(alert["labels"]["severity"], "critical");

    // While low, the agent keeps what it is given and stays connected; nothing is lost.
    agent.emit((0..20).map(|i| good(&format!("during {i}"))).collect()).await;
    wait_for("the agent to hold its observations", Duration::from_secs(10), || async {
        let s = agent.status().await;
        (s.outbox_depth == 20 && s.connected).then_some(())
    })
    .await;

    std::fs::remove_file(&filler).unwrap();
    wait_for("the writers serving again", Duration::from_secs(10), || async {
        writers_serving(&center).await.then_some(())
    })
    .await;
    agent.wait_drained().await;
    let stored = messages(&center, "node-d", "Test").await;
    assert_eq!(stored.len(), 30, "{stored:?}");
    assert!(stored_events(center.channel().await, "node-d", "NodeHeartbeatLost").await.is_empty());
    wait_for("the disk alert resolved", Duration::from_secs(20), || async {
        am.active(&low).await.is_empty().then_some(())
    })
    .await;
    center.terminate();
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_of_an_idle_store_is_no_larger_than_its_database() {
    let center = EventCenter::start(QUICK).await;
    let (tx, mut rx) = AgentConn::connect(&center.url(), hello("c1", "w1", "b1")).await.unwrap().into_parts();
    let acks = tokio::spawn(async move {
        let mut n = 0;
        while let Ok(Some(_)) = rx.message().await {
            n += 1;
        }
        n
    });
    // A minute of 1,000 events a second: a batch of 100 every 100 ms.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut seq = 0;
    for batch_id in 1..=600u64 {
        tick.tick().await;
        let batch: Vec<Observation> = (0..100)
            .map(|_| {
                seq += 1;
                observation(seq)
            })
            .collect();
        let msg = nodekeeper_proto::v1::agent_message::Msg::Observations(nodekeeper_proto::v1::ObservationBatch {
            batch_id,
            observations: batch,
        });
        tx.send(nodekeeper_proto::v1::AgentMessage { msg: Some(msg) }).await.unwrap();
    }
    let db = center.data_dir.join("eventcenter.db");
    let wal = center.data_dir.join("eventcenter.db-wal");
    wait_for("every batch stored", Duration::from_secs(30), || async {
        (stored_events(center.channel().await, "w1", "TestEvent").await.len() == 60_000).then_some(())
    })
    .await;
    wait_for("the idle WAL within the database's size", Duration::from_secs(10), || async {
        (file_size(&wal) <= file_size(&db)).then_some(())
    })
    .await;
    drop(tx);
    assert!(acks.await.unwrap() >= 600);
}

//! System tests of the agent's health monitors with real processes: a problem written into a
//! fixture kernel log reaches the event center's faults; open conditions survive agent restarts
//! and clear on a reboot; a flood of log lines stays within the budget; the journal source with a
//! real journal file; `nodekeeper-agent rules test`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::ConditionStatus;
use nodekeeper_tests::{
    Agent, AgentSpec, EventCenter, FixtureHost, LOGS_ONLY, bin, cli, cpu_and_rss, http_get, json_lines, metric,
    stored_events, wait_for,
};

const QUICK: &str = "[nodes]\ncheck_interval = \"50ms\"\n";

const DEADLOCK: &str = "INFO: task dockerd:1234 blocked for more than 120 seconds.";
const OOM: &str =
    "Out of memory: Killed process 4242 (stress) total-vm:8404036kB, anon-rss:7953540kB, file-rss:4kB, shmem-rss:0kB";

async fn condition_events(center: &EventCenter, node: &str, kind: &str) -> Vec<(ConditionStatus, String)> {
    stored_events(center.channel().await, node, kind)
        .await
        .into_iter()
        .filter_map(|e| e.condition.map(|c| (c.status(), c.message)))
        .collect()
}

async fn faults(center: &EventCenter) -> Vec<serde_json::Value> {
    let (code, out, err) = cli(&center.url(), &["faults", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    json_lines(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_problem_reaches_the_faults_within_two_seconds_and_survives_restarts() {
    let center = EventCenter::start(QUICK).await;
    let mut host = FixtureHost::new();
    let paths = host.paths();
    let mut agent =
        Agent::start(AgentSpec { extra: &paths, monitors: LOGS_ONLY, ..AgentSpec::new("node-k", &center.url()) }).await;
    agent.wait_connected().await;

    host.log(&["EXT4-fs (sda1): mounted filesystem with ordered data mode. Opts: (null)", DEADLOCK]);
    let written = Instant::now();
    let fault = wait_for("the KernelDeadlock fault", Duration::from_secs(10), || async {
        faults(&center).await.into_iter().find(|f| f["type"] == "KernelDeadlock" && f["node"] == "node-k")
    })
    .await;
    let took = written.elapsed();
    assert!(took < Duration::from_secs(2), "the fault took {took:?} to appear");
    assert_eq!(fault["action"], "RECOMMENDED_ACTION_REBOOT");
    let events = condition_events(&center, "node-k", "KernelDeadlock").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, ConditionStatus::True);
    assert!(events[0].1.contains("dockerd:1234"), "{:?}", events[0]);

    // kill -9 and start again: the condition stays open and is not reported again, although the
    // kernel log still holds the line within the lookback window.
    agent.kill9();
    agent.spawn().await;
    host.log(&[OOM]);
    wait_for("the OOM event after the restart", Duration::from_secs(10), || async {
        (!stored_events(center.channel().await, "node-k", "OOMKilling").await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(condition_events(&center, "node-k", "KernelDeadlock").await.len(), 1, "not reported again, not cleared");
    assert_eq!(
        stored_events(center.channel().await, "node-k", "OOMKilling").await.len(),
        1,
        "lines before the restart are not reported again"
    );
    assert!(faults(&center).await.iter().any(|f| f["type"] == "KernelDeadlock" && f["state"] == "FAULT_STATE_OPEN"));

    // A reboot (a new boot id) clears the kernel condition: it belonged to the previous boot.
    agent.kill9();
    host.boot("0f2b6a3c-1d4e-4f50-8a9b-000000000002");
    agent.spawn().await;
    let events = wait_for("the condition to clear after the reboot", Duration::from_secs(10), || async {
        let e = condition_events(&center, "node-k", "KernelDeadlock").await;
        (e.len() == 2).then_some(e)
    })
    .await;
    assert_eq!(events[1].0, ConditionStatus::False);
    assert!(events[1].1.contains("booted again"), "{:?}", events[1]);
    assert_eq!(
        stored_events(center.channel().await, "node-k", "OOMKilling").await.len(),
        1,
        "the old boot's lines are outside the lookback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)] // the measured figures, shown with --nocapture
async fn a_flood_of_a_million_lines_stays_within_the_budget_and_recovers() {
    let center = EventCenter::start(QUICK).await;
    let mut host = FixtureHost::new();
    let paths = host.paths();
    let monitors =
        format!("[monitors]\nlines_per_second = 500.0\nburst = 1000.0\n{}", &LOGS_ONLY["[monitors]\n".len()..]);
    let agent =
        Agent::start(AgentSpec { extra: &paths, monitors: &monitors, ..AgentSpec::new("node-f", &center.url()) }).await;
    agent.wait_connected().await;
    let pid = agent.pid().unwrap();
    let (cpu0, rss0) = cpu_and_rss(pid);

    // 1,000,000 matching lines in one burst.
    const N: u64 = 1_000_000;
    let start = Instant::now();
    {
        let mut f = std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(host.kmsg()).unwrap());
        for i in 1..=N {
            writeln!(f, "3,{i},{},-;{OOM}", 1_000_000 + i).unwrap();
        }
        f.flush().unwrap();
        host.seq = N;
    }
    let metrics_url = format!("{}/metrics", agent.status_url());
    wait_for("every line to be read", Duration::from_secs(120), || async {
        let m = http_get(&metrics_url).await;
        (metric(&m, "nodekeeper_agent_log_lines_total").unwrap_or(0.0) >= N as f64).then_some(())
    })
    .await;
    let read_in = start.elapsed();
    let (cpu1, rss1) = cpu_and_rss(pid);
    let m = http_get(&metrics_url).await;
    let dropped = metric(&m, "nodekeeper_agent_log_lines_dropped_total").unwrap();
    let matched = N as f64 - dropped;
    eprintln!(
        "flood: {N} lines read in {read_in:?}; {matched} matched, {dropped} dropped; agent CPU {:.2}s; RSS {} → {} KiB",
        cpu1 - cpu0,
        rss0 / 1024,
        rss1 / 1024
    );
    // The budget: at most the burst plus the rate over the time it took.
    assert!(matched <= 1000.0 + 500.0 * read_in.as_secs_f64() + 1.0, "{matched} lines matched in {read_in:?}");
    // Reading a line is cheap; matching and reporting a million would take minutes.
    assert!(cpu1 - cpu0 < 20.0, "the flood cost {:.1}s of CPU", cpu1 - cpu0);
    assert!(rss1 < rss0 + 4 * 1024 * 1024, "memory grew with the flood: {rss0} → {rss1} bytes");

    // The flood is reported, and its end.
    let flood = wait_for("the LogFlood event", Duration::from_secs(30), || async {
        stored_events(center.channel().await, "node-f", "LogFlood").await.pop()
    })
    .await;
    assert!(flood.message.contains("500 lines/s"), "{}", flood.message);
    let ended = wait_for("the LogFloodEnded event", Duration::from_secs(30), || async {
        stored_events(center.channel().await, "node-f", "LogFloodEnded").await.pop()
    })
    .await;
    assert_eq!(ended.attributes["dropped"], (dropped as u64).to_string());

    // Recovered: the next problem is matched and reported.
    host.log(&["EXT4-fs (sda1): Remounting filesystem read-only"]);
    wait_for("the condition after the flood", Duration::from_secs(10), || async {
        (!condition_events(&center, "node-f", "ReadonlyFilesystem").await.is_empty()).then_some(())
    })
    .await;
    let oom = stored_events(center.channel().await, "node-f", "OOMKilling").await.len() as f64;
    assert!(oom <= matched && oom >= 1000.0, "{oom} OOM events stored for {matched} matched lines");
}

/// systemd-journal-remote writes real journal files from the journal export format.
fn journal_remote() -> PathBuf {
    ["/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-remote"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("systemd-journal-remote (scripts/install-test-deps.sh installs it)")
}

fn journal_append(file: &Path, identifier: &str, message: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let entry = format!(
        "__REALTIME_TIMESTAMP={now}\n__MONOTONIC_TIMESTAMP={now}\n_BOOT_ID=0f2b6a3c1d4e4f508a9b000000000001\nSYSLOG_IDENTIFIER={identifier}\nMESSAGE={message}\n\n"
    );
    let mut child = std::process::Command::new(journal_remote())
        .arg(format!("--output={}", file.display()))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(entry.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_source_follows_a_real_journal() {
    let center = EventCenter::start(QUICK).await;
    let host = FixtureHost::new();
    let journal = host.dir.path().join("remote.journal");
    journal_append(&journal, "systemd", "Started Session 1 of user root.");
    let rules = host.dir.path().join("docker.toml");
    std::fs::write(
        &rules,
        format!(
            r#"source = "docker-monitor"
[log]
kind = "journal"
path = "{}"
identifiers = ["dockerd"]
[[conditions]]
type = "CorruptDockerOverlay2"
reason = "NoCorruptDockerOverlay2"
message = "docker overlay2 is functioning properly"
[[rules]]
type = "permanent"
condition = "CorruptDockerOverlay2"
reason = "CorruptDockerOverlay2"
pattern = 'returned error: readlink /var/lib/docker/overlay2.*: invalid argument.*'
"#,
            journal.display()
        ),
    )
    .unwrap();
    let paths = host.paths();
    let monitors = format!(
        "[monitors]\nkernel_rules = false\nrule_files = [\"{}\"]\n{}",
        rules.display(),
        &LOGS_ONLY["[monitors]\n".len()..]
    );
    let agent =
        Agent::start(AgentSpec { extra: &paths, monitors: &monitors, ..AgentSpec::new("node-j", &center.url()) }).await;
    agent.wait_connected().await;
    // Another identifier with the same text is not this monitor's.
    journal_append(
        &journal,
        "containerd",
        "Handler for POST /containers/a/start returned error: readlink /var/lib/docker/overlay2/l: invalid argument",
    );
    journal_append(
        &journal,
        "dockerd",
        "Handler for POST /containers/b/start returned error: readlink /var/lib/docker/overlay2/l: invalid argument",
    );
    let events = wait_for("the journal condition", Duration::from_secs(10), || async {
        let e = condition_events(&center, "node-j", "CorruptDockerOverlay2").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(events.len(), 1);
    assert!(events[0].1.contains("containers/b/"), "{:?}", events[0]);
}

#[tokio::test]
async fn rules_test_replays_a_log_and_rejects_bad_rules() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("kmsg.log");
    std::fs::write(
        &log,
        format!("6,1,100,-;Linux version 6.1.0\n SUBSYSTEM=cpu\n3,2,200,-;{DEADLOCK}\n3,3,300,-;{OOM}\n3,4,400,-;{DEADLOCK}\n"),
    )
    .unwrap();
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(bin("nodekeeper-agent")).args(&args).output().await.unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) =
        run(vec!["rules".into(), "test".into(), "--log".into(), log.display().to_string(), "-o".into(), "json".into()])
            .await;
    assert_eq!(code, 0, "{err}");
    let found = json_lines(&out);
    let summary: Vec<(u64, &str, &str, Option<&str>)> = found
        .iter()
        .map(|f| {
            (
                f["line"].as_u64().unwrap(),
                f["type"].as_str().unwrap(),
                f["reason"].as_str().unwrap(),
                f["condition"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (3, "temporary", "TaskHung", None),
            (3, "permanent", "ContainerRuntimeHung", Some("KernelDeadlock")),
            (4, "temporary", "OOMKilling", None),
            // The condition is already open: only the temporary event again.
            (5, "temporary", "TaskHung", None),
        ]
    );
    assert_eq!(found[1]["message"], DEADLOCK);
    assert_eq!(found[1]["status"], "true");

    // node-problem-detector's file, unmodified, on a plain log.
    let npd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/npd/kernel-monitor.json");
    let plain = dir.path().join("plain.log");
    std::fs::write(&plain, "divide error: 0000 [#1] SMP\n").unwrap();
    let (code, out, _) = run(vec![
        "rules".into(),
        "test".into(),
        "--rules".into(),
        npd.display().to_string(),
        "--log".into(),
        plain.display().to_string(),
        "--format".into(),
        "plain".into(),
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "line 1: KernelOops (temporary): divide error: 0000 [#1] SMP");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, std::fs::read_to_string(&npd).unwrap().replace("\"temporary\"", "\"transient\"")).unwrap();
    let (code, _, err) = run(vec![
        "rules".into(),
        "test".into(),
        "--rules".into(),
        bad.display().to_string(),
        "--log".into(),
        log.display().to_string(),
    ])
    .await;
    assert_eq!(code, 78);
    assert!(
        err.contains("bad.json") && err.contains("rule 1 (OOMKilling)") && err.contains("unknown type \"transient\""),
        "{err}"
    );
}

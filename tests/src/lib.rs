//! Harness for system tests: start the real binaries as separate processes, talk to them with
//! real gRPC clients, wait for conditions with deadlines (never fixed sleeps).
//!
//! The binaries are taken from the same target directory as the test binary; the README's test
//! command builds them first (`cargo build --workspace --bins`).

pub mod alertmanager;
pub mod browser;
pub mod kubeapi;
pub mod netns;
pub mod ontap;
pub mod pki;
pub mod postgres;
pub mod rpmnode;
pub mod simnode;
pub mod storage;

mod agent;
mod center;
mod rpmrepo;

pub use agent::{Agent, AgentConn, AgentSpec, FixtureHost, LOGS_ONLY, condition_report, hello, observation};
pub use center::{EventCenter, Remediator, health_ok, health_ok_on};
pub use rpmrepo::{RpmRepo, SCRIPTLETS, rpm_installed, rpm_repo};

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use tonic::transport::Channel;

/// Path of a workspace binary next to the running test binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// A port that was free a moment ago on 127.0.0.1, taken below the kernel's ephemeral range:
/// a port the kernel hands out for `bind(0)` can be taken by any outgoing connection (an agent's,
/// a client's) before the process it was meant for binds it, which once left a test's
/// Alertmanager unable to listen. Ports are handed out in turn within this process, from an
/// offset that differs between test processes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        let span = ephemeral_low - LOW;
        let start = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local addr").port()
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Sends a signal with kill(1); the tests crate stays free of unsafe code.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// A child process killed when dropped, so that a failed test or benchmark leaves nothing running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mutual-TLS channel to `url` presenting `files`' certificate.
pub async fn tls_channel(url: &str, files: &nodekeeper_common::tls::TlsFiles) -> Result<Channel, String> {
    nodekeeper_common::tls::endpoint(url, Some(files))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Runs the CLI with `args` against `server`; returns (exit code, stdout, stderr).
pub async fn cli(server: &str, args: &[&str]) -> (i32, String, String) {
    cli_in(None, server, args).await
}

/// Like [`cli`], with HOME set (where the CLI looks for its default credentials).
pub async fn cli_in(home: Option<&Path>, server: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(bin("nodekeeper"));
    cmd.arg("--server").arg(server).args(args).env("RUST_LOG", "warn");
    if let Some(h) = home {
        cmd.env("HOME", h);
    }
    let out = cmd.output().await.expect("run nodekeeper");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Parses one JSON object per line.
pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// Every stored event of `node` with type `kind`, paging through the log.
pub async fn stored_events(ch: Channel, node: &str, kind: &str) -> Vec<nodekeeper_proto::v1::Event> {
    let filter =
        nodekeeper_proto::v1::EventFilter { nodes: vec![node.into()], types: vec![kind.into()], ..Default::default() };
    events_where(ch, filter).await
}

/// Every stored event that `filter` lets through, oldest first, read page by page.
pub async fn events_where(ch: Channel, filter: nodekeeper_proto::v1::EventFilter) -> Vec<nodekeeper_proto::v1::Event> {
    use nodekeeper_proto::v1::{ListEventsRequest, event_service_client::EventServiceClient};
    let mut client = EventServiceClient::new(ch);
    let mut after = String::new();
    let mut out = Vec::new();
    loop {
        let r = client
            .list_events(ListEventsRequest {
                after_cursor: after,
                filter: Some(filter.clone()),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .expect("list events")
            .into_inner();
        out.extend(r.events);
        if r.next_cursor == r.head_cursor {
            return out;
        }
        after = r.next_cursor;
    }
}

/// The agent sequence numbers of `events`, in order.
pub fn sequences(events: &[nodekeeper_proto::v1::Event]) -> Vec<u64> {
    events.iter().map(|e| e.origin.as_ref().expect("origin").sequence).collect()
}

/// The body of an HTTP GET on loopback (the agent's /metrics).
pub async fn http_get(url: &str) -> String {
    try_http_get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The body of an HTTP GET on loopback, or why there is none (e.g. not listening yet).
pub async fn try_http_get(url: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let mut s = tokio::net::TcpStream::connect(authority).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// A metric from a Prometheus text exposition: the sum of its samples (every label set).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    metric_where(text, name, "")
}

/// The sum of a metric's samples whose labels contain `labels` (e.g. `outcome="healthy"`; ""
/// for every sample); None when it has none.
pub fn metric_where(text: &str, name: &str, labels: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((set, v)) => (set, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if let (true, Ok(v)) = (set.contains(labels), value.trim().parse::<f64>()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// CPU seconds (user + system) and resident bytes of a process, from /proc.
pub fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    (ticks / 100.0, rss_kib * 1024)
}

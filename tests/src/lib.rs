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
pub mod postgres;
pub mod rpmnode;
pub mod simnode;
pub mod storage;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nodekeeper_proto::v1::{
    Ack, AgentMessage, AgentStatus, CenterMessage, EmitRequest, GetAgentStatusRequest, Hello, Observation,
    ObservationBatch, Welcome, agent_message, agent_service_client::AgentServiceClient, center_message,
    local_agent_service_client::LocalAgentServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
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

/// A running nodekeeper-eventcenter process with its own data directory and port.
pub struct EventCenter {
    pub addr: SocketAddr,
    /// Where it listens (default: `addr`; `listen_everywhere` for test hosts in namespaces).
    listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Set for a mutual-TLS center: the credentials the harness uses to check it is serving.
    pub client_tls: Option<nodekeeper_common::tls::TlsFiles>,
    config: Option<PathBuf>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl EventCenter {
    /// Starts a center on a fresh data directory; `config_toml` is written to a config file.
    pub async fn start(config_toml: &str) -> EventCenter {
        let mut c = EventCenter::new(config_toml);
        c.spawn().await;
        c
    }

    /// A center with its directory, config and port chosen, not started yet.
    pub fn new(config_toml: &str) -> EventCenter {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let config = tmp.path().join("eventcenter.toml");
        // NODEKEEPER_TEST_STORE=postgres: the same test against the PostgreSQL store.
        let config_toml = match postgres::shared_database() {
            Some(url) => {
                let mut table: toml::Table = config_toml.parse().expect("the test's center config");
                let store = table.entry("store").or_insert_with(|| toml::Value::Table(Default::default()));
                store.as_table_mut().expect("[store]").insert("postgres_url".into(), toml::Value::String(url));
                table.to_string()
            }
            None => config_toml.to_owned(),
        };
        std::fs::write(&config, config_toml).expect("write config");
        EventCenter {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            listen: None,
            data_dir,
            client_tls: None,
            config: Some(config),
            child: None,
            _tmp: Some(tmp),
        }
    }

    /// A mutual-TLS center; `config_toml` holds its [tls] section, `admin` the harness's
    /// credentials.
    pub async fn start_tls(config_toml: &str, admin: nodekeeper_common::tls::TlsFiles) -> EventCenter {
        let mut c = EventCenter::new(config_toml);
        c.client_tls = Some(admin);
        c.spawn().await;
        c
    }

    /// Listens on every address (same port), so that hosts in network namespaces reach it.
    pub fn listen_everywhere(&mut self) {
        self.listen = Some(SocketAddr::from(([0, 0, 0, 0], self.addr.port())));
    }

    pub fn url(&self) -> String {
        let scheme = if self.client_tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Starts the process (again) on the same directory and port, and waits until it serves.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(bin("nodekeeper-eventcenter"));
        cmd.arg("--listen").arg(self.listen.unwrap_or(self.addr).to_string()).arg("--data-dir").arg(&self.data_dir);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
            if !std::fs::read_to_string(c).unwrap_or_default().contains("[tls]") {
                cmd.arg("--insecure");
            }
        }
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        self.child = Some(cmd.spawn().expect("spawn nodekeeper-eventcenter"));
        let url = self.url();
        let tls = self.client_tls.clone();
        wait_for("the event center to serve", Duration::from_secs(20), || {
            let (url, tls) = (url.clone(), tls.clone());
            async move {
                match tls {
                    None => health_ok(&url).await.then_some(()),
                    Some(files) => {
                        let ch = tls_channel(&url, &files).await.ok()?;
                        health_ok_on(ch).await.then_some(())
                    }
                }
            }
        })
        .await;
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9 the event center");
            child.wait().expect("reap the event center");
        }
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        child.wait().expect("wait for the event center")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().expect("try_wait").is_none())
    }

    pub async fn channel(&self) -> Channel {
        match &self.client_tls {
            Some(files) => tls_channel(&self.url(), files).await.expect("connect to the event center"),
            None => {
                Channel::from_shared(self.url()).expect("url").connect().await.expect("connect to the event center")
            }
        }
    }
}

impl Drop for EventCenter {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a signal with kill(1); the tests crate stays free of unsafe code.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// The gRPC health check (grpc.health.v1) answers SERVING.
pub async fn health_ok(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_owned()) else { return false };
    let Ok(channel) = endpoint.connect_timeout(Duration::from_millis(500)).connect().await else { return false };
    health_ok_on(channel).await
}

pub async fn health_ok_on(channel: Channel) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    match HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await {
        Ok(r) => r.into_inner().status == ServingStatus::Serving as i32,
        Err(_) => false,
    }
}

/// A test agent: one Session stream, driven by hand.
pub struct AgentConn {
    pub welcome: Welcome,
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<CenterMessage>,
}

pub fn hello(cluster: &str, node: &str, boot_id: &str) -> Hello {
    Hello {
        node: node.into(),
        cluster: cluster.into(),
        boot_id: boot_id.into(),
        agent_version: "test".into(),
        ..Default::default()
    }
}

/// An agent config's `[monitors]` with only the log monitors (the hardware and component checks
/// would read this machine).
pub const LOGS_ONLY: &str =
    "[monitors]\n[monitors.hardware]\nenabled = false\n[monitors.components]\nenabled = false\n";

/// A fixture host for an agent: a /proc with a boot id, and a kernel log file in /dev/kmsg's
/// format.
pub struct FixtureHost {
    pub dir: tempfile::TempDir,
    /// The last kernel log sequence written.
    pub seq: u64,
}

impl Default for FixtureHost {
    fn default() -> Self {
        Self::new()
    }
}

impl FixtureHost {
    pub fn new() -> FixtureHost {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc/sys/kernel/random")).expect("fixture /proc");
        let h = FixtureHost { dir, seq: 0 };
        h.boot("0f2b6a3c-1d4e-4f50-8a9b-000000000001");
        std::fs::write(h.kmsg(), "").expect("fixture kmsg");
        h
    }

    fn boot_id_path(&self) -> PathBuf {
        self.dir.path().join("proc/sys/kernel/random/boot_id")
    }

    /// Starts boot `id` (as the kernel would write it).
    pub fn boot(&self, id: &str) {
        std::fs::write(self.boot_id_path(), format!("{id}\n")).expect("write boot id");
    }

    pub fn boot_id(&self) -> String {
        std::fs::read_to_string(self.boot_id_path()).expect("read boot id").trim().to_owned()
    }

    pub fn kmsg(&self) -> PathBuf {
        self.dir.path().join("kmsg")
    }

    /// The agent config's [paths] for this host.
    pub fn paths(&self) -> String {
        format!(
            "[paths]\nproc = \"{}\"\nkmsg = \"{}\"\n",
            self.dir.path().join("proc").display(),
            self.kmsg().display()
        )
    }

    /// Appends kernel log records (priority 3, increasing sequence numbers).
    pub fn log(&mut self, messages: &[&str]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(self.kmsg()).expect("open kmsg");
        let mut text = String::new();
        for m in messages {
            self.seq += 1;
            text.push_str(&format!("3,{},{},-;{m}\n", self.seq, 1_000_000 + self.seq));
        }
        f.write_all(text.as_bytes()).expect("append to kmsg");
    }

    /// A script that starts boot `id` of this host (a new boot id, an empty kernel log), for an
    /// agent's harmless `reboot_command`.
    pub fn reboot_script(&self, id: &str) -> PathBuf {
        let script = self.dir.path().join("reboot.sh");
        let text =
            format!("#!/bin/sh\nprintf '{id}\\n' > {}\n: > {}\n", self.boot_id_path().display(), self.kmsg().display());
        std::fs::write(&script, text).expect("write the reboot script");
        script
    }
}

/// A child process killed when dropped, so that a failed test or benchmark leaves nothing running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running nodekeeper-remediator for cluster c1, named `remediator-c1`, talking plaintext to
/// `center` and to the Kubernetes API server of `kubeconfig`; killed when dropped.
pub struct Remediator {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Remediator {
    /// Starts one with `extra` TOML after the common settings.
    pub fn start(center: &str, kubeconfig: &Path, extra: &str) -> Remediator {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("remediator.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"remediator-c1\"\ncluster = \"c1\"\ncenter = \"{center}\"\ninsecure = true\nkubeconfig = \"{}\"\n{extra}",
                kubeconfig.display()
            ),
        )
        .expect("write config");
        let child = Command::new(bin("nodekeeper-remediator"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nodekeeper-remediator");
        Remediator { child, _dir: dir }
    }
}

impl Remediator {
    /// SIGKILL: a replica dying without giving anything up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Remediator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A producer's report that condition `kind` holds (or cleared) on `node` of `cluster`, with the
/// recommended `action`.
pub fn condition_report(
    id: &str,
    cluster: &str,
    node: &str,
    kind: &str,
    holds: bool,
    action: nodekeeper_proto::v1::RecommendedAction,
) -> nodekeeper_proto::v1::Report {
    use nodekeeper_proto::v1::{Condition, ConditionStatus, Report};
    let status = if holds { ConditionStatus::True } else { ConditionStatus::False };
    Report {
        report_id: id.into(),
        cluster: cluster.into(),
        node: node.into(),
        observation: Some(Observation {
            r#type: kind.into(),
            message: format!("{kind} on {node}"),
            action: action as i32,
            condition: Some(Condition { r#type: kind.into(), status: status as i32, ..Default::default() }),
            ..Default::default()
        }),
    }
}

/// A test observation with sequence `seq` and a 256-byte-ish message.
pub fn observation(seq: u64) -> Observation {
    Observation {
        sequence: seq,
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: "TestEvent".into(),
        message: format!("test observation {seq}"),
        severity: nodekeeper_proto::v1::Severity::Info as i32,
        ..Default::default()
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

impl AgentConn {
    pub async fn connect(url: &str, hello: Hello) -> Result<AgentConn, tonic::Status> {
        let channel = Channel::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Self::connect_channel(channel, hello).await
    }

    pub async fn connect_channel(channel: Channel, hello: Hello) -> Result<AgentConn, tonic::Status> {
        let (tx, rx) = mpsc::channel(256);
        tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("queue hello");
        let mut rx = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match rx.message().await?.and_then(|m| m.msg) {
            Some(center_message::Msg::Welcome(w)) => w,
            other => panic!("expected a welcome, got {other:?}"),
        };
        Ok(AgentConn { welcome, tx, rx })
    }

    pub async fn send(&self, msg: agent_message::Msg) {
        self.tx.send(AgentMessage { msg: Some(msg) }).await.expect("stream open");
    }

    pub async fn send_batch(&self, batch_id: u64, observations: Vec<Observation>) {
        self.send(agent_message::Msg::Observations(ObservationBatch { batch_id, observations })).await;
    }

    /// The next acknowledgement; an error status if the stream ended with one.
    pub async fn next_ack(&mut self) -> Result<Ack, tonic::Status> {
        loop {
            match self.rx.message().await? {
                Some(CenterMessage { msg: Some(center_message::Msg::Ack(a)) }) => return Ok(a),
                Some(_) => continue,
                None => return Err(tonic::Status::aborted("stream ended")),
            }
        }
    }

    /// The next command the center sends this node.
    pub async fn next_command(&mut self) -> Result<nodekeeper_proto::v1::Command, tonic::Status> {
        loop {
            match self.rx.message().await? {
                Some(CenterMessage { msg: Some(center_message::Msg::Command(c)) }) => return Ok(c),
                Some(_) => continue,
                None => return Err(tonic::Status::aborted("stream ended")),
            }
        }
    }

    /// The next desired state the center sends this node.
    pub async fn next_desired(&mut self) -> Result<nodekeeper_proto::v1::DesiredState, tonic::Status> {
        loop {
            match self.rx.message().await? {
                Some(CenterMessage { msg: Some(center_message::Msg::DesiredState(d)) }) => return Ok(d),
                Some(_) => continue,
                None => return Err(tonic::Status::aborted("stream ended")),
            }
        }
    }

    /// Sends a batch and waits for its acknowledgement.
    pub async fn send_acked(&mut self, batch_id: u64, observations: Vec<Observation>) -> Ack {
        self.send_batch(batch_id, observations).await;
        let ack = self.next_ack().await.expect("ack");
        assert_eq!(ack.batch_id, batch_id);
        ack
    }

    /// The sending and receiving halves, for callers that pipeline batches.
    pub fn into_parts(self) -> (mpsc::Sender<AgentMessage>, Streaming<CenterMessage>) {
        (self.tx, self.rx)
    }

    /// The status the stream ends with.
    pub async fn closed_status(&mut self) -> tonic::Status {
        loop {
            match self.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok("closed"),
                Err(s) => return s,
            }
        }
    }
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

/// A running nodekeeper-agent process with its own state directory and status port.
pub struct Agent {
    pub node: String,
    pub status_port: u16,
    /// Network namespace and status address, for an agent on a test host.
    netns: Option<(String, std::net::IpAddr)>,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    env: Vec<(String, String)>,
    log: Option<PathBuf>,
    cwd: Option<PathBuf>,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

/// Settings of a test agent.
pub struct AgentSpec<'a> {
    pub node: &'a str,
    pub center: &'a str,
    pub heartbeat: &'a str,
    /// Extra TOML appended to the config.
    pub extra: &'a str,
    /// The `[monitors]` tables, last in the config. Default: monitors off, so that tests of the
    /// core see only what they send (not this machine's kernel log, clock and disks).
    pub monitors: &'a str,
    /// Run in this network namespace, with the status listener on this address.
    pub netns: Option<(&'a str, std::net::IpAddr)>,
    /// Append the agent's log (stderr) to this file instead of the test's stderr.
    pub log: Option<&'a Path>,
    /// The agent's working directory (its hooks' and health checks' too): a node's installroot
    /// makes a relative path in a shared spec name each node's own file, as `/` would on a node.
    pub cwd: Option<&'a Path>,
}

impl<'a> AgentSpec<'a> {
    pub fn new(node: &'a str, center: &'a str) -> Self {
        AgentSpec {
            node,
            center,
            heartbeat: "500ms",
            extra: "",
            monitors: "[monitors]\nenabled = false\n",
            netns: None,
            log: None,
            cwd: None,
        }
    }
}

impl Agent {
    pub fn config_for(spec: &AgentSpec<'_>, state_dir: &Path, status_port: u16) -> String {
        format!(
            "node_name = \"{}\"\ncluster = \"c1\"\nstate_dir = \"{}\"\ncenter = \"{}\"\nheartbeat_interval = \"{}\"\ninsecure = true\n{}\n[status]\nport = {status_port}\nlisten = [\"{}\"]\n\n{}",
            spec.node,
            state_dir.display(),
            spec.center,
            spec.heartbeat,
            spec.extra,
            spec.netns.map_or_else(|| "127.0.0.1".to_owned(), |(_, ip)| ip.to_string()),
            spec.monitors,
        )
    }

    /// Writes the config and starts the agent; waits until its status listener answers.
    pub async fn start(spec: AgentSpec<'_>) -> Agent {
        Self::start_with_env(spec, Vec::new()).await
    }

    pub async fn start_with_env(spec: AgentSpec<'_>, env: Vec<(String, String)>) -> Agent {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state_dir = tmp.path().join("state");
        let status_port = free_port();
        let config_path = tmp.path().join("agent.toml");
        std::fs::write(&config_path, Self::config_for(&spec, &state_dir, status_port)).expect("write config");
        let netns = spec.netns.map(|(ns, ip)| (ns.to_owned(), ip));
        let mut a = Agent {
            node: spec.node.to_owned(),
            status_port,
            netns,
            config_path,
            state_dir,
            env,
            log: spec.log.map(Path::to_owned),
            cwd: spec.cwd.map(Path::to_owned),
            child: None,
            _tmp: tmp,
        };
        a.spawn().await;
        a
    }

    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = match &self.netns {
            Some((ns, _)) => netns::Net::command(ns, &bin("nodekeeper-agent")),
            None => Command::new(bin("nodekeeper-agent")),
        };
        cmd.arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let Some(log) = &self.log {
            let file = std::fs::File::options().create(true).append(true).open(log).expect("open the agent's log");
            cmd.stderr(file);
        }
        self.child = Some(cmd.spawn().expect("spawn nodekeeper-agent"));
        let url = self.status_url();
        wait_for("the agent's status listener", Duration::from_secs(20), || {
            let url = url.clone();
            async move { health_ok(&url).await.then_some(()) }
        })
        .await;
    }

    pub fn status_url(&self) -> String {
        match &self.netns {
            Some((_, ip)) => format!("http://{ip}:{}", self.status_port),
            None => format!("http://127.0.0.1:{}", self.status_port),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9 the agent");
            child.wait().expect("reap the agent");
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        child.wait().expect("wait for the agent")
    }

    async fn local(&self) -> LocalAgentServiceClient<Channel> {
        LocalAgentServiceClient::connect(self.status_url()).await.expect("connect to the local agent")
    }

    /// Hands observations to the agent; returns the sequences it assigned.
    pub async fn emit(&self, observations: Vec<Observation>) -> Vec<u64> {
        self.try_emit(observations).await.expect("emit")
    }

    /// Like `emit`, returning the agent's refusal.
    pub async fn try_emit(&self, observations: Vec<Observation>) -> Result<Vec<u64>, tonic::Status> {
        Ok(self.local().await.emit(EmitRequest { observations }).await?.into_inner().sequences)
    }

    /// Waits until the agent's stream to the center is open.
    pub async fn wait_connected(&self) {
        wait_for("the agent to connect", Duration::from_secs(20), || async {
            self.status().await.connected.then_some(())
        })
        .await;
    }

    /// Waits until the agent's outbox is empty: everything it holds was acknowledged.
    pub async fn wait_drained(&self) {
        wait_for("the agent's outbox to drain", Duration::from_secs(60), || async {
            (self.status().await.outbox_depth == 0).then_some(())
        })
        .await;
    }

    pub async fn status(&self) -> AgentStatus {
        self.local().await.get_status(GetAgentStatusRequest {}).await.expect("agent status").into_inner()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
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

/// Real RPMs built once per test binary with rpmbuild and published with createrepo_c:
/// `nk-demo` 1.0-1, 1.1-1 (healthy) and 1.2-1 (its HEALTH file says "broken"), each with a
/// `%config(noreplace)` file /etc/nk-demo/demo.conf and a unit file; `nk-conflict` 1.0-1, which
/// requires a package no repository has; nk-kube and nk-kubeadm 1.0-1 and 2.0-1 with nk-ctr 1.5-1
/// and 1.6-1 (one component); nk-slow (scriptlets that can be held); nk-needs-dep, which needs
/// nk-dep of the second repository.
/// The scriptlets of the test package nk-slow that a test can hold (see [`rpm_repo`]).
pub const SCRIPTLETS: [&str; 4] = ["pre", "post", "posttrans", "preun"];

pub struct RpmRepo {
    pub dir: PathBuf,
}

impl RpmRepo {
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.join("repo").display())
    }

    /// A second repository, with nk-dep only (what nk-needs-dep requires).
    pub fn deps_url(&self) -> String {
        format!("file://{}", self.dir.join("deps").display())
    }
}

pub fn rpm_repo() -> &'static RpmRepo {
    static REPO: std::sync::OnceLock<RpmRepo> = std::sync::OnceLock::new();
    REPO.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("nk-rpms-").tempdir().expect("tempdir").keep();
        let top = dir.join("top");
        std::fs::create_dir_all(top.join("SPECS")).unwrap();
        let build = |name: &str, spec: String| {
            let path = top.join("SPECS").join(format!("{name}.spec"));
            std::fs::write(&path, spec).unwrap();
            let ok = std::process::Command::new("rpmbuild")
                .args(["--quiet", "--define", &format!("_topdir {}", top.display()), "-bb"])
                .arg(&path)
                .stdout(Stdio::null())
                .status()
                .expect("rpmbuild (scripts/install-test-deps.sh installs it)")
                .success();
            assert!(ok, "rpmbuild {name}");
        };
        for (v, health) in [("1.0", "ok"), ("1.1", "ok"), ("1.2", "broken")] {
            build(
                &format!("nk-demo-{v}"),
                format!(
                    "Name: nk-demo\nVersion: {v}\nRelease: 1\nSummary: nodekeeper test component\nLicense: MIT\nBuildArch: noarch\n\
                     %description\nA test component.\n\
                     %install\nmkdir -p %{{buildroot}}/usr/lib/nk-demo %{{buildroot}}/etc/nk-demo %{{buildroot}}/usr/lib/systemd/system\n\
                     echo {v} > %{{buildroot}}/usr/lib/nk-demo/VERSION\necho {health} > %{{buildroot}}/usr/lib/nk-demo/HEALTH\n\
                     echo 'setting = default' > %{{buildroot}}/etc/nk-demo/demo.conf\n\
                     printf '[Service]\\nExecStart=/bin/true\\n' > %{{buildroot}}/usr/lib/systemd/system/nk-demo.service\n\
                     %files\n/usr/lib/nk-demo/VERSION\n/usr/lib/nk-demo/HEALTH\n/usr/lib/systemd/system/nk-demo.service\n%config(noreplace) /etc/nk-demo/demo.conf\n"
                ),
            );
        }
        // Scriptlets (in rpm's Lua: an installroot has no shell) that, while the FIFO
        // /nk-block-<phase> exists in the root, touch /nk-reached-<phase> and wait for a line on it:
        // a transaction held at a known point, to be killed there.
        let hold = |phase: &str| {
            format!(
                "%{phase} -p <lua>\nif posix.stat(\"/nk-block-{phase}\") then io.open(\"/nk-reached-{phase}\", \"w\"):close(); io.open(\"/nk-block-{phase}\"):read() end\n"
            )
        };
        for v in ["1.0", "2.0"] {
            let scriptlets: String = SCRIPTLETS.iter().map(|p| hold(p)).collect();
            build(
                &format!("nk-slow-{v}"),
                format!(
                    "Name: nk-slow\nVersion: {v}\nRelease: 1\nSummary: scriptlets that can be held\nLicense: MIT\nBuildArch: noarch\n\
                     %description\nA component with slow scriptlets.\n\
                     %install\nmkdir -p %{{buildroot}}/usr/lib/nk-slow\necho {v} > %{{buildroot}}/usr/lib/nk-slow/VERSION\n\
                     {scriptlets}%files\n/usr/lib/nk-slow/VERSION\n"
                ),
            );
        }
        // The packages of one multi-package component (the last at a version of its own).
        for (name, versions) in [("nk-kube", ["1.0", "2.0"]), ("nk-kubeadm", ["1.0", "2.0"]), ("nk-ctr", ["1.5", "1.6"])] {
            for v in versions {
                build(
                    &format!("{name}-{v}"),
                    format!(
                        "Name: {name}\nVersion: {v}\nRelease: 1\nSummary: one of three\nLicense: MIT\nBuildArch: noarch\n\
                         %description\nA package of a multi-package component.\n\
                         %install\nmkdir -p %{{buildroot}}/usr/lib/{name}\necho {v} > %{{buildroot}}/usr/lib/{name}/VERSION\n\
                         %files\n/usr/lib/{name}/VERSION\n"
                    ),
                );
            }
        }
        // A package whose dependency only another repository (`deps`) has.
        build(
            "nk-needs-dep",
            "Name: nk-needs-dep\nVersion: 1.0\nRelease: 1\nSummary: needs nk-dep\nLicense: MIT\nBuildArch: noarch\nRequires: nk-dep\n\
             %description\nNeeds a package of another repository.\n%files\n"
                .into(),
        );
        build(
            "nk-dep",
            "Name: nk-dep\nVersion: 1.0\nRelease: 1\nSummary: a dependency\nLicense: MIT\nBuildArch: noarch\n\
             %description\nIn the deps repository only.\n%files\n"
                .into(),
        );
        build(
            "nk-conflict",
            "Name: nk-conflict\nVersion: 1.0\nRelease: 1\nSummary: needs what nobody has\nLicense: MIT\nBuildArch: noarch\nRequires: nk-libmissing >= 2\n\
             %description\nUnsatisfiable.\n%files\n"
                .into(),
        );
        let (repo, deps) = (dir.join("repo"), dir.join("deps"));
        for r in [&repo, &deps] {
            std::fs::create_dir_all(r).unwrap();
        }
        for e in std::fs::read_dir(top.join("RPMS/noarch")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap();
            let to = if name.to_string_lossy().starts_with("nk-dep-") { &deps } else { &repo };
            std::fs::copy(&p, to.join(name)).unwrap();
        }
        for r in [&repo, &deps] {
            let ok = std::process::Command::new("createrepo_c")
                .arg("--quiet")
                .arg(r)
                .status()
                .expect("createrepo_c (scripts/install-test-deps.sh installs it)")
                .success();
            assert!(ok, "createrepo_c");
        }
        RpmRepo { dir }
    })
}

/// The installed `epoch:version-release` of a package in an installroot, from the RPM database.
pub fn rpm_installed(root: &Path, package: &str) -> Option<String> {
    let out = std::process::Command::new("rpm")
        .arg("--root")
        .arg(root)
        .args(["-q", "--qf", "%{EPOCHNUM}:%{VERSION}-%{RELEASE}", package])
        .stderr(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|c| c.wait_with_output())
        .expect("rpm -q");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

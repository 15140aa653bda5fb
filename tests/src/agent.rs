//! Agents: real `nodekeeper-agent` processes on fixture hosts, and hand-driven agent streams.

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

use crate::{bin, free_port, health_ok, netns, signal, wait_for};

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

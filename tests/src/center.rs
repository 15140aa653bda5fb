//! The event center and the remediator as processes of their own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;

use crate::{bin, free_port, postgres, signal, tls_channel, wait_for};

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

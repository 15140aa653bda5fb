//! `nodekeeper dev`: the whole system on one machine for a first look. Starts an event center on
//! SQLite in the data folder, an agent for this machine, a detector and a remediator in dry run
//! (it plans and records, and touches nothing: there is no Kubernetes here), as child processes of
//! this one, prints where everything listens, and stops them cleanly on Ctrl-C (the agent before
//! the center, so that it flushes its outbox). Running it again resumes with the same data.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::args::DevArgs;
use crate::output::println;
use nodekeeper_common::tls::TlsFiles;

/// A binary installed next to this one (as cargo and the packages lay them out).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the nodekeeper binary")?;
    let path = exe.parent().map(|d| d.join(name)).context("the nodekeeper binary has no folder")?;
    if !path.exists() {
        bail!(
            "{} not found next to nodekeeper; build every binary first: cargo build --release --bins",
            path.display()
        );
    }
    Ok(path)
}

/// This machine's node name: the hostname, lowercased, with characters a node name cannot hold
/// replaced by '-'.
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
    let mut name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
        .collect();
    name = name.trim_matches(|c| c == '-' || c == '.').to_owned();
    if nodekeeper_common::names::node(&name).is_err() { "dev-node".into() } else { name }
}

/// A child service and its log.
struct Service {
    child: Child,
    what: &'static str,
    log: PathBuf,
    /// Where this run's lines start in the log (it is appended to across runs).
    log_start: u64,
}

impl Service {
    fn spawn(what: &'static str, bin: &Path, args: &[&str], log: PathBuf) -> anyhow::Result<Service> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let log_start = out.metadata()?.len();
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Their own process group: a terminal's Ctrl-C reaches `dev` only, which stops them in order.
            .process_group(0)
            .kill_on_drop(true);
        // However dev ends (`kill -9` included), its services stop with it: the kernel sends them
        // SIGTERM when the thread that started them exits (dev's runtime has one thread).
        #[allow(unsafe_code)]
        // SAFETY: between fork and exec the closure makes one async-signal-safe system call
        // (prctl) and allocates nothing.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from));
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        Ok(Service { child, what, log, log_start })
    }

    /// Why it stopped, in its own words: the errors it logged in this run (or its last lines).
    fn failure(&self, status: std::io::Result<std::process::ExitStatus>, when: &str) -> String {
        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let text = std::fs::read(&self.log).unwrap_or_default();
        let start = (self.log_start as usize).min(text.len());
        let text = String::from_utf8_lossy(&text[start..]);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let errors: Vec<&str> = lines.iter().copied().filter(|l| l.contains("ERROR")).collect();
        let cause = if errors.is_empty() { &lines[lines.len().saturating_sub(3)..] } else { &errors[..] };
        let mut msg = format!("{} exited ({status}){when}; log {}", self.what, self.log.display());
        for line in cause {
            msg.push_str("\n  ");
            msg.push_str(line);
        }
        msg
    }

    async fn wait_healthy(&mut self, url: &str, tls: Option<&TlsFiles>) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !healthy(url, tls).await {
            if let Some(status) = self.child.try_wait()? {
                bail!(self.failure(Ok(status), " during start"));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} did not become healthy at {url} within 30s; see {}", self.what, self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL.
    async fn stop(&mut self, grace: Duration) {
        let (child, what) = (&mut self.child, self.what);
        let Some(pid) = child.id() else { return };
        if let Err(err) = kill(Pid::from_raw(pid as i32), Signal::SIGTERM) {
            tracing::warn!(error = %err, "cannot signal {what}");
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => tracing::warn!(%status, "{what} stopped with an error"),
            Ok(Err(err)) => tracing::warn!(error = %err, "waiting for {what}"),
            Err(_) => {
                tracing::warn!("{what} did not stop within {grace:?}; killing it");
                if let Err(err) = child.kill().await {
                    tracing::warn!(error = %err, "cannot kill {what}");
                }
            }
        }
    }
}

async fn healthy(url: &str, tls: Option<&TlsFiles>) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let Ok(ch) = nodekeeper_common::tls::endpoint(url, tls) else { return false };
    let Ok(ch) = ch.connect_timeout(Duration::from_millis(300)).connect().await else { return false };
    matches!(HealthClient::new(ch).check(HealthCheckRequest::default()).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
}

/// The development CA and certificates in `pki` (made once, reused by later runs), and the admin
/// credentials copied to where the CLI looks by default, unless credentials are already there;
/// then the `--certs` flag the CLI needs.
fn dev_certs(pki: &Path, node: &str) -> anyhow::Result<(TlsFiles, String)> {
    use crate::certs::{IssueArgs, init, issue};
    use nodekeeper_common::tls::Kind;
    if !pki.join("ca.pem").exists() {
        init(pki, 3650, false)?;
        let mut args = IssueArgs {
            dir: pki.to_owned(),
            kind: Kind::Server,
            name: "eventcenter".into(),
            clusters: vec![],
            sans: vec!["127.0.0.1".into(), "localhost".into()],
            days: 3650,
        };
        issue(&args)?;
        args.kind = Kind::Admin;
        args.name = "admin".into();
        args.sans = vec![];
        issue(&args)?;
    }
    for (kind, name) in [(Kind::Node, node), (Kind::Detector, "detector"), (Kind::Subscriber, "remediator")] {
        if !pki.join(format!("{name}.pem")).exists() {
            let args = IssueArgs {
                dir: pki.to_owned(),
                kind,
                name: name.to_owned(),
                clusters: vec!["dev".into()],
                sans: vec![],
                days: 3650,
            };
            issue(&args)?;
        }
    }
    let cli_dir = crate::connect::default_certs_dir();
    let mut certs_flag = String::new();
    if cli_dir.join("admin.pem").exists() {
        if std::fs::read(cli_dir.join("ca.pem")).ok() != std::fs::read(pki.join("ca.pem")).ok() {
            println(&format!(
                "note: {} holds credentials of another CA, left as they are; the CLI needs `--certs {}` for this \
                 center (the commands below have it)",
                cli_dir.display(),
                pki.display()
            ))?;
            certs_flag = format!(" --certs {}", pki.display());
        }
    } else {
        std::fs::create_dir_all(&cli_dir).with_context(|| format!("creating {}", cli_dir.display()))?;
        for f in ["ca.pem", "admin.pem", "admin-key.pem"] {
            std::fs::copy(pki.join(f), cli_dir.join(f))
                .with_context(|| format!("copying {f} to {}", cli_dir.display()))?;
        }
    }
    Ok((TlsFiles::in_dir(pki, "admin"), certs_flag))
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    // Handlers first: a Ctrl-C during start-up is then handled once the children run.
    let shutdown = nodekeeper_common::shutdown::signal();
    let center_bin = sibling("nodekeeper-eventcenter")?;
    let agent_bin = sibling("nodekeeper-agent")?;
    let detector_bin = sibling("nodekeeper-detector")?;
    let remediator_bin = sibling("nodekeeper-remediator")?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let dir = args.data_dir.canonicalize()?;
    let node = node_name();
    let scheme = if args.insecure { "http" } else { "https" };
    let center_url = format!("{scheme}://{}", args.listen);
    let pki = dir.join("pki");
    let (center_tls, agent_tls, detector_tls, remediator_tls, admin, certs_flag) = if args.insecure {
        let insecure = || "insecure = true\n".to_owned();
        (insecure(), insecure(), insecure(), insecure(), None, String::new())
    } else {
        let (admin, certs_flag) = dev_certs(&pki, &node)?;
        let section = |name: &str| {
            let f = TlsFiles::in_dir(&pki, name);
            format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            )
        };
        let sections = (section("eventcenter"), section(&node), section("detector"), section("remediator"));
        (sections.0, sections.1, sections.2, sections.3, Some(admin), certs_flag)
    };
    let center_config = dir.join("eventcenter.toml");
    std::fs::write(&center_config, format!("# Written by `nodekeeper dev` at every start.\n{center_tls}"))?;
    let agent_config = dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "# Written by `nodekeeper dev` at every start.\nnode_name = \"{node}\"\ncluster = \"dev\"\nstate_dir = \"{}\"\ncenter = \"{center_url}\"\n{agent_tls}\n# Every address: the detector probes the node's own address (the local API still answers loopback only).\n[status]\nport = {}\nlisten = [\"0.0.0.0\"]\n",
            dir.join("agent").display(),
            args.status_port
        ),
    )?;

    let detector_config = dir.join("detector.toml");
    std::fs::write(
        &detector_config,
        format!(
            "# Written by `nodekeeper dev` at every start.\nname = \"detector\"\ncenter = \"{center_url}\"\nclusters = [\"dev\"]\n# No kubelet on a development machine.\nkubelet_port = 0\n\n{detector_tls}"
        ),
    )?;
    let remediator_config = dir.join("remediator.toml");
    std::fs::write(
        &remediator_config,
        format!(
            "# Written by `nodekeeper dev` at every start.\nname = \"remediator\"\ncluster = \"dev\"\ncenter = \"{center_url}\"\n# Plans only: there is no Kubernetes here.\ndry_run = true\n\n{remediator_tls}"
        ),
    )?;

    // A health check would find another instance on a taken port and take it for ours.
    for (addr, flag) in [
        (args.listen, "--listen"),
        (([127, 0, 0, 1], args.status_port).into(), "--status-port"),
        (args.dashboard, "--dashboard"),
    ] {
        if let Err(err) = std::net::TcpListener::bind(addr) {
            bail!("{addr} is not free ({err}; another nodekeeper dev?): stop it, or choose another {flag}");
        }
    }
    let listen = args.listen.to_string();
    let ec_data = dir.join("eventcenter");
    let ec_data = ec_data.to_string_lossy();
    let cfg = center_config.to_string_lossy();
    let center_args = ["--config", &cfg, "--listen", &listen, "--data-dir", &ec_data];
    let mut center = Service::spawn("the event center", &center_bin, &center_args, dir.join("eventcenter.log"))?;
    center.wait_healthy(&center_url, admin.as_ref()).await?;
    let config = agent_config.to_string_lossy();
    let mut agent = Service::spawn("the agent", &agent_bin, &["--config", &config], dir.join("agent.log"))?;
    let status_url = format!("http://127.0.0.1:{}", args.status_port);
    if let Err(err) = agent.wait_healthy(&status_url, None).await {
        center.stop(Duration::from_secs(10)).await;
        return Err(err);
    }
    let config = detector_config.to_string_lossy();
    let mut detector = Service::spawn("the detector", &detector_bin, &["--config", &config], dir.join("detector.log"))?;
    let config = remediator_config.to_string_lossy();
    let mut remediator =
        Service::spawn("the remediator", &remediator_bin, &["--config", &config], dir.join("remediator.log"))?;

    // The dashboard, in this process, as the development admin.
    let (dash_stop, dash_stopped) = tokio::sync::oneshot::channel::<()>();
    let dash_ch = crate::connect::channel(&center_url, Some(&pki), "admin").await?;
    let who = if args.insecure { "insecure" } else { "admin" }.to_owned();
    let dash_listener = tokio::net::TcpListener::bind(args.dashboard).await?;
    let dashboard = tokio::spawn(nodekeeper_dashboard::serve(dash_ch, who, dash_listener, async move {
        let _ = dash_stopped.await;
    }));

    let server_flag =
        if center_url == crate::connect::DEFAULT_SERVER { String::new() } else { format!(" --server {center_url}") };
    let cli = format!("nodekeeper{server_flag}{certs_flag}");
    let mut lines = vec![
        format!("nodekeeper dev is running; data in {}", dir.display()),
        String::new(),
        format!("  event center  {center_url}  (gRPC with health and reflection; log {})", center.log.display()),
        format!(
            "  agent         node {node} in cluster dev; status {status_url}/metrics  (log {})",
            agent.log.display()
        ),
        format!("  detector      probes cluster dev from outside  (log {})", detector.log.display()),
        format!(
            "  remediator    cluster dev, dry run: plans are recorded on the faults, nothing is done  (log {})",
            remediator.log.display()
        ),
        format!("  dashboard     http://{}/  (live, as the development admin)", args.dashboard),
        String::new(),
        "Try:".into(),
        format!("  {cli} nodes list"),
        format!("  {cli} events watch"),
        format!(
            "  nodekeeper-agent emit --port {} --type KernelDeadlock --message 'test' --condition true --action reboot",
            args.status_port
        ),
        format!("  {cli} faults list --type KernelDeadlock"),
        format!("  {cli} faults show --type KernelDeadlock     (the remediator's plan is in the timeline)"),
    ];
    if let Some(admin) = &admin {
        lines.push(format!(
            "  grpcurl -cacert {} -cert {} -key {} {} list",
            admin.ca.display(),
            admin.cert.display(),
            admin.key.display(),
            args.listen
        ));
    }
    lines.extend([String::new(), "Ctrl-C stops everything.".into()]);
    for line in lines {
        println(&line)?;
    }

    let failed = tokio::select! {
        _ = shutdown => None,
        s = center.child.wait() => Some(center.failure(s, "")),
        s = agent.child.wait() => Some(agent.failure(s, "")),
        s = detector.child.wait() => Some(detector.failure(s, "")),
        s = remediator.child.wait() => Some(remediator.failure(s, "")),
    };
    let _ = dash_stop.send(());
    let _ = dashboard.await;
    // The agent before the center: it flushes its outbox to the center before the center stops.
    for service in [&mut remediator, &mut detector, &mut agent, &mut center] {
        service.stop(Duration::from_secs(10)).await;
    }
    match failed {
        None => {
            println("stopped")?;
            Ok(())
        }
        Some(why) => bail!(why),
    }
}

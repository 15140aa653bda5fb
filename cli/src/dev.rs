//! `nodekeeper dev`: the whole system on one machine for a first look. Starts an event center on
//! SQLite in the data folder, an agent for this machine, a detector and a remediator in dry run
//! (it plans and records, and touches nothing: there is no Kubernetes here), as child processes of
//! this one, prints where everything listens, and stops them cleanly on Ctrl-C (the agent before
//! the center, so that it flushes its outbox). Running it again resumes with the same data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::output::println;
use nodekeeper_common::tls::TlsFiles;

pub struct DevArgs {
    /// Plaintext, no certificates.
    pub insecure: bool,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub status_port: u16,
}

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

fn spawn(bin: &Path, args: &[&str], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Their own process group: a terminal's Ctrl-C reaches `dev` only, which stops them in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn healthy(url: &str, tls: Option<&TlsFiles>) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let Ok(ch) = nodekeeper_common::tls::endpoint(url, tls) else { return false };
    let Ok(ch) = ch.connect_timeout(Duration::from_millis(300)).connect().await else { return false };
    matches!(HealthClient::new(ch).check(HealthCheckRequest::default()).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
}

async fn wait_healthy(
    url: &str,
    tls: Option<&TlsFiles>,
    child: &mut Child,
    what: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !healthy(url, tls).await {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) during start; see {}", log.display());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not become healthy at {url} within 30s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// SIGTERM, then up to `grace` for it to exit, then SIGKILL.
async fn stop(child: &mut Child, what: &str, grace: Duration) {
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

/// The development CA and certificates in `pki` (made once, reused by later runs), and the admin
/// credentials copied to where the CLI looks by default, unless credentials are already there.
fn dev_certs(pki: &Path, node: &str) -> anyhow::Result<TlsFiles> {
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
    let cli_dir = crate::cmd::default_certs_dir();
    if cli_dir.join("admin.pem").exists() {
        if std::fs::read(cli_dir.join("ca.pem")).ok() != std::fs::read(pki.join("ca.pem")).ok() {
            println(&format!(
                "note: {} holds other credentials; use `--certs {}` with the CLI",
                cli_dir.display(),
                pki.display()
            ))?;
        }
    } else {
        std::fs::create_dir_all(&cli_dir).with_context(|| format!("creating {}", cli_dir.display()))?;
        for f in ["ca.pem", "admin.pem", "admin-key.pem"] {
            std::fs::copy(pki.join(f), cli_dir.join(f))
                .with_context(|| format!("copying {f} to {}", cli_dir.display()))?;
        }
    }
    Ok(TlsFiles::in_dir(pki, "admin"))
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
    let (center_tls, agent_tls, detector_tls, remediator_tls, admin) = if args.insecure {
        let insecure = || "insecure = true\n".to_owned();
        (insecure(), insecure(), insecure(), insecure(), None)
    } else {
        let admin = dev_certs(&pki, &node)?;
        let section = |name: &str| {
            let f = TlsFiles::in_dir(&pki, name);
            format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            )
        };
        (section("eventcenter"), section(&node), section("detector"), section("remediator"), Some(admin))
    };
    let center_config = dir.join("eventcenter.toml");
    std::fs::write(&center_config, format!("# Written by `nodekeeper dev` at every start.\n{center_tls}"))?;
    let agent_config = dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "# Written by `nodekeeper dev` at every start.\nnode_name = \"{node}\"\ncluster = \"dev\"\nstate_dir = \"{}\"\ncenter = \"{center_url}\"\n\n# Every address: the detector probes the node's own address (the local API still answers loopback only).\n[status]\nport = {}\nlisten = [\"0.0.0.0\"]\n\n{agent_tls}",
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

    let center_log = dir.join("eventcenter.log");
    let agent_log = dir.join("agent.log");
    let listen = args.listen.to_string();
    let ec_data = dir.join("eventcenter");
    let ec_data = ec_data.to_string_lossy();
    let cfg = center_config.to_string_lossy();
    let mut center = spawn(&center_bin, &["--config", &cfg, "--listen", &listen, "--data-dir", &ec_data], &center_log)?;
    wait_healthy(&center_url, admin.as_ref(), &mut center, "the event center", &center_log).await?;
    let config = agent_config.to_string_lossy();
    let mut agent = spawn(&agent_bin, &["--config", &config], &agent_log)?;
    let status_url = format!("http://127.0.0.1:{}", args.status_port);
    if let Err(err) = wait_healthy(&status_url, None, &mut agent, "the agent", &agent_log).await {
        stop(&mut center, "the event center", Duration::from_secs(10)).await;
        return Err(err);
    }

    let detector_log = dir.join("detector.log");
    let remediator_log = dir.join("remediator.log");
    let mut detector = spawn(&detector_bin, &["--config", &detector_config.to_string_lossy()], &detector_log)?;
    let mut remediator = spawn(&remediator_bin, &["--config", &remediator_config.to_string_lossy()], &remediator_log)?;

    let server_flag =
        if center_url == crate::cmd::DEFAULT_SERVER { String::new() } else { format!(" --server {center_url}") };
    for line in [
        format!("nodekeeper dev is running; data in {}", dir.display()),
        String::new(),
        format!("  event center  {center_url}  (gRPC with health and reflection; log {})", center_log.display()),
        format!(
            "  agent         node {node} in cluster dev; status {status_url}/metrics  (log {})",
            agent_log.display()
        ),
        format!("  detector      probes cluster dev from outside  (log {})", detector_log.display()),
        format!(
            "  remediator    cluster dev, dry run: plans are recorded on the faults, nothing is done  (log {})",
            remediator_log.display()
        ),
        String::new(),
        "Try:".into(),
        format!("  nodekeeper{server_flag} nodes list"),
        format!("  nodekeeper{server_flag} events watch"),
        format!(
            "  nodekeeper-agent emit --port {} --type KernelDeadlock --message 'test' --condition true --action reboot",
            args.status_port
        ),
        format!("  nodekeeper{server_flag} faults list"),
        format!("  nodekeeper{server_flag} faults show <id>     (the remediator's plan is in the timeline)"),
        String::new(),
        "Ctrl-C stops everything.".into(),
    ] {
        println(&line)?;
    }

    let failed = tokio::select! {
        _ = shutdown => None,
        s = center.wait() => Some(format!("the event center exited ({}); see {}", s.map(|s| s.to_string()).unwrap_or_default(), center_log.display())),
        s = agent.wait() => Some(format!("the agent exited ({}); see {}", s.map(|s| s.to_string()).unwrap_or_default(), agent_log.display())),
        s = detector.wait() => Some(format!("the detector exited ({}); see {}", s.map(|s| s.to_string()).unwrap_or_default(), detector_log.display())),
        s = remediator.wait() => Some(format!("the remediator exited ({}); see {}", s.map(|s| s.to_string()).unwrap_or_default(), remediator_log.display())),
    };
    stop(&mut remediator, "the remediator", Duration::from_secs(10)).await;
    stop(&mut detector, "the detector", Duration::from_secs(10)).await;
    // The agent before the center: it flushes its outbox to the center before the center stops.
    stop(&mut agent, "the agent", Duration::from_secs(10)).await;
    stop(&mut center, "the event center", Duration::from_secs(10)).await;
    match failed {
        None => {
            println("stopped")?;
            Ok(())
        }
        Some(why) => bail!(why),
    }
}

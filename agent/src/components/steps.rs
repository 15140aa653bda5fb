//! The commands a change runs besides the package transaction: hooks, unit restarts and
//! reloads, and the health check that decides whether a change stays.

use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{ComponentSpec, ExecCheck, health_check::Check};

use super::Manager;

impl Manager {
    pub(super) async fn exec(&self, argv: &[String], timeout: Duration, what: &str) -> Result<(), String> {
        let (exe, args) = argv.split_first().ok_or_else(|| format!("{what}: empty command"))?;
        let child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{what}: cannot run {exe}: {e}"))?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => Err(format!("{what}: {exe} did not finish within {}", humantime::format_duration(timeout))),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Ok(Ok(o)) if o.status.success() => Ok(()),
            Ok(Ok(o)) => Err(format!(
                "{what}: {exe} exited with {}{}",
                o.status,
                String::from_utf8_lossy(&o.stderr).lines().next().map(|l| format!(": {l}")).unwrap_or_default()
            )),
        }
    }

    pub(super) async fn hook(&self, hook: &Option<ExecCheck>, what: &str, timeout: Duration) -> Result<(), String> {
        match hook {
            Some(h) => self.exec(&h.argv, timeout, what).await,
            None => Ok(()),
        }
    }

    /// `systemctl restart|reload|stop unit` (nothing without a unit).
    pub(super) async fn unit(&self, unit: &str, verb: &str, timeout: Duration) -> Result<(), String> {
        if unit.is_empty() {
            return Ok(());
        }
        let argv = vec![self.s.systemctl.display().to_string(), verb.into(), unit.into()];
        self.exec(&argv, timeout, &format!("{verb} {unit}")).await
    }

    /// Runs the spec's health check until it passes or its deadline passes.
    pub(super) async fn verify(&self, spec: &ComponentSpec) -> Result<(), String> {
        let Some(h) = &spec.health_check else { return Ok(()) };
        let timeout = nodekeeper_common::time::from_duration(h.timeout.as_ref()).unwrap_or(Duration::from_secs(10));
        let deadline = nodekeeper_common::time::from_duration(h.deadline.as_ref()).unwrap_or(Duration::from_secs(60));
        let until = Instant::now() + deadline;
        loop {
            let r = match &h.check {
                None => return Ok(()),
                Some(Check::Command(c)) => self.exec(&c.argv, timeout, "health check").await,
                Some(Check::HttpUrl(u)) => {
                    let ca = (!h.ca_file.is_empty()).then(|| std::path::Path::new(&h.ca_file));
                    nodekeeper_common::http::get_trusting(u, ca, timeout).await
                }
                Some(Check::UnitActive(false)) => return Ok(()),
                Some(Check::UnitActive(true)) => {
                    let argv = vec![
                        self.s.systemctl.display().to_string(),
                        "is-active".into(),
                        "--quiet".into(),
                        spec.systemd_unit.clone(),
                    ];
                    self.exec(&argv, timeout, "health check (unit active)").await
                }
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + Duration::from_secs(1) >= until => {
                    return Err(format!("not healthy within {}: {e}", humantime::format_duration(deadline)));
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }
}

//! The component manager: brings the node's software to its desired state (RPM packages, their
//! config files and units) and rolls back what does not come up healthy.
//!
//! One reconciliation pass reads every installed version with one `rpm -q`, and for each
//! component that differs (version or config files) walks a typed state machine:
//!
//! ```text
//! Begun ─pre-hook─▶ Installing ─dnf─▶ Installed ─configs─▶ Configured ─restart, post-hook─▶ Verifying
//!                                                                                          │
//!                          Converged ◀──────────── health check passes within the deadline ┤
//!                          Failed (rolled back) ◀─ RollingBack ◀── fails ───────────────────┘
//! ```
//!
//! Every step is journaled (state_dir/components/<name>.journal, written and fsynced before the
//! step is taken), so an agent killed in the middle resumes or rolls back when it starts again
//! (`recover`), and says which. A version that was rolled back is not tried again until the
//! desired state changes or a reinstall is asked for. Errors that change nothing (bad specs,
//! unreachable repositories, missing packages, dependency conflicts) leave the running version
//! and its config as they were.

pub mod accounts;
pub mod driver;
pub mod rpm;
pub mod spec;
pub mod version;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    Category, ComponentPhase, ComponentSpec, ComponentStatus, ConditionStatus, ExecCheck, RecommendedAction,
    RestartPolicy, Severity, health_check::Check,
};
use serde::{Deserialize, Serialize};

use crate::monitor::{Class, Finding};
use rpm::{ToolError, Tools, Verb};
use version::Evr;

const SOURCE: &str = "component-manager";

/// Where and how the manager works.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Install into this root instead of `/` (rpm/dnf `--installroot`; config files go there too).
    pub installroot: Option<PathBuf>,
    pub rpm: PathBuf,
    pub dnf: PathBuf,
    pub systemctl: PathBuf,
    /// Config files may only be written below these directories (inside the installroot).
    pub config_roots: Vec<PathBuf>,
    /// Journals, backups and the record of rolled-back versions.
    pub state_dir: PathBuf,
    pub releasever: String,
    /// The longest a package transaction, a hook or a unit restart may take.
    pub step_timeout: Duration,
    /// How often a pass verifies converged components with `rpm -V` (None: only after an
    /// interruption). The first pass of a manager verifies.
    pub verify_interval: Option<Duration>,
    /// A command prefix for dnf transactions (see `Tools::with_runner`).
    pub transaction_runner: Vec<String>,
}

/// How one component's pass ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// At the desired state; `changed` if this pass changed something.
    Converged { changed: bool },
    /// The change failed its checks and was undone; the previous version runs.
    RolledBack(String),
    /// Nothing could be done (tool error, a version rolled back before); nothing was changed.
    Failed(String),
    /// The spec has defects (every one named); nothing was changed for any component.
    Invalid(String),
    /// Not changed: a component it comes after has not converged (that one says why).
    Pending(String),
}

/// A journaled step of a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Step {
    Begun,
    Installed,
    Configured,
    Verifying,
    RollingBack,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Backup {
    path: String,
    /// None: the file did not exist.
    content: Option<Vec<u8>>,
    mode: u32,
    /// The file's owner and group (journals of older agents have none: left as written).
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    component: String,
    package: String,
    step: Step,
    from: Option<String>,
    to: String,
    package_changes: bool,
    unit: String,
    backups: Vec<Backup>,
    /// Why a rollback started.
    #[serde(default)]
    reason: String,
}

pub struct Manager {
    s: Settings,
    pub(crate) tools: Tools,
    status: BTreeMap<String, ComponentStatus>,
    /// Component → the fingerprint of the spec whose change was rolled back: not tried again
    /// until the spec changes (its version, its config files, anything).
    rejected: HashMap<String, String>,
    /// Owners and groups of the target root.
    accounts: accounts::Accounts,
    /// When converged components were last verified with `rpm -V`.
    verified: Option<Instant>,
    /// Findings for the center (faults for rollbacks, events for recoveries).
    pub findings: Vec<Finding>,
}

fn class(action: RecommendedAction) -> Class {
    Class::new(Severity::Error, Category::Component, action)
}

/// `<Title>UpgradeFailed`, the condition a rollback opens.
pub fn failed_condition(name: &str) -> String {
    format!("{}UpgradeFailed", crate::monitor::components::title(name))
}

fn io(what: &str, p: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", p.display())
}

/// Writes a file atomically: a temporary file in the same directory, fsynced, then renamed;
/// with `ids`, owned by that user and group.
pub(crate) fn write_atomic(
    path: &Path,
    content: &[u8],
    mode: u32,
    ids: (Option<u32>, Option<u32>),
) -> Result<(), String> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| format!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    let tmp = dir.join(format!(".{}.nodekeeper-tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(content).map_err(|e| io("writing", &tmp, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io("setting the mode of", &tmp, e))?;
    if let (None, None) = ids {
    } else {
        let (uid, gid) = (ids.0.map(nix::unistd::Uid::from_raw), ids.1.map(nix::unistd::Gid::from_raw));
        nix::unistd::chown(&tmp, uid, gid).map_err(|e| format!("chown {}: {e}", tmp.display()))?;
    }
    f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming onto", path, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing", dir, e))
}

/// What identifies a desired state of one component: a rolled-back change is not tried again
/// until this changes.
fn fingerprint(spec: &ComponentSpec) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(prost::Message::encode_to_vec(spec));
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

impl Manager {
    pub fn new(s: Settings) -> Manager {
        let tools = Tools::new(
            s.rpm.clone(),
            s.dnf.clone(),
            s.installroot.clone(),
            &s.state_dir.join("components"),
            s.releasever.clone(),
            s.step_timeout,
        )
        .with_runner(s.transaction_runner.clone());
        let rejected = std::fs::read(s.state_dir.join("components/rejected.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let accounts = accounts::Accounts::new(s.installroot.as_deref());
        Manager { s, tools, status: BTreeMap::new(), rejected, accounts, verified: None, findings: Vec::new() }
    }

    fn dir(&self) -> PathBuf {
        self.s.state_dir.join("components")
    }

    fn journal_path(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.journal"))
    }

    fn write_journal(&self, j: &Journal) -> Result<(), String> {
        write_atomic(
            &self.journal_path(&j.component),
            &serde_json::to_vec(j).expect("serializable"),
            0o600,
            (None, None),
        )
    }

    fn clear_journal(&self, name: &str) {
        let _ = std::fs::remove_file(self.journal_path(name));
    }

    fn save_rejected(&self) {
        if let Err(e) = write_atomic(
            &self.dir().join("rejected.json"),
            &serde_json::to_vec(&self.rejected).expect("serializable"),
            0o600,
            (None, None),
        ) {
            tracing::error!(error = %e, "cannot record the rolled-back versions");
        }
    }

    /// The status of every component seen, by name.
    pub fn statuses(&self) -> Vec<ComponentStatus> {
        self.status.values().cloned().collect()
    }

    fn set(
        &mut self,
        spec: &ComponentSpec,
        installed: Option<&Evr>,
        phase: ComponentPhase,
        error: &str,
        running: Option<bool>,
    ) {
        let s = self.status.entry(spec.name.clone()).or_default();
        s.name = spec.name.clone();
        s.desired_version = if spec.absent { "absent".into() } else { spec.version.clone() };
        s.installed_version = installed.map(Evr::to_string).unwrap_or_default();
        s.phase = phase as i32;
        s.last_error = error.to_owned();
        if let Some(r) = running {
            s.running = r;
        }
        s.updated_time = Some(nodekeeper_common::time::now_timestamp());
    }

    /// Forgets components no longer desired.
    pub fn retain(&mut self, specs: &[ComponentSpec]) {
        self.status.retain(|k, _| specs.iter().any(|s| &s.name == k));
    }

    /// Config files of `spec` whose content, mode or owner differ from the spec.
    fn drift(&self, spec: &ComponentSpec) -> Vec<String> {
        let mut out = Vec::new();
        for f in &spec.config_files {
            let p = self.tools.path(Path::new(&f.path));
            let same = match (std::fs::read(&p), std::fs::metadata(&p)) {
                (Ok(content), Ok(meta)) => {
                    use std::os::unix::fs::MetadataExt;
                    let (uid, gid) = self.accounts.ids(&f.owner, &f.group).unwrap_or((None, None));
                    content == f.content
                        && meta.permissions().mode() & 0o7777 == f.mode
                        && uid.is_none_or(|u| meta.uid() == u)
                        && gid.is_none_or(|g| meta.gid() == g)
                }
                _ => false,
            };
            if !same {
                out.push(f.path.clone());
            }
        }
        out
    }

    fn backups(&self, spec: &ComponentSpec) -> Vec<Backup> {
        spec.config_files
            .iter()
            .map(|f| {
                use std::os::unix::fs::MetadataExt;
                let p = self.tools.path(Path::new(&f.path));
                let meta = std::fs::metadata(&p).ok();
                Backup {
                    path: f.path.clone(),
                    content: std::fs::read(&p).ok(),
                    mode: meta.as_ref().map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644),
                    uid: meta.as_ref().map(|m| m.uid()),
                    gid: meta.as_ref().map(|m| m.gid()),
                }
            })
            .collect()
    }

    async fn exec(&self, argv: &[String], timeout: Duration, what: &str) -> Result<(), String> {
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

    async fn hook(&self, hook: &Option<ExecCheck>, what: &str, timeout: Duration) -> Result<(), String> {
        match hook {
            Some(h) => self.exec(&h.argv, timeout, what).await,
            None => Ok(()),
        }
    }

    /// `systemctl restart|reload|stop unit` (nothing without a unit).
    async fn unit(&self, unit: &str, verb: &str, timeout: Duration) -> Result<(), String> {
        if unit.is_empty() {
            return Ok(());
        }
        let argv = vec![self.s.systemctl.display().to_string(), verb.into(), unit.into()];
        self.exec(&argv, timeout, &format!("{verb} {unit}")).await
    }

    /// Runs the spec's health check until it passes or its deadline passes.
    async fn verify(&self, spec: &ComponentSpec) -> Result<(), String> {
        let Some(h) = &spec.health_check else { return Ok(()) };
        let timeout = nodekeeper_common::time::from_duration(h.timeout.as_ref()).unwrap_or(Duration::from_secs(10));
        let deadline = nodekeeper_common::time::from_duration(h.deadline.as_ref()).unwrap_or(Duration::from_secs(60));
        let until = Instant::now() + deadline;
        loop {
            let r = match &h.check {
                None => return Ok(()),
                Some(Check::Command(c)) => self.exec(&c.argv, timeout, "health check").await,
                Some(Check::HttpUrl(u)) => nodekeeper_common::http::get(u, timeout).await,
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

    fn write_configs(&self, spec: &ComponentSpec) -> Result<(), String> {
        for f in &spec.config_files {
            let ids = self.accounts.ids(&f.owner, &f.group)?;
            write_atomic(&self.tools.path(Path::new(&f.path)), &f.content, f.mode, ids)?;
        }
        Ok(())
    }

    fn restore(&self, backups: &[Backup]) -> Result<(), String> {
        for b in backups {
            let p = self.tools.path(Path::new(&b.path));
            match &b.content {
                Some(c) => write_atomic(&p, c, b.mode, (b.uid, b.gid))?,
                None => match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("removing", &p, e)),
                },
            }
        }
        Ok(())
    }

    /// The installed version of each package, after repairing any package that rpm records more
    /// than once (a transaction cut short outside the journal's knowledge): a pass never calls
    /// converged what rpm disagrees with.
    async fn installed_repaired(
        &mut self,
        specs: &[ComponentSpec],
        packages: &[&str],
        log: &mut (dyn FnMut(String) + Send),
    ) -> Result<(HashMap<String, Evr>, HashMap<String, String>), ToolError> {
        let versions = self.tools.versions(packages).await?;
        let doubled: Vec<&ComponentSpec> =
            specs.iter().filter(|s| versions.get(&s.package).is_some_and(|v| v.len() > 1)).collect();
        let mut unrepaired = HashMap::new();
        for spec in doubled {
            let target = Evr::parse(&spec.version).ok();
            match self.repair(spec, target.as_ref()).await {
                Ok(done) => done.iter().for_each(|d| log(format!("{}: repaired: {d}", spec.name))),
                Err(e) => {
                    let e = format!("rpm records several versions of {} and the repair failed: {e}", spec.package);
                    log(format!("{}: {e}", spec.name));
                    unrepaired.insert(spec.name.clone(), e);
                }
            }
        }
        Ok((self.tools.installed(packages).await?, unrepaired))
    }

    /// The whole desired spec checked for this node ([`spec::validate_all`]); the error names
    /// every defect.
    pub fn check(&self, specs: &[ComponentSpec]) -> Result<(), String> {
        spec::validate_all(specs, &self.s.config_roots, Some(&self.accounts))
            .map(drop)
            .map_err(|defects| format!("invalid spec, nothing changed: {}", spec::describe(&defects)))
    }

    /// One pass over every component, with one `rpm -q` for all of them.
    pub async fn reconcile(
        &mut self,
        specs: &[ComponentSpec],
        log: &mut (dyn FnMut(String) + Send),
    ) -> Vec<(String, Outcome)> {
        self.retain(specs);
        if specs.is_empty() {
            return Vec::new();
        }
        let packages: Vec<&str> =
            specs.iter().filter(|s| version::package_name(&s.package).is_ok()).map(|s| s.package.as_str()).collect();
        let (installed, unrepaired) = match self.installed_repaired(specs, &packages, log).await {
            Ok(i) => i,
            Err(e) => {
                let msg = format!("cannot read the installed packages: {e}");
                for s in specs {
                    self.set(s, None, ComponentPhase::Failed, &msg, None);
                }
                return specs.iter().map(|s| (s.name.clone(), Outcome::Failed(msg.clone()))).collect();
            }
        };
        // The whole spec first: a spec with any defect changes nothing, for no component.
        if let Err(msg) = self.check(specs) {
            log(msg.clone());
            for s in specs {
                self.set(s, installed.get(&s.package), ComponentPhase::Failed, &msg, None);
            }
            return specs.iter().map(|s| (s.name.clone(), Outcome::Invalid(msg.clone()))).collect();
        }
        let mut out = Vec::new();
        self.verify_if_due(specs, &installed, log).await;
        // Each component after the ones it names in `after` (checked: no cycle).
        let order = spec::order(specs).unwrap_or_else(|| (0..specs.len()).collect());
        for spec in order.into_iter().map(|i| &specs[i]) {
            let current = installed.get(&spec.package).cloned();
            let waits_for = spec.after.iter().find(|a| {
                !out.iter().any(|(n, o): &(String, Outcome)| n == *a && matches!(o, Outcome::Converged { .. }))
            });
            let o = match (unrepaired.get(&spec.name), waits_for) {
                (Some(e), _) => {
                    self.set(spec, current.as_ref(), ComponentPhase::Failed, e, None);
                    Outcome::Failed(e.clone())
                }
                (None, Some(first)) if !self.settled(spec, current.as_ref()) => {
                    let e = format!("not changed: it comes after {first}, which has not converged");
                    log(format!("{}: {e}", spec.name));
                    self.set(spec, current.as_ref(), ComponentPhase::Pending, &e, None);
                    Outcome::Pending(e)
                }
                _ => self.apply_one(spec, current, false, log).await,
            };
            out.push((spec.name.clone(), o));
        }
        out
    }

    /// Every `verify_interval`, the converged components' files checked against rpm, and
    /// reinstalled where they do not verify.
    async fn verify_if_due(
        &mut self,
        specs: &[ComponentSpec],
        installed: &HashMap<String, Evr>,
        log: &mut (dyn FnMut(String) + Send),
    ) {
        let Some(every) = self.s.verify_interval else { return };
        if self.verified.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.verified = Some(Instant::now());
        for spec in specs.iter().filter(|s| !s.absent) {
            let target = Evr::parse(&spec.version).ok();
            if target.is_none() || installed.get(&spec.package) != target.as_ref() {
                continue;
            }
            match self.repair(spec, target.as_ref()).await {
                Ok(done) => done.iter().for_each(|d| log(format!("{}: repaired: {d}", spec.name))),
                Err(e) => log(format!("{}: cannot verify or repair its files: {e}", spec.name)),
            }
        }
    }

    /// Whether `spec` is at its desired state already (nothing for a pass to change).
    fn settled(&self, spec: &ComponentSpec, installed: Option<&Evr>) -> bool {
        match spec::validate(spec, &self.s.config_roots) {
            Ok(Some(target)) => installed == Some(&target) && self.drift(spec).is_empty(),
            Ok(None) => installed.is_none(),
            Err(_) => false,
        }
    }

    /// Brings one component to its spec. `reinstall`: even if it looks converged (and even if
    /// this version was rolled back before).
    pub async fn apply_one(
        &mut self,
        spec: &ComponentSpec,
        installed: Option<Evr>,
        reinstall: bool,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Outcome {
        let target = match spec::validate(spec, &self.s.config_roots) {
            Ok(Some(t)) => t,
            Ok(None) => return self.remove(spec, installed, log).await,
            Err(e) => {
                log(format!("{}: invalid spec, nothing changed: {e}", spec.name));
                self.set(spec, installed.as_ref(), ComponentPhase::Failed, &e, None);
                return Outcome::Invalid(e);
            }
        };
        if !reinstall && self.rejected.get(&spec.name) == Some(&fingerprint(spec)) {
            let e = self.status.get(&spec.name).map(|s| s.last_error.clone()).filter(|e| !e.is_empty()).unwrap_or_else(
                || format!("version {} was rolled back; set another version or reinstall", spec.version),
            );
            self.set(spec, installed.as_ref(), ComponentPhase::Failed, &e, None);
            return Outcome::Failed(e);
        }
        let drift = self.drift(spec);
        let verb = if reinstall {
            Some(if installed.is_some() { Verb::Reinstall } else { Verb::Install })
        } else {
            Verb::between(installed.as_ref(), &target)
        };
        if verb.is_none() && drift.is_empty() {
            self.set(spec, installed.as_ref(), ComponentPhase::Converged, "", None);
            return Outcome::Converged { changed: false };
        }
        let what = match (verb, &installed) {
            (Some(v), Some(from)) => format!("{} {} from {from} to {target}", v_name(v), spec.package),
            (Some(v), None) => format!("{} {} {target}", v_name(v), spec.package),
            (None, _) => format!("repair config {}", drift.join(", ")),
        };
        log(format!("{}: {what}", spec.name));
        let mut j = Journal {
            component: spec.name.clone(),
            package: spec.package.clone(),
            step: Step::Begun,
            from: installed.as_ref().map(Evr::to_string),
            to: target.to_string(),
            package_changes: verb.is_some(),
            unit: spec.systemd_unit.clone(),
            backups: self.backups(spec),
            reason: String::new(),
        };
        if let Err(e) = self.write_journal(&j) {
            self.set(spec, installed.as_ref(), ComponentPhase::Failed, &e, None);
            return Outcome::Failed(e);
        }
        self.set(spec, installed.as_ref(), ComponentPhase::Installing, "", None);
        if let Err(e) = self.hook(&spec.pre_hook, "pre-hook", self.timeout(spec)).await {
            log(format!("{}: {e}; nothing changed", spec.name));
            self.clear_journal(&spec.name);
            self.set(spec, installed.as_ref(), ComponentPhase::Failed, &e, None);
            return Outcome::Failed(e);
        }
        if let Some(v) = verb {
            if let Err(e) =
                self.tools.transaction(v, &spec.package, &target, &spec.repositories, self.timeout(spec)).await
            {
                let e = e.to_string();
                log(format!("{}: {e}; nothing changed", spec.name));
                self.clear_journal(&spec.name);
                self.set(spec, installed.as_ref(), ComponentPhase::Failed, &e, None);
                return Outcome::Failed(e);
            }
            log(format!("{}: {} {target} installed", spec.name, spec.package));
        }
        j.step = Step::Installed;
        if let Err(e) = self.write_journal(&j) {
            return self.rollback(spec, j, e, true, log).await;
        }
        self.finish(spec, j, log).await
    }

    /// An absent component: its unit stopped and its package removed, if installed.
    async fn remove(
        &mut self,
        spec: &ComponentSpec,
        installed: Option<Evr>,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Outcome {
        let Some(from) = installed else {
            self.set(spec, None, ComponentPhase::Converged, "", Some(false));
            return Outcome::Converged { changed: false };
        };
        log(format!("{}: remove {} {from}", spec.name, spec.package));
        self.set(spec, Some(&from), ComponentPhase::Installing, "", None);
        let timeout = self.timeout(spec);
        let steps = async {
            if !spec.systemd_unit.is_empty() {
                let argv = vec![self.s.systemctl.display().to_string(), "stop".into(), spec.systemd_unit.clone()];
                self.exec(&argv, timeout, &format!("stopping {}", spec.systemd_unit)).await?;
            }
            self.hook(&spec.pre_hook, "pre-hook", timeout).await?;
            self.tools
                .transaction(Verb::Remove, &spec.package, &from, &spec.repositories, timeout)
                .await
                .map_err(|e| e.to_string())?;
            self.hook(&spec.post_hook, "post-hook", timeout).await
        };
        match steps.await {
            Ok(()) => {
                log(format!("{}: {} removed", spec.name, spec.package));
                self.set(spec, None, ComponentPhase::Converged, "", Some(false));
                Outcome::Converged { changed: true }
            }
            Err(e) => {
                log(format!("{}: {e}", spec.name));
                let still =
                    self.tools.installed(&[&spec.package]).await.ok().and_then(|m| m.get(&spec.package).cloned());
                self.set(spec, still.as_ref(), ComponentPhase::Failed, &e, None);
                Outcome::Failed(e)
            }
        }
    }

    /// The longest one step of `spec`'s change may take.
    fn timeout(&self, spec: &ComponentSpec) -> Duration {
        nodekeeper_common::time::from_duration(spec.step_timeout.as_ref()).unwrap_or(self.s.step_timeout)
    }

    /// From Installed on: configs, restart, post-hook, verification; rollback on failure.
    async fn finish(&mut self, spec: &ComponentSpec, mut j: Journal, log: &mut (dyn FnMut(String) + Send)) -> Outcome {
        let target = Evr::parse(&j.to).ok();
        let steps = async {
            self.write_configs(spec)?;
            j.step = Step::Configured;
            self.write_journal(&j)?;
            // Only config files changed and the unit can take them with a reload: reload it.
            let verb = match spec.restart_policy() {
                RestartPolicy::Never => None,
                RestartPolicy::Reload if !j.package_changes => Some("reload"),
                _ => Some("restart"),
            };
            if let Some(verb) = verb {
                self.unit(&spec.systemd_unit, verb, self.timeout(spec)).await?;
            }
            self.hook(&spec.post_hook, "post-hook", self.timeout(spec)).await?;
            j.step = Step::Verifying;
            self.write_journal(&j)?;
            Ok::<(), String>(())
        };
        if let Err(e) = steps.await {
            return self.rollback(spec, j, e, true, log).await;
        }
        self.set(spec, target.as_ref(), ComponentPhase::Verifying, "", None);
        log(format!("{}: verifying", spec.name));
        match self.verify(spec).await {
            Ok(()) => {
                self.clear_journal(&spec.name);
                if self.rejected.remove(&spec.name).is_some() {
                    self.save_rejected();
                }
                self.set(spec, target.as_ref(), ComponentPhase::Converged, "", Some(true));
                log(format!("{}: converged at {}", spec.name, j.to));
                let cond = failed_condition(&spec.name);
                self.findings.push(
                    Finding::condition(
                        SOURCE,
                        &cond,
                        ConditionStatus::False,
                        "ComponentConverged",
                        format!("{} converged at {}", spec.name, j.to),
                        class(RecommendedAction::Manual),
                    )
                    .with("component", &spec.name),
                );
                Outcome::Converged { changed: true }
            }
            Err(e) => self.rollback(spec, j, e, true, log).await,
        }
    }

    /// Undoes a transition: the previous package version, the previous config files, a restart.
    /// `reject`: the version failed its checks; do not try it again until the desired state
    /// changes.
    async fn rollback(
        &mut self,
        spec: &ComponentSpec,
        mut j: Journal,
        reason: String,
        reject: bool,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Outcome {
        log(format!("{}: {reason}; rolling back to {}", spec.name, j.from.as_deref().unwrap_or("not installed")));
        j.step = Step::RollingBack;
        if j.reason.is_empty() {
            j.reason = reason.clone();
        }
        let _ = self.write_journal(&j);
        let to = Evr::parse(&j.to).ok();
        self.set(spec, to.as_ref(), ComponentPhase::RollingBack, &reason, Some(false));
        let from = j.from.as_deref().and_then(|f| Evr::parse(f).ok());
        let mut result: Result<(), String> = Ok(());
        if j.package_changes {
            let installed = self.tools.installed(&[&j.package]).await.ok().and_then(|m| m.get(&j.package).cloned());
            let step = match (&from, &installed) {
                (Some(f), Some(i)) if f == i => None,
                (Some(f), i) => Verb::between(i.as_ref(), f).map(|v| (v, f.clone())),
                (None, Some(i)) => Some((Verb::Remove, i.clone())),
                (None, None) => None,
            };
            if let Some((v, evr)) = step {
                result = self
                    .tools
                    .transaction(v, &j.package, &evr, &spec.repositories, self.timeout(spec))
                    .await
                    .map_err(|e: ToolError| e.to_string());
            }
        }
        if result.is_ok() {
            result = self.restore(&j.backups);
        }
        if result.is_ok() {
            result = self.unit(&j.unit, "restart", self.timeout(spec)).await;
        }
        self.clear_journal(&spec.name);
        if reject {
            self.rejected.insert(spec.name.clone(), fingerprint(spec));
            self.save_rejected();
        }
        let installed_now = self.tools.installed(&[&j.package]).await.ok().and_then(|m| m.get(&j.package).cloned());
        let cond = failed_condition(&spec.name);
        match result {
            Ok(()) => {
                let msg = format!(
                    "{} {} was rolled back to {}: {}",
                    spec.name,
                    j.to,
                    j.from.as_deref().unwrap_or("not installed"),
                    j.reason
                );
                log(format!("{}: rolled back", spec.name));
                self.set(spec, installed_now.as_ref(), ComponentPhase::Failed, &msg, None);
                self.findings.push(
                    Finding::condition(
                        SOURCE,
                        &cond,
                        ConditionStatus::True,
                        "RolledBack",
                        msg.clone(),
                        class(RecommendedAction::Manual),
                    )
                    .with("component", &spec.name)
                    .with("rejected_version", &j.to),
                );
                Outcome::RolledBack(msg)
            }
            Err(e) => {
                let msg = format!("{} {}: {}; and the rollback failed: {e}", spec.name, j.to, j.reason);
                log(format!("{}: rollback failed: {e}", spec.name));
                self.set(spec, installed_now.as_ref(), ComponentPhase::Failed, &msg, Some(false));
                self.findings.push(
                    Finding::condition(
                        SOURCE,
                        &cond,
                        ConditionStatus::True,
                        "RollbackFailed",
                        msg.clone(),
                        class(RecommendedAction::ReinstallComponent),
                    )
                    .with("component", &spec.name),
                );
                Outcome::Failed(msg)
            }
        }
    }

    /// After a restart: finishes or undoes every transition a journal says was under way. A
    /// transition is resumed when the package is where the journal says and the desired state
    /// still wants it; otherwise it is rolled back.
    /// Makes rpm's record of `package` true again after a transaction was cut short: one version
    /// recorded (`keep` when it is among them, else the newest), and its files as rpm has them
    /// (reinstalled from `spec`'s repositories when they do not verify). Returns what it repaired.
    async fn repair(&mut self, spec: &ComponentSpec, keep: Option<&Evr>) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        let versions = self.tools.versions(&[&spec.package]).await.map_err(|e| e.to_string())?;
        let versions = versions.get(&spec.package).cloned().unwrap_or_default();
        let Some(newest) = versions.last().cloned() else { return Ok(done) };
        let kept = keep.filter(|k| versions.contains(k)).cloned().unwrap_or(newest);
        for v in versions.iter().filter(|v| **v != kept) {
            self.tools.forget(&spec.package, v).await.map_err(|e| e.to_string())?;
            done.push(format!(
                "removed the record of {} {v} that an interrupted transaction left beside {kept}",
                spec.package
            ));
        }
        let failing = self.tools.verify(&spec.package).await.map_err(|e| e.to_string())?;
        if !failing.is_empty() {
            self.tools
                .transaction(Verb::Reinstall, &spec.package, &kept, &spec.repositories, self.timeout(spec))
                .await
                .map_err(|e| format!("reinstalling {} {kept}, whose files do not verify: {e}", spec.package))?;
            done.push(format!("reinstalled {} {kept}: {} did not verify", spec.package, failing.join("; ")));
        }
        if !done.is_empty() {
            self.findings.push(
                Finding::temporary(
                    SOURCE,
                    "ComponentRepaired",
                    format!("{}: {}", spec.name, done.join("; ")),
                    Class::new(Severity::Warning, Category::Component, RecommendedAction::None),
                )
                .with("component", &spec.name),
            );
        }
        Ok(done)
    }

    pub async fn recover(
        &mut self,
        specs: &[ComponentSpec],
        log: &mut (dyn FnMut(String) + Send),
    ) -> Vec<(String, Outcome)> {
        let mut out = Vec::new();
        // A transaction an earlier run started may still be going: rpm's state is final only
        // once it ended.
        if let Err(e) = self.tools.transaction_lock(log).await {
            log(format!("cannot recover interrupted changes: {e}"));
            return out;
        }
        let Ok(rd) = std::fs::read_dir(self.dir()) else { return out };
        let mut journals = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "journal") {
                match std::fs::read(&p).ok().and_then(|b| serde_json::from_slice::<Journal>(&b).ok()) {
                    Some(j) => journals.push(j),
                    None => {
                        tracing::error!(journal = %p.display(), "unreadable component journal; removing it");
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
        for j in journals {
            let name = j.component.clone();
            // After an interruption rpm's record comes first: one version, files that verify.
            // The version kept is the one the change was taking the component to, if recorded.
            let recorded = ComponentSpec {
                repositories: specs
                    .iter()
                    .find(|s| s.package == j.package)
                    .map(|s| s.repositories.clone())
                    .unwrap_or_default(),
                ..ComponentSpec { name: name.clone(), package: j.package.clone(), ..Default::default() }
            };
            let to = Evr::parse(&j.to).ok();
            match self.repair(&recorded, to.as_ref()).await {
                Ok(done) => done.iter().for_each(|d| log(format!("{name}: repaired: {d}"))),
                Err(e) => log(format!("{name}: cannot repair rpm's record: {e}")),
            }
            let installed = self.tools.installed(&[&j.package]).await.ok().and_then(|m| m.get(&j.package).cloned());
            let at_target = installed.as_ref().map(Evr::to_string).as_deref() == Some(j.to.as_str());
            let current = specs.iter().find(|s| s.name == j.component);
            // The desired state still asks for the version the journal was taking it to.
            let wanted = current
                .filter(|s| Evr::parse(&s.version).ok().map(|e| e.to_string()).as_deref() == Some(j.to.as_str()));
            // For a rollback: the component's repositories and unit as the desired state has them now.
            let mut undo = current.cloned().unwrap_or_else(|| ComponentSpec {
                name: j.component.clone(),
                package: j.package.clone(),
                systemd_unit: j.unit.clone(),
                ..Default::default()
            });
            undo.version = j.to.clone();
            let step = j.step;
            let (verdict, outcome) = match (step, wanted) {
                (Step::RollingBack, _) => {
                    let reason = j.reason.clone();
                    ("rolled back", self.rollback(&undo, j, reason, true, log).await)
                }
                (Step::Begun, Some(spec)) if !at_target => {
                    // Nothing was changed yet: start the same transition again.
                    self.clear_journal(&spec.name);
                    let o = self.apply_one(spec, installed, false, log).await;
                    ("resumed", o)
                }
                (_, Some(spec)) if at_target || !j.package_changes => {
                    let spec = spec.clone();
                    ("resumed", self.finish(&spec, j, log).await)
                }
                _ => {
                    let reason = format!("interrupted at step {step:?} and the desired state no longer asks for it");
                    ("rolled back", self.rollback(&undo, j, reason, false, log).await)
                }
            };
            let msg = format!("the agent restarted during a change of {name} (step {step:?}): {verdict}");
            log(format!("{name}: {msg}"));
            out.push((name, outcome));
            self.findings.push(
                Finding::temporary(
                    SOURCE,
                    "ComponentChangeInterrupted",
                    msg,
                    Class::new(Severity::Warning, Category::Component, RecommendedAction::None),
                )
                .with("verdict", verdict),
            );
        }
        out
    }

    /// The `restart component` command: restart its unit and check its health.
    pub async fn restart(&mut self, spec: &ComponentSpec) -> Result<String, String> {
        if spec.systemd_unit.is_empty() {
            return Err(format!("{} has no systemd unit to restart", spec.name));
        }
        self.unit(&spec.systemd_unit, "restart", self.timeout(spec)).await?;
        self.verify(spec).await?;
        Ok(format!("{} restarted and healthy", spec.systemd_unit))
    }
}

fn v_name(v: Verb) -> &'static str {
    match v {
        Verb::Install => "install",
        Verb::Upgrade => "upgrade",
        Verb::Downgrade => "downgrade",
        Verb::Reinstall => "reinstall",
        Verb::Remove => "remove",
    }
}

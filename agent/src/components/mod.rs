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
mod files;
mod lock;
mod recovery;
pub mod rpm;
pub mod spec;
mod steps;
pub mod version;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{
    Category, ComponentPhase, ComponentSpec, ComponentStatus, ConditionStatus, RecommendedAction, RestartPolicy,
    Severity,
};
use serde::{Deserialize, Serialize};

use crate::monitor::{Class, Finding};
use files::Backup;
pub(crate) use files::write_atomic;
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
    /// A command prefix for changes of the rpm database (see `Tools::with_runner`).
    pub transaction_runner: Vec<String>,
    /// Keep the components' packages out of every other dnf run on the node ([`lock`]).
    pub version_lock: bool,
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
    /// The component's other packages (`with_packages`), moved in the same transaction.
    #[serde(default)]
    with_packages: Vec<Move>,
}

/// One package of a change: the version it had (None: not installed) and the one it goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Move {
    package: String,
    from: Option<String>,
    to: String,
}

impl Journal {
    /// Every package the change moves, the component's own first.
    fn moves(&self) -> Vec<Move> {
        let own = Move { package: self.package.clone(), from: self.from.clone(), to: self.to.clone() };
        std::iter::once(own).chain(self.with_packages.iter().cloned()).collect()
    }
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

/// The locked packages, for a log line.
fn lock_summary(locked: &std::collections::BTreeSet<String>) -> String {
    if locked.is_empty() {
        "no packages locked".into()
    } else {
        format!("{} kept out of other dnf runs", locked.iter().cloned().collect::<Vec<_>>().join(", "))
    }
}

/// `<Title>UpgradeFailed`, the condition a rollback opens.
pub fn failed_condition(name: &str) -> String {
    format!("{}UpgradeFailed", crate::monitor::components::title(name))
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
        .with_runner(s.transaction_runner.clone(), s.systemctl.clone());
        let tools = if s.version_lock {
            let lock = lock::VersionLock::new(
                tools.dnf_conf.clone(),
                tools.dnf_conf_fallback.clone(),
                s.state_dir.join("components/locked.json"),
            );
            tools.with_version_lock(lock)
        } else {
            tools
        };
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
            self.lock_versions(specs, log);
            return Vec::new();
        }
        let packages: Vec<&str> =
            specs.iter().flat_map(spec::packages).filter(|p| version::package_name(p).is_ok()).collect();
        let unreadable = |m: &mut Manager, e: ToolError| {
            let msg = format!("cannot read the installed packages: {e}");
            for s in specs {
                m.set(s, None, ComponentPhase::Failed, &msg, None);
            }
            specs.iter().map(|s| (s.name.clone(), Outcome::Failed(msg.clone()))).collect()
        };
        let versions = match self.tools.versions(&packages).await {
            Ok(v) => v,
            Err(e) => return unreadable(self, e),
        };
        // The whole spec first: a spec with any defect changes nothing, for no component.
        if let Err(msg) = self.check(specs) {
            log(msg.clone());
            for s in specs {
                let newest = versions.get(&s.package).and_then(|v| v.last());
                self.set(s, newest, ComponentPhase::Failed, &msg, None);
            }
            return specs.iter().map(|s| (s.name.clone(), Outcome::Invalid(msg.clone()))).collect();
        }
        self.lock_versions(specs, log);
        let (installed, unrepaired) = match self.installed_repaired(specs, &packages, &versions, log).await {
            Ok(i) => i,
            Err(e) => return unreadable(self, e),
        };
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
                (None, Some(first)) if !self.settled(spec, &installed) => {
                    let e = format!("not changed: it comes after {first}, which has not converged");
                    log(format!("{}: {e}", spec.name));
                    self.set(spec, current.as_ref(), ComponentPhase::Pending, &e, None);
                    Outcome::Pending(e)
                }
                _ => self.apply_one(spec, &installed, false, log).await,
            };
            out.push((spec.name.clone(), o));
        }
        out
    }

    /// The version lock on the packages of the present components (and on no others).
    fn lock_versions(&self, specs: &[ComponentSpec], log: &mut (dyn FnMut(String) + Send)) {
        let Some(lock) = &self.tools.version_lock else { return };
        let locked = specs.iter().filter(|s| !s.absent).flat_map(spec::packages).map(str::to_owned).collect();
        match lock.set(&locked) {
            Ok(false) => {}
            Ok(true) => log(format!("version lock: {}", lock_summary(&locked))),
            Err(e) => log(format!("cannot lock the components' versions: {e}")),
        }
    }

    /// Whether `spec` is at its desired state already (nothing for a pass to change).
    fn settled(&self, spec: &ComponentSpec, installed: &HashMap<String, Evr>) -> bool {
        match spec::validate(spec, &self.s.config_roots) {
            Ok(Some(_)) => {
                let targets = spec::targets(spec).unwrap_or_default();
                targets.iter().all(|t| installed.get(&t.package) == Some(&t.evr)) && self.drift(spec).is_empty()
            }
            Ok(None) => spec::packages(spec).iter().all(|p| !installed.contains_key(*p)),
            Err(_) => false,
        }
    }

    /// Brings one component to its spec. `reinstall`: even if it looks converged (and even if
    /// this version was rolled back before). `installed`: at least the component's packages.
    pub async fn apply_one(
        &mut self,
        spec: &ComponentSpec,
        installed: &HashMap<String, Evr>,
        reinstall: bool,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Outcome {
        let own = installed.get(&spec.package).cloned();
        let target = match spec::validate(spec, &self.s.config_roots) {
            Ok(Some(t)) => t,
            Ok(None) => return self.remove(spec, installed, log).await,
            Err(e) => {
                log(format!("{}: invalid spec, nothing changed: {e}", spec.name));
                self.set(spec, own.as_ref(), ComponentPhase::Failed, &e, None);
                return Outcome::Invalid(e);
            }
        };
        if !reinstall && self.rejected.get(&spec.name) == Some(&fingerprint(spec)) {
            let e = self.status.get(&spec.name).map(|s| s.last_error.clone()).filter(|e| !e.is_empty()).unwrap_or_else(
                || format!("version {} was rolled back; set another version or reinstall", spec.version),
            );
            self.set(spec, own.as_ref(), ComponentPhase::Failed, &e, None);
            return Outcome::Failed(e);
        }
        let drift = self.drift(spec);
        // Each package where it is and where it goes; a reinstall moves all of them when all are
        // at their versions already, else the ones that differ.
        let moves: Vec<(spec::Target, Option<Evr>, Option<Verb>)> = spec::targets(spec)
            .unwrap_or_default()
            .into_iter()
            .map(|t| {
                let from = installed.get(&t.package).cloned();
                let verb = Verb::between(from.as_ref(), &t.evr);
                (t, from, verb)
            })
            .collect();
        let reinstalling = reinstall && moves.iter().all(|(_, _, v)| v.is_none());
        let moving: Vec<_> = moves.iter().filter(|(_, _, v)| reinstalling || v.is_some()).collect();
        let verb =
            if reinstalling { Some(Verb::Reinstall) } else { Verb::combined(moving.iter().filter_map(|(_, _, v)| *v)) };
        if verb.is_none() && drift.is_empty() {
            self.set(spec, own.as_ref(), ComponentPhase::Converged, "", None);
            return Outcome::Converged { changed: false };
        }
        let what = match verb {
            Some(_) => moving
                .iter()
                .map(|(t, from, v)| match (from, v) {
                    (Some(f), Some(v)) => format!("{} {} from {f} to {}", v_name(*v), t.package, t.evr),
                    (Some(f), None) => format!("reinstall {} {f}", t.package),
                    (None, _) => format!("install {} {}", t.package, t.evr),
                })
                .collect::<Vec<_>>()
                .join(", "),
            None => format!("repair config {}", drift.join(", ")),
        };
        log(format!("{}: {what}", spec.name));
        let mut j = Journal {
            component: spec.name.clone(),
            package: spec.package.clone(),
            step: Step::Begun,
            from: own.as_ref().map(Evr::to_string),
            to: target.to_string(),
            package_changes: verb.is_some(),
            unit: spec.systemd_unit.clone(),
            backups: self.backups(spec),
            reason: String::new(),
            with_packages: moves
                .iter()
                .skip(1)
                .map(|(t, from, _)| Move {
                    package: t.package.clone(),
                    from: from.as_ref().map(Evr::to_string),
                    to: t.evr.to_string(),
                })
                .collect(),
        };
        if let Err(e) = self.write_journal(&j) {
            self.set(spec, own.as_ref(), ComponentPhase::Failed, &e, None);
            return Outcome::Failed(e);
        }
        self.set(spec, own.as_ref(), ComponentPhase::Installing, "", None);
        if let Err(e) = self.hook(&spec.pre_hook, "pre-hook", self.timeout(spec)).await {
            log(format!("{}: {e}; nothing changed", spec.name));
            self.clear_journal(&spec.name);
            self.set(spec, own.as_ref(), ComponentPhase::Failed, &e, None);
            return Outcome::Failed(e);
        }
        if let Some(v) = verb {
            let packages: Vec<(&str, &Evr)> = moving.iter().map(|(t, _, _)| (t.package.as_str(), &t.evr)).collect();
            if let Err(e) = self.tools.transaction(v, &packages, &spec.repositories, self.timeout(spec)).await {
                let e = e.to_string();
                log(format!("{}: {e}; nothing changed", spec.name));
                self.clear_journal(&spec.name);
                self.set(spec, own.as_ref(), ComponentPhase::Failed, &e, None);
                return Outcome::Failed(e);
            }
            let done: Vec<String> = packages.iter().map(|(p, evr)| format!("{p} {evr}")).collect();
            log(format!("{}: {} installed", spec.name, done.join(", ")));
        }
        j.step = Step::Installed;
        if let Err(e) = self.write_journal(&j) {
            return self.rollback(spec, j, e, true, log).await;
        }
        self.finish(spec, j, log).await
    }

    /// An absent component: its unit stopped and its packages removed, if installed.
    async fn remove(
        &mut self,
        spec: &ComponentSpec,
        installed: &HashMap<String, Evr>,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Outcome {
        let present: Vec<(&str, &Evr)> =
            spec::packages(spec).into_iter().filter_map(|p| installed.get(p).map(|evr| (p, evr))).collect();
        let own = installed.get(&spec.package);
        if present.is_empty() {
            self.set(spec, None, ComponentPhase::Converged, "", Some(false));
            return Outcome::Converged { changed: false };
        }
        let listed: Vec<String> = present.iter().map(|(p, evr)| format!("{p} {evr}")).collect();
        log(format!("{}: remove {}", spec.name, listed.join(", ")));
        self.set(spec, own, ComponentPhase::Installing, "", None);
        let timeout = self.timeout(spec);
        let steps = async {
            if !spec.systemd_unit.is_empty() {
                let argv = vec![self.s.systemctl.display().to_string(), "stop".into(), spec.systemd_unit.clone()];
                self.exec(&argv, timeout, &format!("stopping {}", spec.systemd_unit)).await?;
            }
            self.hook(&spec.pre_hook, "pre-hook", timeout).await?;
            self.tools
                .transaction(Verb::Remove, &present, &spec.repositories, timeout)
                .await
                .map_err(|e| e.to_string())?;
            self.hook(&spec.post_hook, "post-hook", timeout).await
        };
        match steps.await {
            Ok(()) => {
                log(format!("{}: removed", spec.name));
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
        let mut result: Result<(), String> = Ok(());
        if j.package_changes {
            result = self.packages_back(spec, &j.moves()).await;
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

    /// Every package of a change back at the version it had: the ones it had, in one
    /// transaction, then the ones it did not have removed.
    async fn packages_back(&self, spec: &ComponentSpec, moves: &[Move]) -> Result<(), String> {
        let names: Vec<&str> = moves.iter().map(|m| m.package.as_str()).collect();
        let now = self.tools.installed(&names).await.map_err(|e| e.to_string())?;
        let (mut back, mut gone) = (Vec::new(), Vec::new());
        for m in moves {
            let from = m.from.as_deref().and_then(|f| Evr::parse(f).ok());
            match (from, now.get(&m.package)) {
                (Some(f), i) if i != Some(&f) => back.push((m.package.as_str(), Verb::between(i, &f), f)),
                (None, Some(i)) => gone.push((m.package.as_str(), i)),
                _ => {}
            }
        }
        if let Some(verb) = Verb::combined(back.iter().filter_map(|(_, v, _)| *v)) {
            let packages: Vec<(&str, &Evr)> = back.iter().map(|(p, _, evr)| (*p, evr)).collect();
            self.tools
                .transaction(verb, &packages, &spec.repositories, self.timeout(spec))
                .await
                .map_err(|e| e.to_string())?;
        }
        if !gone.is_empty() {
            self.tools
                .transaction(Verb::Remove, &gone, &spec.repositories, self.timeout(spec))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
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

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
mod repository;
pub mod rpm;
pub mod spec;
mod steps;
mod transition;
pub mod version;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{Category, ComponentPhase, ComponentSpec, ComponentStatus, RecommendedAction, Severity};
use serde::{Deserialize, Serialize};

use crate::monitor::{Class, Finding};
use files::Backup;
pub(crate) use files::write_atomic;
use rpm::{ToolError, Tools};
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

//! After an interruption rpm's record is the truth: waiting for a transaction an earlier run
//! left going, one recorded version per package, files that verify (reinstalled when they do
//! not), then the journal's change resumed or rolled back. The same verification runs over
//! converged components every `verify_interval`.

use std::collections::HashMap;
use std::time::Instant;

use nodekeeper_proto::v1::{Category, ComponentSpec, RecommendedAction, Severity};

use super::rpm::{ToolError, Verb};
use super::version::Evr;
use super::{Journal, Manager, Outcome, SOURCE, Step};
use crate::monitor::{Class, Finding};

impl Manager {
    /// The installed version of each package (`versions`: as rpm records them), after repairing
    /// any package that rpm records more than once (a transaction cut short outside the
    /// journal's knowledge), and the components whose repair failed: a pass never calls
    /// converged what rpm disagrees with.
    pub(super) async fn installed_repaired(
        &mut self,
        specs: &[ComponentSpec],
        packages: &[&str],
        versions: &HashMap<String, Vec<Evr>>,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Result<(HashMap<String, Evr>, HashMap<String, String>), ToolError> {
        let doubled: Vec<&ComponentSpec> =
            specs.iter().filter(|s| versions.get(&s.package).is_some_and(|v| v.len() > 1)).collect();
        let mut unrepaired = HashMap::new();
        let doubled_any = !doubled.is_empty();
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
        let installed = if doubled_any {
            self.tools.installed(packages).await?
        } else {
            versions.iter().filter_map(|(p, v)| v.last().map(|e| (p.clone(), e.clone()))).collect()
        };
        Ok((installed, unrepaired))
    }

    /// Every `verify_interval`, the converged components' files checked against rpm, and
    /// reinstalled where they do not verify.
    pub(super) async fn verify_if_due(
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

    /// After a restart: finishes or undoes every transition a journal says was under way. A
    /// transition is resumed when the package is where the journal says and the desired state
    /// still wants it; otherwise it is rolled back.
    /// Makes rpm's record of `package` true again after a transaction was cut short: one version
    /// recorded (`keep` when it is among them, else the newest), and its files as rpm has them
    /// (reinstalled from `spec`'s repositories when they do not verify). Returns what it repaired.
    pub(super) async fn repair(&mut self, spec: &ComponentSpec, keep: Option<&Evr>) -> Result<Vec<String>, String> {
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
            let repositories =
                specs.iter().find(|s| s.package == j.package).map(|s| s.repositories.clone()).unwrap_or_default();
            let recorded =
                ComponentSpec { name: name.clone(), package: j.package.clone(), repositories, ..Default::default() };
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
}

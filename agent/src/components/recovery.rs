//! After an interruption rpm's record is the truth: waiting for a transaction an earlier run
//! left going, one recorded version per package, files that verify (reinstalled when they do
//! not), then the journal's change resumed or rolled back. The same verification runs over
//! converged components every `verify_interval`.

use std::collections::HashMap;
use std::time::Instant;

use nodekeeper_proto::v1::{Category, ComponentSpec, RecommendedAction, Severity};

use super::rpm::{ToolError, Verb};
use super::spec;
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
        let mut unrepaired = HashMap::new();
        let mut doubled_any = false;
        for spec in specs {
            let targets = spec::targets(spec).unwrap_or_default();
            for package in spec::packages(spec) {
                if versions.get(package).is_none_or(|v| v.len() <= 1) {
                    continue;
                }
                doubled_any = true;
                let keep = targets.iter().find(|t| t.package == package).map(|t| &t.evr);
                match self.repair(spec, package, keep).await {
                    Ok(done) => done.iter().for_each(|d| log(format!("{}: repaired: {d}", spec.name))),
                    Err(e) => {
                        let e = format!("rpm records several versions of {package} and the repair failed: {e}");
                        log(format!("{}: {e}", spec.name));
                        unrepaired.insert(spec.name.clone(), e);
                    }
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
        for spec in specs {
            let Some(targets) = spec::targets(spec) else { continue };
            if targets.iter().any(|t| installed.get(&t.package) != Some(&t.evr)) {
                continue;
            }
            for t in &targets {
                match self.repair(spec, &t.package, Some(&t.evr)).await {
                    Ok(done) => done.iter().for_each(|d| log(format!("{}: repaired: {d}", spec.name))),
                    Err(e) => log(format!("{}: cannot verify or repair the files of {}: {e}", spec.name, t.package)),
                }
            }
        }
    }

    /// Makes rpm's record of `package` (one of `spec`'s) true again after a transaction was cut
    /// short: one version recorded (`keep` when it is among them, else the newest), and its files
    /// as rpm has them (reinstalled from `spec`'s repositories when they do not verify). Returns
    /// what it repaired.
    pub(super) async fn repair(
        &mut self,
        spec: &ComponentSpec,
        package: &str,
        keep: Option<&Evr>,
    ) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        let versions = self.tools.versions(&[package]).await.map_err(|e| e.to_string())?;
        let versions = versions.get(package).cloned().unwrap_or_default();
        let Some(newest) = versions.last().cloned() else { return Ok(done) };
        let kept = keep.filter(|k| versions.contains(k)).cloned().unwrap_or(newest);
        for v in versions.iter().filter(|v| **v != kept) {
            self.tools.forget(package, v).await.map_err(|e| e.to_string())?;
            done.push(format!(
                "removed the record of {package} {v} that an interrupted transaction left beside {kept}"
            ));
        }
        let failing = self.tools.verify(package).await.map_err(|e| e.to_string())?;
        if !failing.is_empty() {
            self.tools
                .transaction(Verb::Reinstall, &[(package, &kept)], &spec.repositories, self.timeout(spec))
                .await
                .map_err(|e| format!("reinstalling {package} {kept}, whose files do not verify: {e}"))?;
            done.push(format!("reinstalled {package} {kept}: {} did not verify", failing.join("; ")));
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

    /// After a restart: finishes or undoes every transition a journal says was under way. A
    /// transition is resumed when the packages are where the journal says and the desired state
    /// still wants them; otherwise it is rolled back.
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
            let moves = j.moves();
            for m in &moves {
                let to = Evr::parse(&m.to).ok();
                match self.repair(&recorded, &m.package, to.as_ref()).await {
                    Ok(done) => done.iter().for_each(|d| log(format!("{name}: repaired: {d}"))),
                    Err(e) => log(format!("{name}: cannot repair rpm's record of {}: {e}", m.package)),
                }
            }
            let names: Vec<&str> = moves.iter().map(|m| m.package.as_str()).collect();
            let installed = self.tools.installed(&names).await.unwrap_or_default();
            let at_target =
                moves.iter().all(|m| installed.get(&m.package).map(Evr::to_string).as_deref() == Some(m.to.as_str()));
            let current = specs.iter().find(|s| s.name == j.component);
            // The desired state still asks for the versions the journal was taking it to.
            let wanted = current.filter(|s| {
                let targets = spec::targets(s).unwrap_or_default();
                targets
                    .iter()
                    .map(|t| (t.package.clone(), t.evr.to_string()))
                    .eq(moves.iter().map(|m| (m.package.clone(), m.to.clone())))
            });
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
                    let o = self.apply_one(spec, &installed, false, log).await;
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

//! One component's transition, the typed state machine of the module docs: the change itself
//! (all of the component's packages in one transaction), the steps after it, the health check,
//! and the rollback of everything when a step or the check fails; and the removal of an absent
//! component.

use std::collections::HashMap;
use std::time::Duration;

use nodekeeper_proto::v1::{ComponentPhase, ComponentSpec, ConditionStatus, RecommendedAction, RestartPolicy};

use super::rpm::Verb;
use super::version::Evr;
use super::{Journal, Manager, Move, Outcome, SOURCE, Step, class, failed_condition, fingerprint, spec};
use crate::monitor::Finding;

impl Manager {
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
            // A rolled-back version is no longer desired, and the one desired is in place (a
            // fleet rollback, or a person setting the previous version): the failure is over.
            if self.rejected.remove(&spec.name).is_some() {
                self.save_rejected();
                let at = own.as_ref().map(ToString::to_string).unwrap_or_default();
                self.failure_over(spec, format!("{} is at its desired version {at}", spec.name));
            }
            return Outcome::Converged { changed: false };
        }
        let what = match verb {
            Some(_) => moving
                .iter()
                .map(|(t, from, v)| match (from, v) {
                    (Some(f), Some(v)) => format!("{} {} from {f} to {}", v.as_str(), t.package, t.evr),
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
    pub(super) async fn remove(
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
    pub(super) fn timeout(&self, spec: &ComponentSpec) -> Duration {
        nodekeeper_common::time::from_duration(spec.step_timeout.as_ref()).unwrap_or(self.s.step_timeout)
    }

    /// From Installed on: configs, restart, post-hook, verification; rollback on failure.
    pub(super) async fn finish(
        &mut self,
        spec: &ComponentSpec,
        mut j: Journal,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Outcome {
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
                self.failure_over(spec, format!("{} converged at {}", spec.name, j.to));
                Outcome::Converged { changed: true }
            }
            Err(e) => self.rollback(spec, j, e, true, log).await,
        }
    }

    /// The component's `<Title>UpgradeFailed` condition set False (it converged).
    fn failure_over(&mut self, spec: &ComponentSpec, message: String) {
        let finding = Finding::condition(
            SOURCE,
            &failed_condition(&spec.name),
            ConditionStatus::False,
            "ComponentConverged",
            message,
            class(RecommendedAction::Manual),
        );
        self.findings.push(finding.with("component", &spec.name));
    }

    /// Undoes a transition: the previous package version, the previous config files, a restart.
    /// `reject`: the version failed its checks; do not try it again until the desired state
    /// changes.
    pub(super) async fn rollback(
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
}

//! Running a playbook on a fault's node: its steps in order (isolate, migrate, recover, verify,
//! release, escalate), from where the fault's timeline shows an earlier run got.

use std::time::{Instant, SystemTime};

use nodekeeper_proto::v1::{
    Event, Fault, FaultState, Operation, Reboot, ReinstallComponent, RestartComponent, SendCommandRequest,
    send_command_request,
};

use crate::config::Playbook;
use crate::kube::Kube;

use super::{Remediator, Run, Step, Stop, rpc};

impl Remediator {
    /// Runs the playbook on the fault's node, from where its `timeline` shows an earlier run got.
    pub(crate) async fn remediate(&self, fault: Fault, timeline: &[Event], playbook: Playbook) -> Step<()> {
        let mut run = Run {
            boot_id: fault.boot_id.clone(),
            fault,
            playbook,
            isolate_permit: None,
            reboot_permit: None,
            isolated: false,
            rebooted: false,
            deadline: Instant::now(),
        };
        let Resume { done, planned, isolate_permit, reboot_permit } = Resume::of(timeline, &self.cfg.name);
        if self.cfg.dry_run && planned {
            return Ok(());
        }
        // Held while the node is isolated, released with it.
        run.isolate_permit = isolate_permit;
        run.reboot_permit = reboot_permit.filter(|_| !done.iter().any(|(_, s)| s == "verify"));
        if let Some(kube) = &self.kube {
            run.isolated = kube.isolated_by_us(&run.fault.node).await.unwrap_or(false);
        }
        run.rebooted = done.iter().any(|(_, s)| s == "reboot");
        if run.rebooted {
            // Our reboot happened: the boot to hold to is the node's current one.
            run.boot_id = self.node(&run.fault.node).await?.boot_id;
        }
        let mut next = done.iter().map(|(i, _)| i + 1).max().unwrap_or(0);
        if done.is_empty() {
            self.fresh(&run).await?;
            let attempts = self.attempts(&run.fault).await?;
            if attempts >= self.cfg.budget_attempts {
                let why = format!(
                    "{attempts} remediations of node {} within {}: the budget of {} is spent",
                    run.fault.node,
                    humantime::format_duration(self.cfg.budget_window),
                    self.cfg.budget_attempts
                );
                self.record(&run, usize::MAX, "start", &why, false, FaultState::Unspecified).await?;
                if !run.isolated {
                    let _ = self.isolate(&mut run).await;
                }
                return self.escalate(&run, &why).await;
            }
            let plan = run.playbook.steps.join(" → ");
            self.record(&run, usize::MAX, "start", &format!("playbook: {plan}"), true, FaultState::Unspecified).await?;
            if !self.cfg.dry_run
                && let Some(starts) = self.starts.lock().await.as_mut()
            {
                starts.entry(run.fault.node.clone()).or_default().push((run.fault.id, SystemTime::now()));
            }
            if self.cfg.dry_run {
                for (i, step) in run.playbook.steps.clone().iter().enumerate() {
                    self.record(&run, i, step, "planned", true, FaultState::Unspecified).await?;
                }
                return Ok(());
            }
        }
        while let Some(step) = run.playbook.steps.get(next).cloned() {
            if self.cancel.is_cancelled() {
                return Err(Stop::Shutdown);
            }
            run.deadline = Instant::now() + self.cfg.step_deadline;
            let result = self.step(&mut run, next, &step).await;
            match result {
                Ok(Flow::Next) => next += 1,
                Ok(Flow::Healed) => {
                    // Release if we isolated; otherwise done.
                    match run.playbook.steps.iter().position(|s| s == "release").filter(|_| run.isolated) {
                        Some(r) if r > next => next = r,
                        _ => return Ok(()),
                    }
                }
                Ok(Flow::End) => return Ok(()),
                Err(Stop::Failed(why)) => {
                    self.record(&run, next, &step, &why, false, FaultState::Unspecified).await?;
                    return self.escalate(&run, &why).await;
                }
                Err(Stop::Stale(why)) => {
                    self.record(&run, next, &step, &format!("stopped: {why}"), false, FaultState::Unspecified).await?;
                    if run.isolated {
                        // The node is ours: release it when its gates hold.
                        if let Some(r) = run.playbook.steps.iter().position(|s| s == "release") {
                            run.deadline = Instant::now() + self.cfg.step_deadline;
                            self.step(&mut run, r, "release").await?;
                        }
                    }
                    return Err(Stop::Stale(why));
                }
                Err(Stop::Shutdown) => return Err(Stop::Shutdown),
            }
        }
        let why = "the playbook ran out without healing the node".to_owned();
        self.escalate(&run, &why).await
    }

    async fn step(&self, run: &mut Run, index: usize, step: &str) -> Step<Flow> {
        let node = run.fault.node.clone();
        match step {
            "isolate" => {
                self.fresh(run).await?;
                let msg = self.isolate(run).await?;
                let permit = run.isolate_permit.clone().unwrap_or_default();
                self.record_with(run, index, step, &msg, true, FaultState::Isolated, &[("permit_id", &permit)]).await?;
            }
            "label-pods" => {
                self.fresh(run).await?;
                let kube = self.kube()?;
                let n = kube.label_pods(&node, run.fault.id).await.map_err(|e| Stop::Failed(e.to_string()))?;
                let msg = format!("{n} pods labelled {}=true", crate::kube::MIGRATE_LABEL);
                self.record(run, index, step, &msg, true, FaultState::Unspecified).await?;
            }
            "evict" => {
                self.fresh(run).await?;
                let permit = self.permit(run, Operation::Evict).await?;
                let kube = self.kube()?;
                let mut total = 0;
                loop {
                    let (evicted, held) = kube.evict(&node).await.map_err(|e| Stop::Failed(e.to_string()))?;
                    total += evicted;
                    if held == 0 {
                        break;
                    }
                    tracing::info!(node = %node, held, "a PodDisruptionBudget holds pods back (429); trying again later");
                    self.pause(run).await?;
                }
                self.release_permit(&permit, true).await;
                self.record(run, index, step, &format!("{total} pods evicted"), true, FaultState::Unspecified).await?;
            }
            "wait-migration" => {
                let kube = self.kube()?;
                let until = Instant::now() + self.cfg.migration_timeout;
                let left = loop {
                    let left = kube.pods_left(&node).await.map_err(|e| Stop::Failed(e.to_string()))?;
                    if left == 0 || Instant::now() >= until {
                        break left;
                    }
                    self.pause(run).await?;
                };
                let msg = if left == 0 {
                    "every labelled pod left the node".to_owned()
                } else {
                    format!(
                        "{left} pods still on the node after {}; going on",
                        humantime::format_duration(self.cfg.migration_timeout)
                    )
                };
                self.record(run, index, step, &msg, true, FaultState::Unspecified).await?;
            }
            "reboot" => {
                self.fresh(run).await?;
                let permit = self.permit(run, Operation::Reboot).await?;
                let sent = self.command(run, send_command_request::Action::Reboot(Reboot {}), &permit).await?;
                run.rebooted = true;
                run.reboot_permit = Some(permit.clone());
                let msg = format!("reboot command {sent} sent (permit {permit})");
                self.record_with(run, index, step, &msg, true, FaultState::Recovering, &[("permit_id", &permit)])
                    .await?;
            }
            "restart-component" | "reinstall-component" => {
                self.fresh(run).await?;
                let Some(component) = component_of(&run.fault) else {
                    self.record(
                        run,
                        index,
                        step,
                        "no component named by the fault; skipped",
                        false,
                        FaultState::Unspecified,
                    )
                    .await?;
                    return Ok(Flow::Next);
                };
                let (op, action) = if step == "restart-component" {
                    (
                        Operation::RestartComponent,
                        send_command_request::Action::RestartComponent(RestartComponent {
                            component: component.clone(),
                        }),
                    )
                } else {
                    (
                        Operation::ReinstallComponent,
                        send_command_request::Action::ReinstallComponent(ReinstallComponent {
                            component: component.clone(),
                        }),
                    )
                };
                let permit = self.permit(run, op).await?;
                let sent = self.command(run, action, &permit).await?;
                self.release_permit(&permit, true).await;
                let msg = format!("{step} {component}: command {sent} sent");
                self.record(run, index, step, &msg, true, FaultState::Recovering).await?;
            }
            "hardware-repair" | "reinstall-os" => {
                self.fresh(run).await?;
                let (op, url) = if step == "hardware-repair" {
                    (Operation::HardwareRepair, self.cfg.hardware_repair_webhook.clone())
                } else {
                    (Operation::ReinstallOs, self.cfg.reinstall_os_webhook.clone())
                };
                let url = url.ok_or_else(|| Stop::Failed(format!("{step}: no webhook configured")))?;
                let permit = self.permit(run, op).await?;
                let ticket = self.webhook(&url, run, step).await?;
                let msg = format!("{step} requested: ticket {ticket}");
                self.record_with(
                    run,
                    index,
                    step,
                    &msg,
                    true,
                    FaultState::Recovering,
                    &[("ticket", &ticket), ("permit_id", &permit)],
                )
                .await?;
            }
            "verify" => loop {
                let healed = self.healed(run).await?;
                if let Some(p) = run.reboot_permit.take_if(|_| healed.is_none() || Instant::now() >= run.deadline) {
                    // The reboot is over, one way or the other.
                    self.release_permit(&p, healed.is_none()).await;
                }
                match healed {
                    None => {
                        let msg =
                            if run.rebooted { "the node came back healthy in a new boot" } else { "the fault cleared" };
                        self.record(run, index, step, msg, true, FaultState::Unspecified).await?;
                        return Ok(Flow::Healed);
                    }
                    Some(why) if Instant::now() >= run.deadline => {
                        let msg =
                            format!("not healed within {}: {why}", humantime::format_duration(self.cfg.step_deadline));
                        self.record(run, index, step, &msg, false, FaultState::Unspecified).await?;
                        return Ok(Flow::Next);
                    }
                    Some(_) => self.pause_unbounded().await?,
                }
            },
            "release" => {
                loop {
                    match self.gates(run).await? {
                        None => break,
                        Some(why) if Instant::now() >= run.deadline => {
                            return Err(Stop::Failed(format!("readiness gates did not hold: {why}")));
                        }
                        Some(why) => {
                            tracing::debug!(node = %node, gate = %why, "waiting for the readiness gates");
                            self.pause_unbounded().await?;
                        }
                    }
                }
                let permit = self.permit(run, Operation::Release).await?;
                let released = self.kube()?.release(&node).await.map_err(|e| Stop::Failed(e.to_string()))?;
                self.release_permit(&permit, true).await;
                if let Some(p) = run.isolate_permit.take() {
                    self.release_permit(&p, true).await;
                }
                let msg = match released {
                    crate::kube::Released::Uncordoned => "gates hold: taint removed, node uncordoned".to_owned(),
                    crate::kube::Released::LeftCordoned => {
                        "gates hold: taint removed; left cordoned, as someone else had cordoned it".to_owned()
                    }
                    crate::kube::Released::NotOurs => "not isolated by us: nothing to release".to_owned(),
                };
                run.isolated = false;
                self.record(run, index, step, &msg, true, FaultState::Unspecified).await?;
                return Ok(Flow::End);
            }
            "escalate" => {
                let why = "the playbook escalates this fault".to_owned();
                self.escalate(run, &why).await?;
                return Ok(Flow::End);
            }
            other => return Err(Stop::Failed(format!("unknown step {other:?}"))),
        }
        Ok(Flow::Next)
    }

    fn kube(&self) -> Step<&Kube> {
        self.kube.as_ref().ok_or_else(|| Stop::Failed("no Kubernetes access (dry run without kubeconfig)".into()))
    }

    async fn isolate(&self, run: &mut Run) -> Step<String> {
        let permit = self.permit(run, Operation::Isolate).await?;
        let isolation =
            self.kube()?.isolate(&run.fault.node, run.fault.id).await.map_err(|e| Stop::Failed(e.to_string()))?;
        run.isolate_permit = Some(permit);
        run.isolated = true;
        Ok(match isolation {
            crate::kube::Isolation { already: true, .. } => "already isolated by us".to_owned(),
            crate::kube::Isolation { was_cordoned: true, .. } => {
                format!(
                    "tainted {}:NoSchedule; it was already cordoned by someone else and stays so",
                    crate::kube::TAINT_KEY
                )
            }
            _ => format!("cordoned and tainted {}:NoSchedule", crate::kube::TAINT_KEY),
        })
    }

    async fn escalate(&self, run: &Run, why: &str) -> Step<()> {
        self.record(
            run,
            usize::MAX,
            "escalate",
            &format!("{why}; the node stays isolated for a person"),
            false,
            FaultState::Escalated,
        )
        .await?;
        Err(Stop::Failed(why.to_owned()))
    }

    async fn command(&self, run: &Run, action: send_command_request::Action, permit: &str) -> Step<String> {
        let r = self
            .fleet()
            .send_command(SendCommandRequest {
                cluster: run.fault.cluster.clone(),
                node: run.fault.node.clone(),
                action: Some(action),
                permit_id: permit.to_owned(),
                fault_id: run.fault.id,
            })
            .await
            .map_err(rpc("command"))?;
        Ok(r.into_inner().command_id)
    }

    async fn webhook(&self, url: &str, run: &Run, step: &str) -> Step<String> {
        let body = serde_json::json!({
            "request": step,
            "cluster": run.fault.cluster,
            "node": run.fault.node,
            "fault_id": run.fault.id,
            "fault": run.fault.r#type,
            "message": run.fault.message,
        });
        let r =
            self.http.post(url).json(&body).send().await.map_err(|e| Stop::Failed(format!("{step} webhook: {e}")))?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(Stop::Failed(format!("{step} webhook answered {status}: {}", text.trim())));
        }
        let ticket = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("ticket").map(|t| t.as_str().map(str::to_owned).unwrap_or_else(|| t.to_string())))
            .unwrap_or_else(|| "(none given)".into());
        Ok(ticket)
    }
}

/// How far an earlier run got on a fault.
struct Resume {
    /// Steps done: (index in the playbook, step).
    done: Vec<(usize, String)>,
    /// A dry run planned it already.
    planned: bool,
    /// The isolate and reboot permits it holds.
    isolate_permit: Option<String>,
    reboot_permit: Option<String>,
}

impl Resume {
    /// What a fault's timeline says of an earlier run of the remediator `name`.
    fn of(timeline: &[Event], name: &str) -> Resume {
        let ours: Vec<&Event> = timeline
            .iter()
            .filter(|e| e.r#type == "RemediationStep" && e.origin.as_ref().is_some_and(|o| o.producer == name))
            .collect();
        let planned = ours.iter().any(|e| e.attributes.contains_key("dry_run"));
        let done = ours
            .iter()
            .filter(|e| {
                e.attributes.get("success").is_some_and(|s| s == "true") && !e.attributes.contains_key("dry_run")
            })
            .filter_map(|e| Some((e.attributes.get("index")?.parse().ok()?, e.attributes.get("step")?.clone())))
            .collect();
        let permit_of = |step: &str| {
            ours.iter()
                .rev()
                .find(|e| e.attributes.get("step").is_some_and(|s| s == step))
                .and_then(|e| e.attributes.get("permit_id"))
                .filter(|p| !p.is_empty())
                .cloned()
        };
        Resume { done, planned, isolate_permit: permit_of("isolate"), reboot_permit: permit_of("reboot") }
    }
}

enum Flow {
    Next,
    /// `verify` found the node healed.
    Healed,
    /// The remediation is over.
    End,
}

/// Node components a component fault may name (its type contains the name).
const COMPONENTS: [&str; 3] = ["containerd", "docker", "kubelet"];

/// The component a component fault is about: the one its type names (KubeletUnhealthy,
/// FrequentContainerdRestart).
fn component_of(fault: &Fault) -> Option<String> {
    let kind = fault.r#type.to_ascii_lowercase();
    COMPONENTS.iter().find(|c| kind.contains(*c)).map(|c| (*c).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_faults_name_their_component() {
        let f = |t: &str| Fault { r#type: t.into(), ..Default::default() };
        assert_eq!(component_of(&f("KubeletUnhealthy")).as_deref(), Some("kubelet"));
        assert_eq!(component_of(&f("FrequentContainerdRestart")).as_deref(), Some("containerd"));
        assert_eq!(component_of(&f("KernelDeadlock")), None);
    }
}

//! The component manager inside the running agent: one task owns the [`Manager`], reconciles
//! periodically (with jitter) and whenever the desired state changes, carries out the center's
//! restart and reinstall commands, and publishes every status change for the stream to send.
//!
//! The desired state comes from the center (persisted in state_dir/components/desired.pb, so a
//! restart without the center keeps it) or, when `components.spec_file` is set, from that file.

use std::path::PathBuf;
use std::time::Duration;

use nodekeeper_proto::v1::{Command, CommandResult, ComponentSpec, ComponentStatusReport, DesiredState, command};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Manager, Outcome};
use crate::monitor::state::Reporter;

pub enum Input {
    Desired(DesiredState),
    Command(Command),
}

/// What the connection holds of the component manager.
pub struct Link {
    pub input: mpsc::Sender<Input>,
    pub status: watch::Receiver<ComponentStatusReport>,
    pub results: mpsc::Receiver<CommandResult>,
}

pub struct Driver {
    pub manager: Manager,
    pub reporter: Reporter,
    pub interval: Duration,
    /// A local spec file instead of the center's desired state.
    pub spec_file: Option<PathBuf>,
    pub state_dir: PathBuf,
}

fn log_line(line: String) {
    tracing::info!(target: "nodekeeper_agent::components", "{line}");
}

impl Driver {
    /// Starts the task; returns the link for the connection.
    pub fn spawn(self, cancel: CancellationToken) -> (Link, tokio::task::JoinHandle<()>) {
        let (input_tx, input_rx) = mpsc::channel(16);
        let (status_tx, status_rx) = watch::channel(ComponentStatusReport::default());
        let (results_tx, results_rx) = mpsc::channel(64);
        let task = tokio::spawn(self.run(input_rx, status_tx, results_tx, cancel));
        (Link { input: input_tx, status: status_rx, results: results_rx }, task)
    }

    fn desired_path(&self) -> PathBuf {
        self.state_dir.join("components/desired.pb")
    }

    fn load_desired(&self) -> DesiredState {
        if let Some(f) = &self.spec_file {
            return match super::spec::load(f) {
                Ok(components) => DesiredState { generation: 0, components },
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the local component spec; nothing is reconciled");
                    DesiredState::default()
                }
            };
        }
        std::fs::read(self.desired_path())
            .ok()
            .and_then(|b| DesiredState::decode(b.as_slice()).ok())
            .unwrap_or_default()
    }

    fn save_desired(&self, d: &DesiredState) {
        if let Err(e) = super::write_atomic(&self.desired_path(), &d.encode_to_vec(), 0o600, (None, None)) {
            tracing::error!(error = %e, "cannot store the desired components");
        }
    }

    async fn publish(&mut self, desired: &DesiredState, status: &watch::Sender<ComponentStatusReport>) {
        let findings = std::mem::take(&mut self.manager.findings);
        if !findings.is_empty()
            && let Err(e) = self.reporter.report(findings).await
        {
            tracing::error!(error = %e, "cannot store component findings");
        }
        let report = ComponentStatusReport { components: self.manager.statuses(), generation: desired.generation };
        status.send_if_modified(|old| {
            // Timestamps alone do not make a change worth sending.
            let strip = |r: &ComponentStatusReport| {
                let mut r = r.clone();
                r.components.iter_mut().for_each(|c| c.updated_time = None);
                r
            };
            let changed = strip(old) != strip(&report);
            if changed {
                *old = report.clone();
            }
            changed
        });
    }

    async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        status: watch::Sender<ComponentStatusReport>,
        results: mpsc::Sender<CommandResult>,
        cancel: CancellationToken,
    ) {
        let mut desired = self.load_desired();
        self.manager.recover(&desired.components, &mut log_line).await;
        self.manager.reconcile(&desired.components, &mut log_line).await;
        self.publish(&desired, &status).await;
        let mut delay = crate::monitor::jittered(self.interval);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {
                    delay = crate::monitor::jittered(self.interval);
                    if self.spec_file.is_some() {
                        desired = self.load_desired();
                    }
                    self.manager.reconcile(&desired.components, &mut log_line).await;
                }
                i = input.recv() => match i {
                    None => return,
                    Some(Input::Desired(d)) => {
                        if self.spec_file.is_some() {
                            tracing::warn!("desired components from the center ignored: this agent follows its local spec file");
                            continue;
                        }
                        if d.generation <= desired.generation && !desired.components.is_empty() {
                            continue;
                        }
                        tracing::info!(generation = d.generation, components = d.components.len(), "new desired components");
                        self.save_desired(&d);
                        desired = d;
                        self.manager.reconcile(&desired.components, &mut log_line).await;
                    }
                    Some(Input::Command(cmd)) => {
                        let r = self.command(&cmd, &desired.components).await;
                        let _ = results.send(r).await;
                    }
                },
            }
            self.publish(&desired, &status).await;
        }
    }

    async fn command(&mut self, cmd: &Command, specs: &[ComponentSpec]) -> CommandResult {
        let find = |name: &str| specs.iter().find(|s| s.name == name).cloned();
        let outcome: Result<String, String> = match &cmd.action {
            Some(command::Action::RestartComponent(c)) => match find(&c.component) {
                Some(spec) => self.manager.restart(&spec).await,
                None => Err(format!("no component {:?} is desired on this node", c.component)),
            },
            Some(command::Action::ReinstallComponent(c)) => match find(&c.component) {
                Some(_) if let Err(e) = self.manager.check(specs) => Err(e),
                Some(spec) => match self.manager.tools.installed(&super::spec::packages(&spec)).await {
                    Err(e) => Err(format!("cannot read the installed packages: {e}")),
                    Ok(installed) => match self.manager.apply_one(&spec, &installed, true, &mut log_line).await {
                        Outcome::Converged { .. } => Ok(format!("{} reinstalled at {}", spec.name, spec.version)),
                        Outcome::RolledBack(m) | Outcome::Failed(m) | Outcome::Invalid(m) | Outcome::Pending(m) => {
                            Err(m)
                        }
                    },
                },
                None => Err(format!("no component {:?} is desired on this node", c.component)),
            },
            _ => Err("not supported by this agent version".into()),
        };
        tracing::info!(command_id = %cmd.command_id, issuer = %cmd.issuer, result = ?outcome, "command carried out");
        CommandResult {
            command_id: cmd.command_id.clone(),
            success: outcome.is_ok(),
            message: outcome.unwrap_or_else(|e| e),
            finished_time: Some(nodekeeper_common::time::now_timestamp()),
        }
    }
}

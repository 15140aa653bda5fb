//! The one long-lived stream to the event center.
//!
//! Connect (backoff with jitter between attempts), hello, then: heartbeats on a timer, batches
//! from the outbox with a window of unacknowledged ones, and acknowledgements that delete what
//! they cover. After a reconnect everything still in the outbox is sent again; the center stores
//! each observation once. On shutdown the session flushes: it keeps sending until the outbox is
//! empty and acknowledged, for at most `flush_timeout`, then closes the stream; what is left stays
//! in the outbox for the next start.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_common::backoff::Backoff;
use nodekeeper_common::time as nktime;
use nodekeeper_proto::v1::{
    AgentMessage, CenterMessage, Command, CommandResult, Heartbeat, Hello, Inventory, ObservationBatch, agent_message,
    agent_service_client::AgentServiceClient, center_message, command,
};
use rand::RngExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use nodekeeper_common::systemd;

/// What the rest of the agent can see of the connection.
#[derive(Debug, Default, Clone)]
pub struct ConnState {
    pub connected: bool,
}

pub struct Connection {
    pub config: Arc<Config>,
    pub hello: Hello,
    pub outbox: Outbox,
    pub metrics: Metrics,
    pub state: Arc<Mutex<ConnState>>,
    pub inventory_paths: crate::config::Paths,
    /// The component manager's side of the stream: desired state and commands in, status and
    /// command results out.
    pub components: Option<crate::components::driver::Link>,
    /// When the open session counts as healthy (it was welcomed `HEALTHY_SESSION` before).
    pub healthy_after: Option<tokio::time::Instant>,
    /// Which of the center's addresses the next session tries; a broken session moves on to the
    /// next one (a random start spreads a fleet over the replicas).
    pub address: usize,
}

/// A session welcomed at least this long before it broke was healthy: the next reconnect starts
/// from the shortest delay again. Shorter ones (a center that accepts, then fails) keep growing
/// the delay, so that a crash-looping center is not stormed by its fleet.
const HEALTHY_SESSION: Duration = Duration::from_secs(2);

enum End {
    /// Shutdown requested and handled.
    Shutdown,
    /// The stream broke; reconnect.
    Broken(String),
}

struct InFlight {
    batch_id: u64,
    first: u64,
    last: u64,
    count: u64,
}

impl Connection {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            match self.session(&cancel).await {
                End::Shutdown => return,
                End::Broken(reason) => {
                    self.set_connected(false);
                    let center = self.center().to_owned();
                    self.address = self.address.wrapping_add(1);
                    // A session that stayed up a while was healthy: start again from the shortest delay.
                    if self.healthy_after.take().is_some_and(|t| tokio::time::Instant::now() >= t) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    let stats = self.outbox.stats();
                    tracing::warn!(center = %center, next = %self.center(), error = %reason, retry_in = ?delay, outbox_depth = stats.depth, "connection to the event center lost");
                    systemd::status(&format!(
                        "center unreachable ({reason}); {} observations waiting; retry in {:.1}s",
                        stats.depth,
                        delay.as_secs_f64()
                    ));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// The center address the next (or the open) session uses.
    fn center(&self) -> &str {
        let addresses = nodekeeper_common::tls::center_addresses(&self.config.center);
        addresses.get(self.address % addresses.len().max(1)).copied().unwrap_or(&self.config.center)
    }

    fn set_connected(&self, connected: bool) {
        self.state.lock().expect("state lock").connected = connected;
        self.metrics.connected.set(i64::from(connected));
    }

    async fn session(&mut self, cancel: &CancellationToken) -> End {
        // The component link lives across sessions; lend it to this one.
        let mut link = self.components.take();
        let end = self.session_with(cancel, &mut link).await;
        self.components = link;
        end
    }

    async fn session_with(
        &mut self,
        cancel: &CancellationToken,
        link: &mut Option<crate::components::driver::Link>,
    ) -> End {
        let (components_input, mut components_status, mut components_results) = match link {
            Some(l) => (Some(l.input.clone()), Some(&mut l.status), Some(&mut l.results)),
            None => (None, None, None),
        };
        // Made at every connection: a rotated certificate is used from the next reconnect.
        let endpoint = match nodekeeper_common::tls::endpoint(self.center(), self.config.tls.as_ref()) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20)),
            Err(e) => return End::Broken(e.to_string()),
        };
        let channel = tokio::select! {
            _ = cancel.cancelled() => return End::Shutdown,
            c = endpoint.connect() => match c {
                Ok(c) => c,
                Err(e) => return End::Broken(format!("connect: {e}")),
            },
        };
        self.hello.last_acked_sequence = self.outbox.stats().acked_upto;
        let (tx, rx) = mpsc::channel::<AgentMessage>(self.config.outbox.window + 8);
        let send_hello = tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(self.hello.clone())) });
        if send_hello.await.is_err() {
            return End::Broken("stream closed before hello".into());
        }
        let mut inbound = match AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return End::Broken(format!("session refused: {}", status.message())),
        };
        let center_last = match inbound.message().await {
            Ok(Some(CenterMessage { msg: Some(center_message::Msg::Welcome(w)) })) => {
                tracing::info!(center = %self.center(), center_version = %w.center_version,
                    last_stored_sequence = w.last_stored_sequence, "connected to the event center");
                w.last_stored_sequence
            }
            Ok(_) => return End::Broken("the center did not welcome the hello".into()),
            Err(status) => return End::Broken(format!("hello refused: {}", status.message())),
        };
        let outbox = self.outbox.clone();
        match tokio::task::spawn_blocking(move || outbox.welcomed_blocking(center_last)).await {
            Ok(Ok(Some(after))) => tracing::warn!(
                last_stored_sequence = after,
                "the agent's state was lost: the center holds later observations of this boot; continuing after them"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return End::Broken(format!("taking the welcome: {e}")),
            Err(e) => return End::Broken(format!("welcome task failed: {e}")),
        }
        self.metrics.reconnects.inc();
        self.set_connected(true);
        self.healthy_after = Some(tokio::time::Instant::now() + HEALTHY_SESSION);
        self.report_losses().await;
        systemd::status(&format!("connected to {}", self.center()));
        if let Some(status) = &mut components_status {
            let report = status.borrow_and_update().clone();
            if (!report.components.is_empty() || report.generation > 0)
                && tx.send(AgentMessage { msg: Some(agent_message::Msg::ComponentStatus(report)) }).await.is_err()
            {
                return End::Broken("stream closed".into());
            }
        }

        let mut heartbeat = jittered_interval(self.config.heartbeat_interval);
        let mut inventory_check = jittered_interval(self.config.inventory_interval);
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut sent_upto = 0u64;
        let mut batch_id = 0u64;
        let mut draining: Option<tokio::time::Instant> = None;
        loop {
            // Fill the window from the outbox; while draining for shutdown too, so that the flush
            // sends everything stored, within flush_timeout.
            while in_flight.len() < self.config.outbox.window {
                let batch = match self.outbox.pending(sent_upto, self.config.outbox.batch_size).await {
                    Ok(b) => b,
                    Err(e) => return End::Broken(format!("reading the outbox: {e}")),
                };
                let (Some(first), Some(last)) = (batch.first(), batch.last()) else { break };
                let (first, last, count) = (first.sequence, last.sequence, batch.len() as u64);
                batch_id += 1;
                let msg = agent_message::Msg::Observations(ObservationBatch { batch_id, observations: batch });
                if tx.send(AgentMessage { msg: Some(msg) }).await.is_err() {
                    return End::Broken("stream closed".into());
                }
                self.metrics.sent.inc_by(count);
                sent_upto = last;
                in_flight.push_back(InFlight { batch_id, first, last, count });
            }
            // Nothing in flight after filling the window: the outbox is empty.
            if draining.is_some() && in_flight.is_empty() {
                tracing::info!("outbox flushed; closing the stream");
                return End::Shutdown;
            }
            let drain_deadline = draining.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
            tokio::select! {
                _ = cancel.cancelled(), if draining.is_none() => {
                    tracing::info!(in_flight = in_flight.len(), outbox_depth = self.outbox.stats().depth, "shutting down: flushing the outbox");
                    draining = Some(tokio::time::Instant::now() + self.config.flush_timeout);
                }
                _ = tokio::time::sleep_until(drain_deadline), if draining.is_some() => {
                    tracing::warn!(in_flight = in_flight.len(), "flush timed out; unacknowledged observations stay in the outbox");
                    return End::Shutdown;
                }
                _ = heartbeat.tick() => {
                    let stats = self.outbox.stats();
                    let hb = Heartbeat {
                        time: Some(nktime::now_timestamp()),
                        outbox_depth: stats.depth,
                        outbox_dropped_total: stats.dropped_total,
                    };
                    if tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(hb)) }).await.is_err() {
                        return End::Broken("stream closed".into());
                    }
                }
                _ = inventory_check.tick() => {
                    if let Some(inv) = self.inventory_changed()
                        && tx.send(AgentMessage { msg: Some(agent_message::Msg::Inventory(inv)) }).await.is_err()
                    {
                        return End::Broken("stream closed".into());
                    }
                }
                _ = self.outbox.pushed.notified(), if draining.is_none() => {}
                Some(report) = status_changed(&mut components_status) => {
                    if tx.send(AgentMessage { msg: Some(agent_message::Msg::ComponentStatus(report)) }).await.is_err() {
                        return End::Broken("stream closed".into());
                    }
                }
                Some(result) = command_result(&mut components_results) => {
                    if tx.send(AgentMessage { msg: Some(agent_message::Msg::CommandResult(result)) }).await.is_err() {
                        return End::Broken("stream closed".into());
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(CenterMessage { msg: Some(center_message::Msg::Ack(ack)) })) => {
                        let Some(pos) = in_flight.iter().position(|b| b.batch_id == ack.batch_id) else {
                            tracing::warn!(batch_id = ack.batch_id, "acknowledgement for an unknown batch");
                            continue;
                        };
                        let b = in_flight.remove(pos).expect("position is valid");
                        let refused = !ack.rejected.is_empty();
                        if let Err(e) = self.outbox.ack(b.first, b.last, ack.rejected).await {
                            return End::Broken(format!("deleting acknowledged observations: {e}"));
                        }
                        self.metrics.acked.inc_by(b.count);
                        if refused {
                            self.report_losses().await;
                        }
                    }
                    Ok(Some(CenterMessage { msg: Some(center_message::Msg::Command(cmd)) })) => {
                        let component_command = matches!(
                            cmd.action,
                            Some(command::Action::RestartComponent(_) | command::Action::ReinstallComponent(_))
                        );
                        let reboot = matches!(cmd.action, Some(command::Action::Reboot(_)));
                        match (refusal(&cmd, &self.hello.node), &components_input) {
                            (None, Some(input)) if component_command => {
                                // Carried out by the component manager; its result comes back on `results`.
                                let _ = input.send(crate::components::driver::Input::Command(cmd)).await;
                            }
                            (None, _) if reboot => {
                                let (tx, argv) = (tx.clone(), self.config.reboot_command.clone());
                                tokio::spawn(async move {
                                    let result = run_reboot(&cmd, &argv).await;
                                    let _ = tx.send(AgentMessage { msg: Some(agent_message::Msg::CommandResult(result)) }).await;
                                });
                            }
                            _ => {
                                let result = answer_command(&cmd, &self.hello.node);
                                if tx.send(AgentMessage { msg: Some(agent_message::Msg::CommandResult(result)) }).await.is_err() {
                                    return End::Broken("stream closed".into());
                                }
                            }
                        }
                    }
                    Ok(Some(CenterMessage { msg: Some(center_message::Msg::DesiredState(d)) })) => {
                        match &components_input {
                            Some(input) => {
                                let _ = input.send(crate::components::driver::Input::Desired(d)).await;
                            }
                            None => tracing::warn!("desired components received, but the component manager is disabled"),
                        }
                    }
                    Ok(Some(other)) => {
                        tracing::debug!(message = ?other.msg.map(|m| std::mem::discriminant(&m)), "message from the center not handled by this agent version");
                    }
                    Ok(None) => return End::Broken("the center closed the stream".into()),
                    Err(status) => return End::Broken(format!("{}: {}", status.code().description(), status.message())),
                },
            }
        }
    }

    /// Stores an observation for what the outbox dropped or the center refused since the last
    /// report, if anything.
    async fn report_losses(&self) {
        let outbox = self.outbox.clone();
        match tokio::task::spawn_blocking(move || outbox.report_losses_blocking()).await {
            Ok(Ok((0, 0))) => {}
            Ok(Ok((dropped, rejected))) => {
                tracing::warn!(dropped, rejected, "reporting observations the outbox dropped or the center refused")
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record the outbox's loss counts"),
            Err(e) => tracing::error!(error = %e, "loss report task failed"),
        }
    }

    /// A fresh inventory if it differs from the one the center has.
    fn inventory_changed(&mut self) -> Option<Inventory> {
        let now = crate::identity::inventory(&self.inventory_paths);
        if Some(&now) == self.hello.inventory.as_ref() {
            return None;
        }
        tracing::info!("inventory changed; sending it to the center");
        self.hello.inventory = Some(now.clone());
        Some(now)
    }
}

/// Why a command must be refused: not addressed to this node, a reboot without a permit, no action.
fn refusal(cmd: &Command, node: &str) -> Option<String> {
    if cmd.node != node {
        Some(format!("refused: addressed to node {:?}, this is node {node:?}", cmd.node))
    } else if matches!(cmd.action, Some(command::Action::Reboot(_))) && cmd.permit_id.is_empty() {
        Some("refused: a reboot needs a permit id".to_owned())
    } else if cmd.action.is_none() {
        Some("refused: the command has no action".to_owned())
    } else {
        None
    }
}

/// The next status the component manager published.
async fn status_changed(
    status: &mut Option<&mut tokio::sync::watch::Receiver<nodekeeper_proto::v1::ComponentStatusReport>>,
) -> Option<nodekeeper_proto::v1::ComponentStatusReport> {
    match status {
        Some(s) => match s.changed().await {
            Ok(()) => Some(s.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The next command result of the component manager.
async fn command_result(results: &mut Option<&mut mpsc::Receiver<CommandResult>>) -> Option<CommandResult> {
    match results {
        Some(r) => match r.recv().await {
            Some(r) => Some(r),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The agent's answer to a command it does not carry out: refused unless addressed to this node,
/// and for a reboot unless it carries a permit; a valid command this agent cannot carry out (a
/// component command with the component manager disabled) is answered as unsupported, never
/// dropped.
pub fn answer_command(cmd: &Command, node: &str) -> CommandResult {
    let message = match refusal(cmd, node) {
        Some(r) => {
            tracing::warn!(command_id = %cmd.command_id, issuer = %cmd.issuer, reason = %r, "command refused");
            r
        }
        None => {
            tracing::info!(command_id = %cmd.command_id, issuer = %cmd.issuer, "command not supported by this agent version");
            "not supported by this agent version".to_owned()
        }
    };
    CommandResult {
        command_id: cmd.command_id.clone(),
        success: false,
        message,
        finished_time: Some(nktime::now_timestamp()),
    }
}

/// Carries out a permitted reboot command: runs `argv` (no shell) and answers with its outcome.
/// A real reboot stops the agent soon after; the node comes back with a new boot id.
async fn run_reboot(cmd: &Command, argv: &[String]) -> CommandResult {
    tracing::warn!(command_id = %cmd.command_id, issuer = %cmd.issuer, permit_id = %cmd.permit_id, fault_id = cmd.fault_id, command = ?argv, "rebooting the node");
    let run = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let (success, message) = match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(out)) if out.status.success() => (true, "reboot started".to_owned()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            (false, format!("{} exited with {}: {}", argv[0], out.status, stderr.trim()))
        }
        Ok(Err(e)) => (false, format!("cannot run {}: {e}", argv[0])),
        Err(_) => (false, format!("{} did not finish within 60s", argv[0])),
    };
    if !success {
        tracing::error!(command_id = %cmd.command_id, error = %message, "reboot failed");
    }
    CommandResult { command_id: cmd.command_id.clone(), success, message, finished_time: Some(nktime::now_timestamp()) }
}

/// An interval whose first tick comes after a random part of the period, so that a fleet started
/// together does not tick together.
fn jittered_interval(period: Duration) -> tokio::time::Interval {
    let offset = period.mul_f64(rand::rng().random_range(0.0..1.0));
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{Reboot, RestartComponent};

    fn cmd(node: &str, action: command::Action, permit: &str) -> Command {
        Command {
            command_id: "c1".into(),
            node: node.into(),
            permit_id: permit.into(),
            action: Some(action),
            ..Default::default()
        }
    }

    #[test]
    fn commands_for_another_node_or_reboots_without_permit_are_refused() {
        let restart = command::Action::RestartComponent(RestartComponent { component: "kubelet".into() });
        let r = answer_command(&cmd("node-b", restart.clone(), ""), "node-a");
        assert!(!r.success && r.message.contains("addressed to node \"node-b\""), "{r:?}");
        let r = answer_command(&cmd("node-a", command::Action::Reboot(Reboot {}), ""), "node-a");
        assert!(!r.success && r.message.contains("permit"), "{r:?}");
        let r = answer_command(&cmd("node-a", restart, ""), "node-a");
        assert_eq!(
            (r.success, r.message.as_str(), r.command_id.as_str()),
            (false, "not supported by this agent version", "c1")
        );
    }
}

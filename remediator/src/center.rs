//! What the remediator asks of the center and tells it: permits, the fault's and the node's
//! current state before each step, the readiness gates, the attempt budget, and every step
//! recorded on the fault.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::timestamp_to_unix_ms;
use nodekeeper_proto::v1::{
    AcquirePermitRequest, EventFilter, Fault, FaultState, GetFaultRequest, GetNodeRequest, ListEventsRequest, Liveness,
    Node, Operation, RecordStepRequest, ReleasePermitRequest, event_service_client::EventServiceClient,
    permit_service_client::PermitServiceClient,
};

use super::{Remediator, Run, Starts, Step, Stop, rpc};

impl Remediator {
    /// Asks for a permit until granted or the step's deadline passes.
    pub(crate) async fn permit(&self, run: &Run, op: Operation) -> Step<String> {
        let mut last_reason = String::new();
        loop {
            let r = PermitServiceClient::new(self.ch.clone())
                .acquire_permit(AcquirePermitRequest {
                    operation: op as i32,
                    cluster: run.fault.cluster.clone(),
                    node: run.fault.node.clone(),
                    fault_id: run.fault.id,
                    lease: Some(nodekeeper_common::time::to_duration(self.cfg.step_deadline * 4)),
                })
                .await
                .map_err(rpc("permit"))?
                .into_inner();
            if let Some(p) = r.permit.filter(|_| r.granted) {
                return Ok(p.id);
            }
            if r.denied_reason != last_reason {
                tracing::info!(node = %run.fault.node, operation = op.as_str_name(), reason = %r.denied_reason, "permit denied; asking again");
                last_reason = r.denied_reason;
            }
            if Instant::now() >= run.deadline {
                return Err(Stop::Failed(format!(
                    "no {} permit within the step deadline: {last_reason}",
                    op.as_str_name()
                )));
            }
            self.pause_unbounded().await?;
        }
    }

    pub(crate) async fn release_permit(&self, id: &str, success: bool) {
        if let Err(s) = PermitServiceClient::new(self.ch.clone())
            .release_permit(ReleasePermitRequest { permit_id: id.to_owned(), success })
            .await
        {
            tracing::debug!(permit_id = id, error = %s.message(), "permit not released (expired?)");
        }
    }

    pub(crate) async fn node(&self, name: &str) -> Step<Node> {
        self.fleet()
            .get_node(GetNodeRequest { cluster: self.cfg.cluster.clone(), node: name.to_owned() })
            .await
            .map(|r| r.into_inner())
            .map_err(rpc("node"))
    }

    async fn current_fault(&self, id: u64) -> Step<Fault> {
        self.fleet()
            .get_fault(GetFaultRequest { id })
            .await
            .map_err(rpc("fault"))?
            .into_inner()
            .fault
            .ok_or_else(|| Stop::Stale(format!("fault {id} is gone")))
    }

    /// The fault still open and the node in the boot we expect.
    pub(crate) async fn fresh(&self, run: &Run) -> Step<()> {
        let f = self.current_fault(run.fault.id).await?;
        if matches!(f.state(), FaultState::Resolved | FaultState::Escalated) {
            return Err(Stop::Stale(format!("fault {} is {}", f.id, state_name(f.state()))));
        }
        let node = self.node(&run.fault.node).await?;
        if !run.boot_id.is_empty() && node.boot_id != run.boot_id {
            return Err(Stop::Stale(format!(
                "node {} booted again (boot {} → {})",
                node.name, run.boot_id, node.boot_id
            )));
        }
        Ok(())
    }

    /// None when healed: the fault resolved, the node alive, and in a new boot if we rebooted it.
    pub(crate) async fn healed(&self, run: &Run) -> Step<Option<String>> {
        let f = self.current_fault(run.fault.id).await?;
        let node = self.node(&run.fault.node).await?;
        Ok(if run.rebooted && node.boot_id == run.fault.boot_id {
            Some("the node has not come back in a new boot yet".into())
        } else if node.liveness() != Liveness::Alive {
            Some("the node is not alive".into())
        } else if f.state() != FaultState::Resolved {
            Some(format!("fault {} is still {}", f.id, state_name(f.state())))
        } else {
            None
        })
    }

    /// None when the node's readiness gates hold (the center's: agent connected, components
    /// converged, no open fault, the configured operator conditions True); else the first that
    /// does not and why.
    pub(crate) async fn gates(&self, run: &Run) -> Step<Option<String>> {
        let node = self.node(&run.fault.node).await?;
        Ok(first_failing_gate(&node))
    }

    /// Remediations of the fault's node started within the budget window, this one excluded.
    pub(crate) async fn attempts(&self, fault: &Fault) -> Step<u32> {
        let mut starts = self.starts.lock().await;
        if starts.is_none() {
            *starts = Some(self.load_starts().await?);
        }
        let since = SystemTime::now() - self.cfg.budget_window;
        let of_node = starts.as_ref().and_then(|s| s.get(&fault.node));
        let faults: HashSet<u64> = of_node
            .into_iter()
            .flatten()
            .filter(|(id, at)| *at >= since && *id != fault.id)
            .map(|(id, _)| *id)
            .collect();
        Ok(faults.len() as u32)
    }

    /// Every remediation this remediator started in the cluster, from the center's log.
    async fn load_starts(&self) -> Step<Starts> {
        let mut events = EventServiceClient::new(self.ch.clone());
        let mut after = String::new();
        let mut out = Starts::new();
        loop {
            let r = events
                .list_events(ListEventsRequest {
                    after_cursor: after,
                    filter: Some(EventFilter {
                        clusters: vec![self.cfg.cluster.clone()],
                        types: vec!["RemediationStep".into()],
                        ..Default::default()
                    }),
                    limit: 10_000,
                    ..Default::default()
                })
                .await
                .map_err(rpc("events"))?
                .into_inner();
            for e in &r.events {
                let ours = e.origin.as_ref().is_some_and(|o| o.producer == self.cfg.name);
                let started = e.attributes.get("step").is_some_and(|s| s == "start")
                    && e.attributes.get("success").is_some_and(|s| s == "true")
                    && !e.attributes.contains_key("dry_run");
                if ours && started {
                    let ms = e.time.as_ref().map(timestamp_to_unix_ms).unwrap_or(0).max(0) as u64;
                    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
                    out.entry(e.node.clone()).or_default().push((e.fault_id, at));
                }
            }
            if r.events.is_empty() || r.next_cursor == r.head_cursor {
                return Ok(out);
            }
            after = r.next_cursor;
        }
    }

    pub(crate) async fn record(
        &self,
        run: &Run,
        index: usize,
        step: &str,
        message: &str,
        success: bool,
        state: FaultState,
    ) -> Step<()> {
        self.record_with(run, index, step, message, success, state, &[]).await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn record_with(
        &self,
        run: &Run,
        index: usize,
        step: &str,
        message: &str,
        success: bool,
        state: FaultState,
        extra: &[(&str, &str)],
    ) -> Step<()> {
        let mut attributes: std::collections::HashMap<String, String> =
            extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        if index != usize::MAX {
            attributes.insert("index".into(), index.to_string());
        }
        tracing::info!(node = %run.fault.node, fault_id = run.fault.id, step, success, dry_run = self.cfg.dry_run, "{message}");
        let step_id = format!("{}-{}-{:016x}", run.fault.id, step, rand::random::<u64>());
        self.fleet()
            .record_step(RecordStepRequest {
                step_id,
                fault_id: run.fault.id,
                step: step.to_owned(),
                message: message.to_owned(),
                success,
                state: state as i32,
                dry_run: self.cfg.dry_run,
                attributes,
                producer: self.cfg.name.clone(),
            })
            .await
            .map_err(rpc("record step"))?;
        let outcome = if success { "success" } else { "failure" };
        self.steps.get_or_create(&vec![("step", step.to_owned()), ("outcome", outcome.to_owned())]).inc();
        Ok(())
    }

    /// Waits one poll interval, or fails the step at its deadline.
    pub(crate) async fn pause(&self, run: &Run) -> Step<()> {
        if Instant::now() >= run.deadline {
            return Err(Stop::Failed(format!(
                "step deadline of {} passed",
                humantime::format_duration(self.cfg.step_deadline)
            )));
        }
        self.pause_unbounded().await
    }

    pub(crate) async fn pause_unbounded(&self) -> Step<()> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Stop::Shutdown),
            _ = tokio::time::sleep(self.cfg.poll_interval) => Ok(()),
        }
    }
}

fn state_name(s: FaultState) -> String {
    s.as_str_name().trim_start_matches("FAULT_STATE_").to_ascii_lowercase()
}

/// "<gate>: <why>" of the first gate of the node that does not hold.
pub(crate) fn first_failing_gate(node: &Node) -> Option<String> {
    node.gates.iter().find(|g| !g.holds).map(|g| format!("{}: {}", g.name, g.reason))
}

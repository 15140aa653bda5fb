//! nodekeeper-remediator: a durable subscriber of one cluster's faults that isolates faulty nodes,
//! labels their pods to be migrated, recovers them, releases them when their readiness gates hold,
//! and escalates to people when it cannot heal them.
//!
//! Every step is recorded on the fault (`RecordStep`), which is also where a restarted remediator
//! learns how far it got: the state lives in the center and on the Kubernetes node (our
//! annotations), not in this process. Before each disruptive step the fault must still be open and
//! the node still in the boot the fault saw, so replayed or stale events never act.

pub mod config;
pub mod kube;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_common::time::timestamp_to_unix_ms;
use nodekeeper_proto::v1::{
    AckConsumerRequest, AcquirePermitRequest, ConditionStatus, Event, EventFilter, EventKind, Fault, FaultState,
    GetFaultRequest, GetFaultResponse, GetNodeRequest, ListComponentsRequest, ListConsumersRequest, ListEventsRequest,
    ListFaultsRequest, Liveness, Node, Operation, Reboot, RecordStepRequest, ReinstallComponent, ReleasePermitRequest,
    RestartComponent, SendCommandRequest, StartPosition, SubscribeRequest, event_service_client::EventServiceClient,
    fleet_service_client::FleetServiceClient, permit_service_client::PermitServiceClient, send_command_request,
    subscribe_response,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{Config, Playbook};
use crate::kube::Kube;

/// Remediations started, by node: (fault id, when).
type Starts = HashMap<String, Vec<(u64, SystemTime)>>;

/// Node components a component fault may name (its type contains the name).
const COMPONENTS: [&str; 3] = ["containerd", "docker", "kubelet"];

pub struct Remediator {
    cfg: Config,
    ch: Channel,
    kube: Option<Kube>,
    http: reqwest::Client,
    /// Nodes with a remediation running, and the faults of that node that came in meanwhile
    /// (considered when it ends: one remediation per node at a time, no fault left behind).
    busy: Mutex<HashMap<String, BTreeSet<u64>>>,
    /// Those faults, handed back to the follow loop when their node's remediation ended.
    again: tokio::sync::mpsc::UnboundedSender<u64>,
    again_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<u64>>,
    /// Remediations started, by node: (fault id, when). Read once from the center's log, then
    /// kept up to date here.
    starts: tokio::sync::Mutex<Option<Starts>>,
    cancel: CancellationToken,
    /// Steps by name and outcome, for `/metrics`.
    steps: Family<Vec<(&'static str, String)>, Counter>,
}

/// How a remediation ended, or why a step could not go on.
#[derive(Debug)]
enum Stop {
    /// The fault is no longer what we acted on (resolved, escalated by someone, another boot).
    Stale(String),
    /// Shutting down: the next start resumes from the fault's timeline.
    Shutdown,
    /// A step failed beyond its deadline: escalate.
    Failed(String),
}

type Step<T> = Result<T, Stop>;

fn rpc(what: &str) -> impl FnOnce(tonic::Status) -> Stop + '_ {
    move |s| Stop::Failed(format!("{what}: {}", s.message()))
}

/// One remediation of one node, for the fault that started it.
struct Run {
    fault: Fault,
    playbook: Playbook,
    /// The boot the node must still be in for disruptive steps (the fault's, then the one it came
    /// back in after our reboot).
    boot_id: String,
    isolate_permit: Option<String>,
    /// Held from the reboot until `verify` sees the node back (or gives up).
    reboot_permit: Option<String>,
    isolated: bool,
    rebooted: bool,
    deadline: Instant,
}

impl Remediator {
    pub async fn new(cfg: Config, ch: Channel, cancel: CancellationToken) -> anyhow::Result<Arc<Remediator>> {
        let kube = if cfg.dry_run && cfg.kubeconfig.is_none() {
            None
        } else {
            Some(Kube::connect(cfg.kubeconfig.as_deref(), &cfg.name).await?)
        };
        nodekeeper_common::tls::install_default_provider();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let (again, again_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Arc::new(Remediator {
            cfg,
            ch,
            kube,
            http,
            busy: Mutex::default(),
            again,
            again_rx: tokio::sync::Mutex::new(again_rx),
            starts: Default::default(),
            cancel,
            steps: Family::default(),
        }))
    }

    fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.ch.clone())
    }

    /// Resumes the remediations the center shows in progress, then follows the cluster's events
    /// from the consumer's acknowledged position (reconnecting with backoff) until cancelled.
    /// OpenMetrics text of the remediator's metrics.
    pub fn render_metrics(&self) -> String {
        let mut r = Registry::with_prefix("nodekeeper_remediator");
        r.register("steps", "Remediation steps recorded, by step and outcome (success, failure)", self.steps.clone());
        let active: Gauge = Gauge::default();
        active.set(self.busy.lock().expect("busy lock").len() as i64);
        r.register("active_remediations", "Nodes with a remediation in progress", active);
        nodekeeper_common::metrics::encode(&r)
    }

    pub async fn run(self: Arc<Self>) {
        let mut backoff = nodekeeper_common::backoff::Backoff::default();
        let mut resumed = false;
        while !self.cancel.is_cancelled() {
            match self.clone().follow(&mut resumed).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "subscription ended; resubscribing"),
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn resume(self: &Arc<Self>) -> Result<(), String> {
        let active = [FaultState::Open, FaultState::Isolated, FaultState::Recovering];
        let faults = self
            .fleet()
            .list_faults(ListFaultsRequest {
                clusters: vec![self.cfg.cluster.clone()],
                states: active.iter().map(|s| *s as i32).collect(),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .faults;
        for f in faults {
            self.clone().consider(f.id, false).await;
        }
        // Nodes we isolated whose fault resolved while we were away: still ours to release.
        if let Some(kube) = &self.kube {
            for (node, fault_id) in kube.isolated_nodes().await.map_err(|e| e.to_string())? {
                tracing::info!(node = %node, fault_id, "resuming a node isolated before this start");
                self.clone().consider(fault_id, true).await;
            }
        }
        Ok(())
    }

    /// Subscribes, then (the first time) resumes what the center and the nodes show in progress:
    /// a fault opened in between is in the subscription, none falls between the two.
    async fn follow(self: Arc<Self>, resumed: &mut bool) -> Result<(), String> {
        let mut events = EventServiceClient::new(self.ch.clone());
        // A known consumer resumes where it acknowledged; a new one starts where configured.
        let known = events
            .list_consumers(ListConsumersRequest {})
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .consumers
            .iter()
            .any(|c| c.name == self.cfg.name);
        let start = match (known, self.cfg.start_from.as_str()) {
            (true, _) => StartPosition::Unspecified,
            (false, "oldest") => StartPosition::Oldest,
            (false, _) => StartPosition::Now,
        };
        let mut stream = events
            .subscribe(SubscribeRequest {
                consumer: self.cfg.name.clone(),
                start: start as i32,
                // Faults open with condition events; the rest is looked up when needed.
                filter: Some(EventFilter {
                    clusters: vec![self.cfg.cluster.clone()],
                    kinds: vec![EventKind::Condition as i32],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        if !*resumed {
            self.resume().await?;
            *resumed = true;
        }
        tracing::info!(consumer = %self.cfg.name, cluster = %self.cfg.cluster, "following the cluster's faults");
        // Acknowledged at most once a second (and with each bookmark when idle): a restart replays
        // that much, and a replayed event is harmless (a fault is looked up, never trusted).
        let mut acked = Instant::now();
        let mut again = self.again_rx.lock().await;
        loop {
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                Some(fault_id) = again.recv() => {
                    self.clone().consider(fault_id, false).await;
                    continue;
                }
                m = stream.message() => m.map_err(|s| s.message().to_owned())?,
            };
            let Some(msg) = msg else { return Err("the center ended the stream".into()) };
            let (cursor, idle) = match msg.msg {
                Some(subscribe_response::Msg::Event(e)) => {
                    if e.fault_id != 0 && e.condition.as_ref().is_some_and(|c| c.status() == ConditionStatus::True) {
                        self.clone().consider(e.fault_id, false).await;
                    }
                    (e.cursor, false)
                }
                Some(subscribe_response::Msg::Bookmark(b)) => (b.cursor, true),
                None => continue,
            };
            if idle || acked.elapsed() >= Duration::from_secs(1) {
                events
                    .ack_consumer(AckConsumerRequest { consumer: self.cfg.name.clone(), cursor })
                    .await
                    .map_err(|s| s.message().to_owned())?;
                acked = Instant::now();
            }
        }
    }

    /// Starts remediating the fault's node unless the fault is stale or the node is in hand;
    /// `isolated`: we hold the node isolated for this fault, so it goes on (to its release) even
    /// if the fault is over.
    async fn consider(self: Arc<Self>, fault_id: u64, isolated: bool) {
        let (fault, timeline) = match self.fleet().get_fault(GetFaultRequest { id: fault_id }).await {
            Ok(r) => match r.into_inner() {
                GetFaultResponse { fault: Some(f), events } => (f, events),
                _ => return,
            },
            Err(s) => {
                tracing::warn!(fault_id, error = %s.message(), "cannot read the fault");
                return;
            }
        };
        let wanted = match fault.state() {
            FaultState::Open | FaultState::Isolated | FaultState::Recovering => true,
            FaultState::Resolved => isolated,
            _ => false,
        };
        if !wanted {
            return;
        }
        let Some(playbook) = self.playbook(&fault) else {
            tracing::debug!(fault_id, kind = %fault.r#type, "no playbook for this fault");
            return;
        };
        {
            let mut busy = self.busy.lock().expect("busy lock");
            if let Some(waiting) = busy.get_mut(&fault.node) {
                waiting.insert(fault.id);
                return;
            }
            busy.insert(fault.node.clone(), BTreeSet::new());
        }
        let this = self.clone();
        tokio::spawn(async move {
            let node = fault.node.clone();
            let id = fault.id;
            let outcome = this.remediate(fault, &timeline, playbook).await;
            match &outcome {
                Ok(()) => tracing::info!(node = %node, fault_id = id, "remediation ended"),
                Err(Stop::Stale(why)) => {
                    tracing::info!(node = %node, fault_id = id, reason = %why, "stale fault: nothing done")
                }
                Err(Stop::Shutdown) => {}
                Err(Stop::Failed(why)) => {
                    tracing::warn!(node = %node, fault_id = id, reason = %why, "remediation escalated")
                }
            }
            let waiting = this.busy.lock().expect("busy lock").remove(&node).unwrap_or_default();
            for fault_id in waiting.into_iter().filter(|w| *w != id) {
                // The follow loop considers it (a closed channel: shutting down).
                let _ = this.again.send(fault_id);
            }
        });
    }

    fn playbook(&self, fault: &Fault) -> Option<Playbook> {
        let action = fault
            .action()
            .as_str_name()
            .trim_start_matches("RECOMMENDED_ACTION_")
            .to_ascii_lowercase()
            .replace('_', "-");
        self.cfg.playbook.iter().find(|p| p.types.contains(&fault.r#type) || p.actions.contains(&action)).cloned()
    }

    /// Runs the playbook on the fault's node, from where its `timeline` shows an earlier run got.
    async fn remediate(&self, fault: Fault, timeline: &[Event], playbook: Playbook) -> Step<()> {
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
                let msg = format!("{n} pods labelled {}=true", kube::MIGRATE_LABEL);
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
                    kube::Released::Uncordoned => "gates hold: taint removed, node uncordoned".to_owned(),
                    kube::Released::LeftCordoned => {
                        "gates hold: taint removed; left cordoned, as someone else had cordoned it".to_owned()
                    }
                    kube::Released::NotOurs => "not isolated by us: nothing to release".to_owned(),
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
            kube::Isolation { already: true, .. } => "already isolated by us".to_owned(),
            kube::Isolation { was_cordoned: true, .. } => {
                format!("tainted {}:NoSchedule; it was already cordoned by someone else and stays so", kube::TAINT_KEY)
            }
            _ => format!("cordoned and tainted {}:NoSchedule", kube::TAINT_KEY),
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

    /// Asks for a permit until granted or the step's deadline passes.
    async fn permit(&self, run: &Run, op: Operation) -> Step<String> {
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

    async fn release_permit(&self, id: &str, success: bool) {
        if let Err(s) = PermitServiceClient::new(self.ch.clone())
            .release_permit(ReleasePermitRequest { permit_id: id.to_owned(), success })
            .await
        {
            tracing::debug!(permit_id = id, error = %s.message(), "permit not released (expired?)");
        }
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

    async fn node(&self, name: &str) -> Step<Node> {
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
    async fn fresh(&self, run: &Run) -> Step<()> {
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
    async fn healed(&self, run: &Run) -> Step<Option<String>> {
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

    /// None when the node's readiness gates hold: alive, components converged, no open
    /// condition, and every configured operator condition True.
    async fn gates(&self, run: &Run) -> Step<Option<String>> {
        let node = self.node(&run.fault.node).await?;
        if node.liveness() != Liveness::Alive {
            return Ok(Some("the node is not alive".into()));
        }
        let open: Vec<&str> = node
            .conditions
            .iter()
            .filter_map(|c| c.condition.as_ref())
            .filter(|c| c.status() == ConditionStatus::True && !self.cfg.gate_conditions.contains(&c.r#type))
            .map(|c| c.r#type.as_str())
            .collect();
        if !open.is_empty() {
            return Ok(Some(format!("open conditions: {}", open.join(", "))));
        }
        for gate in &self.cfg.gate_conditions {
            let holds = node
                .conditions
                .iter()
                .filter_map(|c| c.condition.as_ref())
                .any(|c| &c.r#type == gate && c.status() == ConditionStatus::True);
            if !holds {
                return Ok(Some(format!("gate condition {gate} is not True")));
            }
        }
        let components = self
            .fleet()
            .list_components(ListComponentsRequest {
                clusters: vec![node.cluster.clone()],
                nodes: vec![node.name.clone()],
            })
            .await
            .map_err(rpc("components"))?
            .into_inner()
            .nodes;
        if let Some(c) = components.iter().find(|c| c.desired_generation > 0 && !c.converged) {
            return Ok(Some(format!("components not converged to desired generation {}", c.desired_generation)));
        }
        Ok(None)
    }

    /// Remediations of the fault's node started within the budget window, this one excluded.
    async fn attempts(&self, fault: &Fault) -> Step<u32> {
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

    async fn record(
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
    async fn record_with(
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
    async fn pause(&self, run: &Run) -> Step<()> {
        if Instant::now() >= run.deadline {
            return Err(Stop::Failed(format!(
                "step deadline of {} passed",
                humantime::format_duration(self.cfg.step_deadline)
            )));
        }
        self.pause_unbounded().await
    }

    async fn pause_unbounded(&self) -> Step<()> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Stop::Shutdown),
            _ = tokio::time::sleep(self.cfg.poll_interval) => Ok(()),
        }
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

fn state_name(s: FaultState) -> String {
    s.as_str_name().trim_start_matches("FAULT_STATE_").to_ascii_lowercase()
}

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

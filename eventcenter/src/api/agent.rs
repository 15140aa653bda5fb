//! The agent stream: hello, heartbeats, observation batches acknowledged after commit.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_common::time as nktime;
use nodekeeper_proto::v1::{
    Ack, AgentMessage, CenterMessage, ObservationBatch, Origin, Welcome, agent_message, agent_service_server,
    center_message,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use nodekeeper_common::tls::Kind;

use super::{Ctx, deny, store_status, to_event};
use crate::store::{self, Identity, NewEvent, NodeHello, NodeKey};
use crate::validate;

/// How long a new stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches of one stream waiting for their commit at once.
const MAX_IN_FLIGHT: usize = 64;

pub struct AgentApi(pub Ctx);

/// The open agent sessions, by node: where commands for a node are sent.
#[derive(Default)]
pub struct Sessions {
    open: std::sync::Mutex<std::collections::HashMap<NodeKey, (u64, Tx)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Sessions {
    /// The newest session of a node receives its commands.
    fn register(&self, key: NodeKey, tx: Tx) -> u64 {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open.lock().expect("sessions lock").insert(key, (id, tx));
        id
    }

    fn unregister(&self, key: &NodeKey, id: u64) {
        let mut open = self.open.lock().expect("sessions lock");
        if open.get(key).is_some_and(|(i, _)| *i == id) {
            open.remove(key);
        }
    }

    pub(crate) fn sender(&self, key: &NodeKey) -> Option<Tx> {
        self.open.lock().expect("sessions lock").get(key).map(|(_, tx)| tx.clone())
    }

    /// Ends every open stream with `status`: the agents reconnect (elsewhere, given several
    /// addresses) and resend what was not acknowledged.
    pub fn close_all(&self, status: &Status) -> usize {
        let open = self.open.lock().expect("sessions lock");
        open.values().filter(|(_, tx)| tx.try_send(Err(status.clone())).is_ok()).count()
    }
}

/// An action event the center records about a node (commands and their results).
fn action_event(key: &NodeKey, kind: &str, message: String, attributes: Vec<(&str, String)>) -> NewEvent {
    let event = nodekeeper_proto::v1::Event {
        cluster: key.cluster.clone(),
        node: key.node.clone(),
        kind: nodekeeper_proto::v1::EventKind::Action as i32,
        r#type: kind.to_owned(),
        message,
        severity: nodekeeper_proto::v1::Severity::Info as i32,
        category: nodekeeper_proto::v1::Category::Action as i32,
        time: Some(nktime::now_timestamp()),
        origin: Some(Origin { producer: "center".into(), ..Default::default() }),
        source: "eventcenter".into(),
        attributes: attributes.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..Default::default()
    };
    NewEvent::new(Identity::Center, event)
}

/// Sends a command to a connected node, recording it first (FleetService.SendCommand).
pub async fn send_command(
    ctx: &Ctx,
    request: Request<nodekeeper_proto::v1::SendCommandRequest>,
) -> Result<Response<nodekeeper_proto::v1::SendCommandResponse>, Status> {
    use nodekeeper_proto::v1::{Command, command, send_command_request};
    let caller = ctx.caller(&request)?;
    super::require(&caller, super::ACTORS, "send commands to nodes")?;
    let req = request.into_inner();
    validate::name(nodekeeper_common::names::cluster(&req.cluster))?;
    validate::name(nodekeeper_common::names::node(&req.node))?;
    super::require_cluster(&caller, &req.cluster)?;
    let (action, name) = match req.action {
        Some(send_command_request::Action::RestartComponent(c)) => {
            (command::Action::RestartComponent(c), "restart-component")
        }
        Some(send_command_request::Action::ReinstallComponent(c)) => {
            (command::Action::ReinstallComponent(c), "reinstall-component")
        }
        Some(send_command_request::Action::Reboot(r)) => {
            if req.permit_id.is_empty() {
                return Err(Status::failed_precondition(
                    "a reboot needs the id of a permit from the rate-limit center",
                ));
            }
            // The permit must have been granted by this center, for a reboot of this node, and
            // still be active.
            ctx.permits.sync(&ctx.store).await.map_err(store_status)?;
            ctx.permits
                .check(&req.permit_id, nodekeeper_proto::v1::Operation::Reboot, &req.cluster, &req.node)
                .map_err(|e| Status::failed_precondition(format!("reboot refused: {e}")))?;
            (command::Action::Reboot(r), "reboot")
        }
        None => return Err(Status::invalid_argument("no action in the command")),
    };
    let key = NodeKey { cluster: req.cluster, node: req.node };
    let tx = ctx
        .sessions
        .sender(&key)
        .ok_or_else(|| Status::unavailable(format!("node {} of cluster {} is not connected", key.node, key.cluster)))?;
    let issuer =
        caller.as_ref().map_or_else(|| "insecure".to_owned(), |id| format!("{}/{}", id.kind.as_str(), id.name));
    let command_id = format!("{:016x}", rand::random::<u64>());
    let issued = action_event(
        &key,
        "CommandIssued",
        format!("{name} issued by {issuer}"),
        vec![
            ("command_id", command_id.clone()),
            ("action", name.to_owned()),
            ("issuer", issuer.clone()),
            ("permit_id", req.permit_id.clone()),
        ],
    );
    let cursor = ctx.store.append(vec![issued]).await.map_err(store_status)?[0].cursor;
    let cmd = Command {
        command_id: command_id.clone(),
        node: key.node.clone(),
        issuer,
        permit_id: req.permit_id,
        fault_id: req.fault_id,
        deadline: None,
        action: Some(action),
    };
    tx.send(Ok(CenterMessage { msg: Some(center_message::Msg::Command(cmd)) }))
        .await
        .map_err(|_| Status::unavailable("the node's stream closed before the command was sent"))?;
    Ok(Response::new(nodekeeper_proto::v1::SendCommandResponse { command_id, cursor: cursor.to_string() }))
}

type Tx = mpsc::Sender<Result<CenterMessage, Status>>;

struct Session {
    caller: super::Caller,
    _slot: crate::limits::StreamSlot,
    ctx: Ctx,
    key: NodeKey,
    boot_id: String,
    origin: store::OriginKey,
    /// What the hello said, for inventory updates.
    hello: NodeHello,
    tx: Tx,
    in_flight: Arc<Semaphore>,
    /// A batch arrived while the store's disk was within its reserve and was held, unanswered.
    held: std::sync::atomic::AtomicBool,
}

#[tonic::async_trait]
impl agent_service_server::AgentService for AgentApi {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<CenterMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let ctx = self.0.clone();
        let caller = ctx.caller(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message of a stream must be a hello naming the node")),
        };
        validate::hello(&hello)?;
        // A node reports about itself only, in the cluster its certificate names: a wildcard
        // cluster (which a CA outside `nodekeeper certs` might issue) names no node.
        if let Some(id) = &caller
            && (id.kind != Kind::Node || id.name != hello.node || !id.clusters.contains(&hello.cluster))
        {
            return Err(deny(
                id,
                format!(
                    "the {} certificate of {} may not report as node {} in cluster {}",
                    id.kind.as_str(),
                    id.name,
                    hello.node,
                    hello.cluster
                ),
            ));
        }
        let slot = ctx.limits.open_stream(&caller)?;
        let key = NodeKey { cluster: hello.cluster.clone(), node: hello.node.clone() };
        let interval = nktime::from_duration(hello.heartbeat_interval.as_ref());
        let node_hello = NodeHello {
            cluster: hello.cluster.clone(),
            node: hello.node.clone(),
            boot_id: hello.boot_id.clone(),
            agent_version: hello.agent_version.clone(),
            inventory: hello.inventory.clone().unwrap_or_default(),
            labels: hello.labels.clone(),
            heartbeat_interval: interval.unwrap_or(ctx.config.nodes.default_heartbeat_interval),
            status_port: hello.status_port,
            opens_stream: true,
        };
        let outcome = ctx.store.hello(node_hello.clone()).await.map_err(store_status)?;
        ctx.liveness.hello(&key, interval, outcome.was_lost);
        tracing::info!(cluster = %key.cluster, node = %key.node, boot_id = %hello.boot_id,
            agent_version = %hello.agent_version, last_stored_sequence = outcome.last_stored_sequence, "agent connected");

        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT * 2);
        let welcome = Welcome {
            center_version: nodekeeper_common::VERSION.to_owned(),
            last_stored_sequence: outcome.last_stored_sequence,
            grace: Some(nktime::to_duration(ctx.liveness.grace_for(interval))),
        };
        tx.send(Ok(CenterMessage { msg: Some(center_message::Msg::Welcome(welcome)) }))
            .await
            .map_err(|_| Status::cancelled("client went away"))?;
        let session = Session {
            caller,
            _slot: slot,
            origin: store::agent_origin(&key.cluster, &key.node, &hello.boot_id),
            hello: node_hello,
            ctx,
            key,
            boot_id: hello.boot_id,
            tx,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            held: Default::default(),
        };
        let id = session.ctx.sessions.register(session.key.clone(), session.tx.clone());
        // The node's desired components, if any are set.
        if let Err(status) = super::components::push(&session.ctx, &session.key, &outcome.labels).await {
            tracing::warn!(node = %session.key.node, error = %status.message(), "cannot send the desired components");
        }
        tokio::spawn(async move {
            let (sessions, key) = (session.ctx.sessions.clone(), session.key.clone());
            session.run(inbound).await;
            sessions.unregister(&key, id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Session {
    async fn run(self, mut inbound: Streaming<AgentMessage>) {
        let mut disk = self.ctx.store.watch_disk();
        let end = loop {
            let held = self.held.load(std::sync::atomic::Ordering::Relaxed);
            let msg = tokio::select! {
                _ = self.ctx.cancel.cancelled() => break Some(Status::unavailable("event center is shutting down; reconnect and resend unacknowledged batches")),
                _ = self.tx.closed() => break None,
                _ = disk.wait_for(|d| !d.low), if held => {
                    break Some(Status::unavailable("the event center's store has room again; reconnect and resend the held batches"))
                }
                m = inbound.message() => m,
            };
            match msg {
                Ok(Some(m)) => {
                    if let Err(status) = self.handle(m).await {
                        break Some(status);
                    }
                }
                Ok(None) => break None,
                // Undecodable or oversize input, or a broken connection: say why, if anyone listens.
                Err(status) => break Some(status),
            }
        };
        self.ctx.liveness.disconnected(&self.key);
        if let Some(status) = end {
            tracing::info!(node = %self.key.node, code = ?status.code(), reason = status.message(), "closing agent stream");
            // The client may be gone already.
            let _ = self.tx.send(Err(status)).await;
        }
    }

    async fn handle(&self, m: AgentMessage) -> Result<(), Status> {
        match m.msg {
            Some(agent_message::Msg::Heartbeat(hb)) => self.ctx.liveness.heartbeat(&self.key, &hb),
            Some(agent_message::Msg::Observations(batch)) => {
                self.ctx.liveness.seen(&self.key);
                self.batch(batch).await?;
            }
            Some(agent_message::Msg::Inventory(inventory)) => {
                self.ctx.liveness.seen(&self.key);
                let hello = NodeHello { inventory, opens_stream: false, ..self.hello.clone() };
                self.ctx.store.hello(hello).await.map_err(store_status)?;
            }
            Some(agent_message::Msg::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "a stream carries one hello; open a new stream to change identity",
                ));
            }
            Some(agent_message::Msg::CommandResult(r)) => {
                self.ctx.liveness.seen(&self.key);
                let outcome = if r.success { "succeeded" } else { "failed" };
                let message: String =
                    r.message.chars().take(nodekeeper_common::observation::MAX_TEXT_BYTES / 4).collect();
                let event = action_event(
                    &self.key,
                    "CommandResult",
                    format!("command {} {outcome}: {message}", r.command_id),
                    vec![("command_id", r.command_id.chars().take(64).collect()), ("success", r.success.to_string())],
                );
                self.ctx.store.append(vec![event]).await.map_err(store_status)?;
            }
            Some(agent_message::Msg::ComponentStatus(report)) => {
                self.ctx.liveness.seen(&self.key);
                validate::component_status(&report)?;
                use prost::Message;
                self.ctx
                    .store
                    .set_component_status(self.key.clone(), report.encode_to_vec())
                    .await
                    .map_err(store_status)?;
            }
            None => return Err(Status::invalid_argument("empty agent message")),
        }
        Ok(())
    }

    async fn batch(&self, batch: ObservationBatch) -> Result<(), Status> {
        if self.ctx.store.disk().low {
            // Held, not refused: the stream stays open so the node's heartbeats keep it alive,
            // and the agent keeps the batch in its outbox. Once the disk has room the stream is
            // closed, and the agent resends everything unacknowledged.
            self.held.store(true, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        let batch_id = batch.batch_id;
        let validate::Checked { valid, rejected, last } = validate::batch(batch, self.ctx.config.limits.max_batch)?;
        for r in &rejected {
            tracing::warn!(cluster = %self.key.cluster, node = %self.key.node, sequence = r.sequence, reason = %r.reason,
                "observation refused; the rest of its batch is stored");
        }
        let events: Vec<NewEvent> = valid
            .into_iter()
            .map(|o| {
                let sequence = o.sequence;
                let origin = Origin {
                    producer: "agent".into(),
                    boot_id: self.boot_id.clone(),
                    sequence,
                    report_id: String::new(),
                };
                NewEvent::new(
                    Identity::agent(&self.origin, sequence),
                    to_event(&self.key.cluster, &self.key.node, o, origin),
                )
            })
            .collect();
        // Over its rate, the node waits here: it stops reading, and its stream slows down.
        self.ctx.limits.throttle(&self.caller, events.len()).await?;
        let permit = self.in_flight.clone().acquire_owned().await.map_err(|_| Status::internal("session closed"))?;
        // Queued in stream order; acknowledged from a task once committed, so reading continues.
        let committed = self.ctx.store.append_queued(events).await.map_err(store_status)?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let msg = match committed.await {
                Ok(appended) => {
                    let duplicates = appended.iter().filter(|a| a.duplicate).count() as u32;
                    Ok(CenterMessage {
                        msg: Some(center_message::Msg::Ack(Ack {
                            batch_id,
                            stored: appended.len() as u32 - duplicates,
                            duplicates,
                            last_sequence: last,
                            rejected,
                        })),
                    })
                }
                Err(e) => Err(store_status(e)),
            };
            // A closed stream means the agent will resend; nothing is lost.
            let _ = tx.send(msg).await;
            drop(permit);
        });
        Ok(())
    }
}

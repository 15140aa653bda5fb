//! Commands of the `nodekeeper` CLI that talk to an event center.

use nodekeeper_common::backoff::Backoff;
use nodekeeper_proto::v1::{
    Event, EventFilter, GetFaultRequest, ListEventsRequest, ListFaultsRequest, StartPosition, SubscribeRequest,
    event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient, subscribe_response,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::args::{
    BreakerCmd, Cli, Command, ComponentsCmd, ConsumersCmd, EventsCmd, FaultsCmd, Filter, Format, NodesCmd, PermitsCmd,
    RolloutsCmd, StorageCmd,
};
use crate::connect::{channel, explain_failure, status};
use crate::output::{self, enum_name, json_line, table, time};

impl Filter {
    fn to_proto(&self) -> EventFilter {
        EventFilter {
            clusters: self.cluster.clone(),
            nodes: self.node.clone(),
            types: self.types.clone(),
            ..Default::default()
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => return crate::dev::run(args).await,
        Command::Certs(cmd) => return crate::certs::run(cmd),
        _ => {}
    }
    let ch = channel(&cli.server, cli.certs.as_deref(), &cli.identity).await?;
    if let Command::Dashboard { listen } = cli.command {
        let who = if crate::connect::server_url(&cli.server).starts_with("https://") {
            cli.identity
        } else {
            "insecure".into()
        };
        return dashboard(ch, who, listen, nodekeeper_common::shutdown::signal()).await;
    }
    let json = cli.output == Format::Json;
    match call(ch, json, cli.command).await {
        Ok(()) => Ok(()),
        Err(err) => Err(explain_failure(&cli.server, cli.certs.as_deref(), &cli.identity, err).await),
    }
}

/// Serves the dashboard on `listen` (loopback only: it acts with the operator's credentials)
/// until `shutdown`.
pub async fn dashboard(
    ch: Channel,
    identity: String,
    listen: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {listen}: the dashboard acts with your credentials and listens on loopback only; to share it, put an authenticating proxy in front of a loopback one (README)"
        );
    }
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    output::println(&format!("dashboard on http://{listen}/ as {identity}; Ctrl-C stops it"))?;
    nodekeeper_dashboard::serve(ch, identity, listener, shutdown).await?;
    Ok(())
}

async fn call(ch: Channel, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Nodes(NodesCmd::List { cluster, decommissioned }) => {
            crate::nodes::list(ch, json, cluster, decommissioned).await
        }
        Command::Rollouts(cmd) => rollouts(ch, json, cmd).await,
        Command::Nodes(NodesCmd::Show { target }) => crate::nodes::show(ch, json, target).await,
        Command::Nodes(NodesCmd::Delete { target, reason }) => crate::nodes::delete(ch, json, target, reason).await,
        Command::Events(EventsCmd::List { from, limit, filter }) => events_list(ch, json, from, limit, filter).await,
        Command::Events(EventsCmd::Watch { from, bookmarks, filter }) => {
            events_watch(ch, json, from, bookmarks, filter).await
        }
        Command::Faults(FaultsCmd::List { node, types, limit }) => faults_list(ch, json, node, types, limit).await,
        Command::Faults(FaultsCmd::Show { id, types, node }) => faults_show(ch, json, id, types, node).await,
        Command::Consumers(ConsumersCmd::List) => consumers_list(ch, json).await,
        Command::Consumers(ConsumersCmd::Delete { name, owner }) => {
            use nodekeeper_proto::v1::DeleteConsumerRequest;
            EventServiceClient::new(ch)
                .delete_consumer(DeleteConsumerRequest { consumer: name.clone(), owner: owner.unwrap_or_default() })
                .await
                .map_err(status)?;
            output::println(&format!("consumer {name} deleted"))?;
            Ok(())
        }
        Command::Permits(PermitsCmd::List { cluster }) => permits_list(ch, json, cluster).await,
        Command::Freeze { cluster, reason } => {
            use nodekeeper_proto::v1::{FreezeRequest, permit_service_client::PermitServiceClient};
            let cluster = cluster.unwrap_or_default();
            PermitServiceClient::new(ch)
                .freeze(FreezeRequest { cluster: cluster.clone(), reason })
                .await
                .map_err(status)?;
            output::println(&format!("frozen: {}", if cluster.is_empty() { "every cluster" } else { &cluster }))?;
            Ok(())
        }
        Command::Unfreeze { cluster } => {
            use nodekeeper_proto::v1::{UnfreezeRequest, permit_service_client::PermitServiceClient};
            let cluster = cluster.unwrap_or_default();
            PermitServiceClient::new(ch)
                .unfreeze(UnfreezeRequest { cluster: cluster.clone() })
                .await
                .map_err(status)?;
            output::println(&format!("unfrozen: {}", if cluster.is_empty() { "every cluster" } else { &cluster }))?;
            Ok(())
        }
        Command::Breaker(BreakerCmd::Reset { cluster }) => {
            use nodekeeper_proto::v1::{ResetBreakerRequest, permit_service_client::PermitServiceClient};
            PermitServiceClient::new(ch)
                .reset_breaker(ResetBreakerRequest { cluster: cluster.clone() })
                .await
                .map_err(status)?;
            output::println(&format!("breaker of {cluster} reset"))?;
            Ok(())
        }
        Command::Storage(StorageCmd::Force { cluster, target, reason }) => {
            use nodekeeper_proto::v1::{
                Observation, RecordActionsRequest, RecordedAction, report_service_client::ReportServiceClient,
            };
            let now = nodekeeper_common::time::now_timestamp();
            let action = Observation {
                time: Some(now),
                r#type: "StorageAclForced".into(),
                message: format!("{target}: removals held back by the guard let through once: {reason}"),
                severity: nodekeeper_proto::v1::Severity::Warning as i32,
                attributes: [("target".to_owned(), target.clone()), ("reason".to_owned(), reason)].into(),
                source: "cli".into(),
                ..Default::default()
            };
            let action = RecordedAction {
                action_id: format!("storage-force-{target}-{}.{}", now.seconds, now.nanos),
                cluster: cluster.clone(),
                node: String::new(),
                action: Some(action),
            };
            let r = ReportServiceClient::new(ch)
                .record_actions(RecordActionsRequest { producer: String::new(), actions: vec![action] })
                .await
                .map_err(status)?
                .into_inner();
            let cursor = r.results.first().map(|r| r.cursor.as_str()).unwrap_or("");
            output::println(&format!("guard of {target} in cluster {cluster} let through once (event {cursor})"))?;
            Ok(())
        }
        Command::Components(ComponentsCmd::List { node, cluster }) => components_list(ch, json, cluster, node).await,
        Command::Components(ComponentsCmd::Set { cluster, node, selector, file }) => {
            components_set(ch, json, cluster, node, selector, &file).await
        }
        Command::Components(ComponentsCmd::Restart { target, component }) => {
            use nodekeeper_proto::v1::{RestartComponent, send_command_request::Action};
            let action = Action::RestartComponent(RestartComponent { component });
            send_command(ch, json, target.cluster, target.node, action).await
        }
        Command::Components(ComponentsCmd::Reinstall { target, component }) => {
            use nodekeeper_proto::v1::{ReinstallComponent, send_command_request::Action};
            let action = Action::ReinstallComponent(ReinstallComponent { component });
            send_command(ch, json, target.cluster, target.node, action).await
        }
        Command::Dev(_) | Command::Certs(_) | Command::Dashboard { .. } => unreachable!("handled by run"),
    }
}

async fn rollouts(ch: Channel, json: bool, cmd: RolloutsCmd) -> anyhow::Result<()> {
    use crate::rollouts;
    use nodekeeper_proto::v1::RolloutControl;
    match cmd {
        RolloutsCmd::Create { file } => rollouts::create(ch, json, &file).await,
        RolloutsCmd::List { cluster } => rollouts::list(ch, json, cluster).await,
        RolloutsCmd::Show { name } => rollouts::show(ch, json, name).await,
        RolloutsCmd::Pause(a) => rollouts::control(ch, json, a.name, RolloutControl::Pause, a.reason).await,
        RolloutsCmd::Resume(a) => rollouts::control(ch, json, a.name, RolloutControl::Resume, a.reason).await,
        RolloutsCmd::Abort(a) => rollouts::control(ch, json, a.name, RolloutControl::Abort, a.reason).await,
        RolloutsCmd::Rollback(a) => rollouts::control(ch, json, a.name, RolloutControl::Rollback, a.reason).await,
    }
}

pub(crate) fn event_row(e: &Event) -> Vec<String> {
    let condition = e
        .condition
        .as_ref()
        .map(|c| format!("{}={}", c.r#type, enum_name(c.status().as_str_name(), "CONDITION_STATUS_")))
        .unwrap_or_default();
    vec![
        e.cursor.clone(),
        time(e.received_time.as_ref()),
        e.cluster.clone(),
        e.node.clone(),
        e.r#type.clone(),
        enum_name(e.severity().as_str_name(), "SEVERITY_"),
        condition,
        e.message.clone(),
    ]
}

pub(crate) const EVENT_HEADER: [&str; 8] =
    ["CURSOR", "RECEIVED", "CLUSTER", "NODE", "TYPE", "SEVERITY", "CONDITION", "MESSAGE"];

async fn events_list(ch: Channel, json: bool, from: Option<String>, limit: u32, filter: Filter) -> anyhow::Result<()> {
    let resp = EventServiceClient::new(ch)
        .list_events(ListEventsRequest {
            after_cursor: from.unwrap_or_default(),
            filter: Some(filter.to_proto()),
            limit,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    if json {
        return json_line("nodekeeper.v1.ListEventsResponse", &resp);
    }
    table(&EVENT_HEADER, &resp.events.iter().map(event_row).collect::<Vec<_>>())?;
    output::eprintln(&format!("next cursor: {} (head {})", resp.next_cursor, resp.head_cursor))?;
    Ok(())
}

/// Follows events. With `-o json`, one Event per line; with `bookmarks`, every message of the
/// subscription (`{"event": ...}` or `{"bookmark": ...}`) per line.
async fn events_watch(
    ch: Channel,
    json: bool,
    from: Option<String>,
    bookmarks: bool,
    filter: Filter,
) -> anyhow::Result<()> {
    let mut client = EventServiceClient::new(ch);
    let mut after = from;
    let mut backoff = Backoff::default();
    let mut announced = false;
    if !json {
        output::println(&EVENT_HEADER.join("  "))?;
    }
    loop {
        let req = SubscribeRequest {
            after_cursor: after.clone().unwrap_or_default(),
            start: if after.is_some() { StartPosition::Unspecified } else { StartPosition::Now } as i32,
            filter: Some(filter.to_proto()),
            ..Default::default()
        };
        let mut stream = match client.subscribe(req).await {
            Ok(s) => {
                // On stderr, once: the subscription holds its position from here (scripts and
                // people know that what happens now will be shown).
                if !announced {
                    let from = after.as_deref().map(|c| format!("after cursor {c}")).unwrap_or("from now".into());
                    output::eprintln(&format!("following events {from} (Ctrl-C stops)"))?;
                    announced = true;
                }
                s.into_inner()
            }
            Err(s) if s.code() == Code::Unavailable && after.is_some() => {
                reconnect_pause(&mut backoff, &s).await?;
                continue;
            }
            Err(s) => return Err(status(s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    backoff.reset();
                    if json && bookmarks {
                        json_line("nodekeeper.v1.SubscribeResponse", &msg)?;
                    }
                    match msg.msg {
                        Some(subscribe_response::Msg::Event(e)) => {
                            if !json {
                                output::println(&event_row(&e).join("  "))?;
                            } else if !bookmarks {
                                json_line("nodekeeper.v1.Event", &e)?;
                            }
                            after = Some(e.cursor);
                        }
                        Some(subscribe_response::Msg::Bookmark(b)) => after = Some(b.cursor),
                        None => {}
                    }
                }
                Ok(None) => break,
                Err(s) if s.code() == Code::Unavailable || s.code() == Code::Unknown || s.code() == Code::Internal => {
                    reconnect_pause(&mut backoff, &s).await?;
                    break;
                }
                Err(s) => return Err(status(s)),
            }
        }
        if after.is_none() {
            return Ok(());
        }
    }
}

async fn reconnect_pause(backoff: &mut Backoff, s: &Status) -> anyhow::Result<()> {
    let d = backoff.next_delay();
    output::eprintln(&format!("stream interrupted ({}); resuming in {:.1}s", s.message(), d.as_secs_f64()))?;
    tokio::time::sleep(d).await;
    Ok(())
}

async fn faults_list(
    ch: Channel,
    json: bool,
    nodes: Vec<String>,
    types: Vec<String>,
    limit: u32,
) -> anyhow::Result<()> {
    let faults = FleetServiceClient::new(ch)
        .list_faults(ListFaultsRequest { nodes, types, limit, ..Default::default() })
        .await
        .map_err(status)?
        .into_inner()
        .faults;
    if json {
        for f in &faults {
            json_line("nodekeeper.v1.Fault", f)?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = faults
        .iter()
        .map(|f| {
            vec![
                f.id.to_string(),
                f.cluster.clone(),
                f.node.clone(),
                f.r#type.clone(),
                enum_name(f.state().as_str_name(), "FAULT_STATE_"),
                enum_name(f.severity().as_str_name(), "SEVERITY_"),
                f.count.to_string(),
                time(f.first_seen_time.as_ref()),
                time(f.last_seen_time.as_ref()),
                f.message.clone(),
            ]
        })
        .collect();
    table(
        &["ID", "CLUSTER", "NODE", "TYPE", "STATE", "SEVERITY", "COUNT", "FIRST SEEN", "LAST SEEN", "MESSAGE"],
        &rows,
    )?;
    Ok(())
}

/// The fault `id`, or the newest fault of the type and node given.
async fn faults_show(
    ch: Channel,
    json: bool,
    id: Option<u64>,
    kind: Option<String>,
    node: Option<String>,
) -> anyhow::Result<()> {
    let mut client = FleetServiceClient::new(ch);
    let id = match id {
        Some(id) => id,
        None => {
            let req = ListFaultsRequest {
                nodes: node.iter().cloned().collect(),
                types: kind.iter().cloned().collect(),
                limit: 1,
                ..Default::default()
            };
            let newest = client.list_faults(req).await.map_err(status)?.into_inner().faults.into_iter().next();
            let what = [kind.map(|k| format!("of type {k}")), node.map(|n| format!("on node {n}"))];
            let what = what.into_iter().flatten().collect::<Vec<_>>().join(" ");
            newest.ok_or_else(|| status(Status::not_found(format!("no fault {what}"))))?.id
        }
    };
    let resp = client.get_fault(GetFaultRequest { id }).await.map_err(status)?.into_inner();
    if json {
        return json_line("nodekeeper.v1.GetFaultResponse", &resp);
    }
    let f = resp.fault.unwrap_or_default();
    let fields = [
        ("Fault", f.id.to_string()),
        ("Node", format!("{}/{}", f.cluster, f.node)),
        ("Type", f.r#type.clone()),
        ("State", enum_name(f.state().as_str_name(), "FAULT_STATE_")),
        ("Severity", enum_name(f.severity().as_str_name(), "SEVERITY_")),
        ("Action", enum_name(f.action().as_str_name(), "RECOMMENDED_ACTION_")),
        ("Reason", f.reason.clone()),
        ("Message", f.message.clone()),
        ("Count", f.count.to_string()),
        ("Boot id", f.boot_id.clone()),
        ("First seen", time(f.first_seen_time.as_ref())),
        ("Last seen", time(f.last_seen_time.as_ref())),
        ("Resolved", time(f.resolved_time.as_ref())),
        ("Resolution", f.resolution.clone()),
    ];
    output::fields(&fields, 11, &["Resolution"])?;
    output::println("Timeline:")?;
    table(&EVENT_HEADER, &resp.events.iter().map(event_row).collect::<Vec<_>>())?;
    Ok(())
}

async fn components_list(ch: Channel, json: bool, clusters: Vec<String>, nodes: Vec<String>) -> anyhow::Result<()> {
    use nodekeeper_proto::v1::ListComponentsRequest;
    let resp = FleetServiceClient::new(ch)
        .list_components(ListComponentsRequest { clusters, nodes })
        .await
        .map_err(status)?
        .into_inner();
    if json {
        for n in &resp.nodes {
            json_line("nodekeeper.v1.NodeComponents", n)?;
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    for n in &resp.nodes {
        for c in &n.components {
            rows.push(vec![
                n.cluster.clone(),
                n.node.clone(),
                if n.converged { "yes".into() } else { "no".into() },
                c.name.clone(),
                c.desired_version.clone(),
                c.installed_version.clone(),
                enum_name(c.phase().as_str_name(), "COMPONENT_PHASE_"),
                c.last_error.clone(),
            ]);
        }
    }
    table(&["CLUSTER", "NODE", "CONVERGED", "COMPONENT", "DESIRED", "INSTALLED", "PHASE", "LAST ERROR"], &rows)?;
    Ok(())
}

async fn components_set(
    ch: Channel,
    json: bool,
    cluster: String,
    node: Option<String>,
    selector: Option<String>,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    use nodekeeper_proto::v1::{SetDesiredComponentsRequest, set_desired_components_request::Target};
    let components = nodekeeper_agent::components::spec::load(file).map_err(|e| status(Status::invalid_argument(e)))?;
    let target = match (node, selector) {
        (Some(n), _) => Target::Node(n),
        (None, Some(s)) => Target::Selector(s),
        (None, None) => anyhow::bail!("name a --node or a --selector"),
    };
    let resp = FleetServiceClient::new(ch)
        .set_desired_components(SetDesiredComponentsRequest { cluster, target: Some(target), components })
        .await
        .map_err(status)?
        .into_inner();
    if json {
        return json_line("nodekeeper.v1.SetDesiredComponentsResponse", &resp);
    }
    output::println(&format!(
        "desired components set: generation {}, {} nodes matched",
        resp.generation, resp.nodes_matched
    ))?;
    Ok(())
}

async fn send_command(
    ch: Channel,
    json: bool,
    cluster: String,
    node: String,
    action: nodekeeper_proto::v1::send_command_request::Action,
) -> anyhow::Result<()> {
    use nodekeeper_proto::v1::SendCommandRequest;
    let resp = FleetServiceClient::new(ch)
        .send_command(SendCommandRequest { cluster, node, action: Some(action), ..Default::default() })
        .await
        .map_err(status)?
        .into_inner();
    if json {
        return json_line("nodekeeper.v1.SendCommandResponse", &resp);
    }
    output::println(&format!(
        "command {} sent (CommandIssued at cursor {}); its CommandResult event follows",
        resp.command_id, resp.cursor
    ))?;
    Ok(())
}

async fn consumers_list(ch: Channel, json: bool) -> anyhow::Result<()> {
    use nodekeeper_proto::v1::ListConsumersRequest;
    let consumers = EventServiceClient::new(ch)
        .list_consumers(ListConsumersRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .consumers;
    if json {
        for c in &consumers {
            json_line("nodekeeper.v1.Consumer", c)?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = consumers
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.owner.clone(),
                c.acked_cursor.clone(),
                c.lag.to_string(),
                time(c.updated_time.as_ref()),
            ]
        })
        .collect();
    table(&["CONSUMER", "OWNER", "ACKED CURSOR", "LAG", "UPDATED"], &rows)?;
    Ok(())
}

async fn permits_list(ch: Channel, json: bool, clusters: Vec<String>) -> anyhow::Result<()> {
    use nodekeeper_proto::v1::{GetGuardStateRequest, ListPermitsRequest, permit_service_client::PermitServiceClient};
    let mut client = PermitServiceClient::new(ch);
    let permits = client.list_permits(ListPermitsRequest { clusters }).await.map_err(status)?.into_inner().permits;
    let guards = client.get_guard_state(GetGuardStateRequest::default()).await.map_err(status)?.into_inner();
    if json {
        for p in &permits {
            json_line("nodekeeper.v1.Permit", p)?;
        }
        return Ok(());
    }
    if guards.global_frozen {
        output::println("every cluster is FROZEN")?;
    }
    for g in &guards.clusters {
        if g.frozen || g.breaker_tripped {
            let what = if g.breaker_tripped { "BREAKER TRIPPED" } else { "FROZEN" };
            output::println(&format!("cluster {}: {what}: {}", g.cluster, g.reason))?;
        }
    }
    let rows: Vec<Vec<String>> = permits
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.cluster.clone(),
                p.node.clone(),
                enum_name(p.operation().as_str_name(), "OPERATION_"),
                p.holder.clone(),
                time(p.granted_time.as_ref()),
                time(p.lease_expiry_time.as_ref()),
            ]
        })
        .collect();
    table(&["PERMIT", "CLUSTER", "NODE", "OPERATION", "HOLDER", "GRANTED", "LEASE UNTIL"], &rows)?;
    Ok(())
}

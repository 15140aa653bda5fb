//! Commands of the `nodekeeper` CLI.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use nodekeeper_common::backoff::Backoff;
use nodekeeper_proto::v1::{
    Event, EventFilter, GetFaultRequest, ListEventsRequest, ListFaultsRequest, ListNodesRequest, StartPosition,
    SubscribeRequest, event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient,
    subscribe_response,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::output::{self, enum_name, json_line, table, time};

/// Exit codes, as documented in `--help`.
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_NOT_FOUND: u8 = 4;
pub const EXIT_CURSOR_EXPIRED: u8 = 5;
pub const EXIT_INVALID: u8 = 6;

/// The default event center address: where `nodekeeper dev` listens.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7443";

/// nodekeeper: the operators' view of the fleet and its faults.
///
/// Exit codes: 0 success; 1 error reported by the server; 2 bad usage; 3 server unreachable;
/// 4 not found; 5 cursor expired (resume from the oldest event); 6 invalid argument.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper", version)]
pub struct Cli {
    /// Event center address.
    #[arg(long, global = true, env = "NODEKEEPER_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Folder with ca.pem and the identity's certificate and key, for an https:// server
    /// (default: ~/.config/nodekeeper/pki).
    #[arg(long, global = true, env = "NODEKEEPER_CERTS")]
    certs: Option<std::path::PathBuf>,
    /// Which certificate in --certs to present: <identity>.pem and <identity>-key.pem.
    #[arg(long, global = true, env = "NODEKEEPER_IDENTITY", default_value = "admin")]
    identity: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    /// Protobuf's canonical JSON mapping, one object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Nodes known to the event center.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// The event log.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Faults: one problem on one node over its lifetime.
    #[command(subcommand)]
    Faults(FaultsCmd),
    /// Desired components of nodes and what the nodes report.
    #[command(subcommand)]
    Components(ComponentsCmd),
    /// Durable consumers (subscribers' positions) and how far behind they are.
    #[command(subcommand)]
    Consumers(ConsumersCmd),
    /// Permits for risky operations held now.
    #[command(subcommand)]
    Permits(PermitsCmd),
    /// Stop granting permits for disruptive operations (releases stay allowed).
    Freeze {
        /// One cluster; default: every cluster.
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Grant permits again after a freeze.
    Unfreeze {
        #[arg(long)]
        cluster: Option<String>,
    },
    /// The circuit breaker of a cluster.
    #[command(subcommand)]
    Breaker(BreakerCmd),
    /// A small CA for development and small fleets.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Run an event center and an agent for this machine, for a first look.
    Dev {
        /// Plaintext without certificates (otherwise a development CA in <data-dir>/pki is used).
        #[arg(long)]
        insecure: bool,
        /// Where the event center's store and the agent's state live.
        #[arg(long, default_value = ".nodekeeper")]
        data_dir: std::path::PathBuf,
        /// The event center's address.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: std::net::SocketAddr,
        /// The agent's status port.
        #[arg(long, default_value_t = 7444)]
        status_port: u16,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create a CA (ca.pem, ca-key.pem) in the folder.
    Init {
        #[arg(long, default_value = "pki")]
        dir: std::path::PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate (<name>.pem, <name>-key.pem) signed by the folder's CA.
    Issue {
        #[arg(long, default_value = "pki")]
        dir: std::path::PathBuf,
        /// node, detector, subscriber, admin or server.
        #[arg(long)]
        kind: nodekeeper_common::tls::Kind,
        /// The holder's name; for a node, the node name.
        #[arg(long)]
        name: String,
        /// A cluster the holder may act for (repeatable; default: every cluster, not for nodes).
        #[arg(long)]
        cluster: Vec<String>,
        /// A DNS name or IP address the holder serves under (servers; repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// List nodes with their liveness.
    List {
        /// Only nodes of this cluster (repeatable).
        #[arg(long)]
        cluster: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct Filter {
    /// Only events of this node (repeatable).
    #[arg(long)]
    node: Vec<String>,
    /// Only events of this type, e.g. NodeHeartbeatLost (repeatable).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Only events of this cluster (repeatable).
    #[arg(long)]
    cluster: Vec<String>,
}

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

#[derive(Debug, Subcommand)]
enum EventsCmd {
    /// List stored events after a cursor (default: from the oldest).
    List {
        /// Events after this cursor.
        #[arg(long)]
        from: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        filter: Filter,
    },
    /// Follow events as they are stored (from now, or after a cursor). Resumes by itself when the
    /// connection drops.
    Watch {
        /// Events after this cursor; default: from now.
        #[arg(long)]
        from: Option<String>,
        #[command(flatten)]
        filter: Filter,
    },
}

#[derive(Debug, Subcommand)]
enum ConsumersCmd {
    /// Every durable consumer you may see (yours; an admin's: all of its clusters): owner,
    /// acknowledged cursor, lag in events, last acknowledgement.
    List,
    /// Forget a consumer that is gone for good (its position is lost).
    Delete {
        /// The consumer's name, as `consumers list` shows it.
        name: String,
        /// Admins: the owner whose consumer it is (`consumers list` shows it); needed only when
        /// several owners have a consumer of that name.
        #[arg(long)]
        owner: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PermitsCmd {
    /// Active permits, and the freezes and breakers in force.
    List {
        #[arg(long)]
        cluster: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum BreakerCmd {
    /// Reset a tripped breaker: disruptive operations are granted again.
    Reset {
        #[arg(long)]
        cluster: String,
    },
}

#[derive(Debug, Subcommand)]
enum ComponentsCmd {
    /// Each node's components: desired and installed versions, phase, last error; and whether the
    /// node passes the readiness gate "components converged".
    List {
        /// Only this node (repeatable).
        #[arg(long)]
        node: Vec<String>,
        /// Only this cluster (repeatable).
        #[arg(long)]
        cluster: Vec<String>,
    },
    /// Set the desired components of one node or of the nodes a label selector matches, from a
    /// spec file (the format `nodekeeper-agent components apply` reads; see
    /// packaging/components.toml). The nodes converge to it.
    Set {
        #[arg(long)]
        cluster: String,
        /// One node.
        #[arg(long, conflicts_with = "selector", required_unless_present = "selector")]
        node: Option<String>,
        /// Nodes whose labels match, e.g. pool=gpu,zone=a.
        #[arg(long)]
        selector: Option<String>,
        /// The spec file.
        file: std::path::PathBuf,
    },
    /// Restart a component on a node (its unit), then check its health; the result is recorded
    /// as a CommandResult event.
    Restart {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        node: String,
        component: String,
    },
    /// Reinstall a component on a node at its desired version.
    Reinstall {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        node: String,
        component: String,
    },
}

#[derive(Debug, Subcommand)]
enum FaultsCmd {
    /// List faults, newest first.
    List {
        /// Only faults of this node (repeatable).
        #[arg(long)]
        node: Vec<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One fault with its timeline of events.
    Show {
        /// Fault id.
        id: u64,
    },
}

/// Errors carry the gRPC status so that the exit code can say what went wrong.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<tonic::transport::Error>().is_some() {
        return EXIT_UNREACHABLE;
    }
    match err.downcast_ref::<Status>() {
        Some(s) => match s.code() {
            Code::Unavailable => EXIT_UNREACHABLE,
            Code::NotFound => EXIT_NOT_FOUND,
            Code::FailedPrecondition if s.message().starts_with("cursor expired") => EXIT_CURSOR_EXPIRED,
            Code::InvalidArgument => EXIT_INVALID,
            _ => EXIT_ERROR,
        },
        None => EXIT_ERROR,
    }
}

/// Where the CLI looks for its credentials by default.
pub fn default_certs_dir() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    home.join(".config/nodekeeper/pki")
}

async fn channel(server: &str, certs: Option<&std::path::Path>, identity: &str) -> anyhow::Result<Channel> {
    let files = server.starts_with("https://").then(|| {
        let dir = certs.map(std::path::Path::to_path_buf).unwrap_or_else(default_certs_dir);
        nodekeeper_common::tls::TlsFiles::in_dir(&dir, identity)
    });
    let endpoint = nodekeeper_common::tls::endpoint(server, files.as_ref())
        .context("--server and the credentials in --certs")?
        .connect_timeout(Duration::from_secs(5));
    endpoint.connect().await.map_err(|e| {
        anyhow::Error::new(e)
            .context(format!("cannot reach the event center at {server} (is it running? see --server)"))
    })
}

fn status(s: Status) -> anyhow::Error {
    let msg = format!("{}: {}", s.code().description(), s.message());
    anyhow::Error::new(s).context(msg)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev { insecure, data_dir, listen, status_port } => {
            return crate::dev::run(crate::dev::DevArgs { insecure, data_dir, listen, status_port }).await;
        }
        Command::Certs(CertsCmd::Init { dir, days, force }) => return crate::certs::init(&dir, days, force),
        Command::Certs(CertsCmd::Issue { dir, kind, name, cluster, san, days }) => {
            if kind == nodekeeper_common::tls::Kind::Node && (cluster.len() != 1 || cluster[0] == "*") {
                anyhow::bail!("a node certificate names exactly one --cluster");
            }
            let args = crate::certs::IssueArgs { dir, kind, name, clusters: cluster, sans: san, days };
            return crate::certs::issue(&args);
        }
        _ => {}
    }
    let ch = channel(&cli.server, cli.certs.as_deref(), &cli.identity).await?;
    let json = cli.output == Format::Json;
    match cli.command {
        Command::Nodes(NodesCmd::List { cluster }) => nodes_list(ch, json, cluster).await,
        Command::Events(EventsCmd::List { from, limit, filter }) => events_list(ch, json, from, limit, filter).await,
        Command::Events(EventsCmd::Watch { from, filter }) => events_watch(ch, json, from, filter).await,
        Command::Faults(FaultsCmd::List { node, limit }) => faults_list(ch, json, node, limit).await,
        Command::Faults(FaultsCmd::Show { id }) => faults_show(ch, json, id).await,
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
        Command::Components(ComponentsCmd::List { node, cluster }) => components_list(ch, json, cluster, node).await,
        Command::Components(ComponentsCmd::Set { cluster, node, selector, file }) => {
            components_set(ch, json, cluster, node, selector, &file).await
        }
        Command::Components(ComponentsCmd::Restart { cluster, node, component }) => {
            use nodekeeper_proto::v1::{RestartComponent, send_command_request::Action};
            send_command(ch, json, cluster, node, Action::RestartComponent(RestartComponent { component })).await
        }
        Command::Components(ComponentsCmd::Reinstall { cluster, node, component }) => {
            use nodekeeper_proto::v1::{ReinstallComponent, send_command_request::Action};
            send_command(ch, json, cluster, node, Action::ReinstallComponent(ReinstallComponent { component })).await
        }
        Command::Dev { .. } | Command::Certs(_) => unreachable!("handled above"),
    }
}

async fn nodes_list(ch: Channel, json: bool, clusters: Vec<String>) -> anyhow::Result<()> {
    let nodes = FleetServiceClient::new(ch)
        .list_nodes(ListNodesRequest { clusters, brief: false })
        .await
        .map_err(status)?
        .into_inner()
        .nodes;
    if json {
        for n in &nodes {
            json_line("nodekeeper.v1.Node", n)?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let open = n.conditions.iter().filter(|c| c.condition.as_ref().is_some_and(|c| c.status == 1)).count();
            vec![
                n.cluster.clone(),
                n.name.clone(),
                enum_name(n.liveness().as_str_name(), "LIVENESS_"),
                if n.connected { "yes".into() } else { "no".into() },
                time(n.last_heartbeat_time.as_ref()),
                n.agent_version.clone(),
                n.inventory.as_ref().map(|i| i.kernel_version.clone()).unwrap_or_default(),
                open.to_string(),
            ]
        })
        .collect();
    table(&["CLUSTER", "NODE", "LIVENESS", "CONNECTED", "LAST HEARTBEAT", "AGENT", "KERNEL", "CONDITIONS"], &rows)?;
    Ok(())
}

fn event_row(e: &Event) -> Vec<String> {
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

const EVENT_HEADER: [&str; 8] = ["CURSOR", "RECEIVED", "CLUSTER", "NODE", "TYPE", "SEVERITY", "CONDITION", "MESSAGE"];

async fn events_list(ch: Channel, json: bool, from: Option<String>, limit: u32, filter: Filter) -> anyhow::Result<()> {
    let resp = EventServiceClient::new(ch)
        .list_events(ListEventsRequest {
            after_cursor: from.unwrap_or_default(),
            filter: Some(filter.to_proto()),
            limit,
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

async fn events_watch(ch: Channel, json: bool, from: Option<String>, filter: Filter) -> anyhow::Result<()> {
    let mut client = EventServiceClient::new(ch);
    let mut after = from;
    let mut backoff = Backoff::default();
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
            Ok(s) => s.into_inner(),
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
                    if json {
                        json_line("nodekeeper.v1.SubscribeResponse", &msg)?;
                    }
                    match msg.msg {
                        Some(subscribe_response::Msg::Event(e)) => {
                            if !json {
                                output::println(&event_row(&e).join("  "))?;
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

async fn faults_list(ch: Channel, json: bool, nodes: Vec<String>, limit: u32) -> anyhow::Result<()> {
    let faults = FleetServiceClient::new(ch)
        .list_faults(ListFaultsRequest { nodes, limit, ..Default::default() })
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

async fn faults_show(ch: Channel, json: bool, id: u64) -> anyhow::Result<()> {
    let resp = FleetServiceClient::new(ch).get_fault(GetFaultRequest { id }).await.map_err(status)?.into_inner();
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
    ];
    for (k, v) in fields {
        output::println(&format!("{k:<11} {v}"))?;
    }
    output::println("")?;
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
    let components = nodekeeper_agent::components::spec::load(file)
        .map_err(|e| anyhow::Error::new(Status::invalid_argument(e.clone())).context(e))?;
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
    let guards = client.get_guard_state(GetGuardStateRequest {}).await.map_err(status)?.into_inner();
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

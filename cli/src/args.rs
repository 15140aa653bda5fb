//! The CLI's arguments: every command and flag, with its help line.

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::connect::DEFAULT_SERVER;

/// nodekeeper: the operators' view of the fleet and its faults.
///
/// Exit codes: 0 success; 1 error reported by the server; 2 bad usage; 3 server unreachable;
/// 4 not found; 5 cursor expired (resume from the oldest event); 6 invalid argument.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper", version)]
pub struct Cli {
    /// Event center address: host:port (TLS), https://host:port, or http://host:port for a
    /// center without TLS; a center's replicas separated by commas (the first that answers).
    #[arg(long, global = true, env = "NODEKEEPER_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Folder with ca.pem and the identity's certificate and key, for a TLS server
    /// (default: ~/.config/nodekeeper/pki).
    #[arg(long, global = true, env = "NODEKEEPER_CERTS")]
    pub certs: Option<std::path::PathBuf>,
    /// Which certificate in --certs to present: <identity>.pem and <identity>-key.pem.
    #[arg(long, global = true, env = "NODEKEEPER_IDENTITY", default_value = "admin")]
    pub identity: String,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags that say how to reach an event center: global for every command that talks to
/// one, and meaningless for `dev` and `certs`, which do not.
const CONNECTION_FLAGS: [&str; 4] = ["server", "output", "certs", "identity"];
const LOCAL_COMMANDS: [&str; 2] = ["dev", "certs"];

/// The command line definition: the connection flags hidden from the help of the local
/// commands (clap has no global flag that skips a subcommand; a subcommand that already has a
/// flag of that name keeps its own, here a hidden copy).
pub fn command() -> clap::Command {
    fn hide(mut cmd: clap::Command, flags: &[clap::Arg]) -> clap::Command {
        for flag in flags {
            cmd = cmd.arg(flag.clone().hide(true));
        }
        let subs: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_owned()).collect();
        for sub in subs {
            cmd = cmd.mut_subcommand(sub, |s| hide(s, flags));
        }
        cmd
    }
    let mut cmd = Cli::command();
    let flags: Vec<clap::Arg> =
        cmd.get_arguments().filter(|a| CONNECTION_FLAGS.contains(&a.get_id().as_str())).cloned().collect();
    for local in LOCAL_COMMANDS {
        cmd = cmd.mut_subcommand(local, |s| hide(s, &flags));
    }
    cmd
}

/// Parses the command line; a connection flag given to a local command is a usage error.
pub fn parse() -> Cli {
    let mut cmd = command();
    let matches = cmd.get_matches_mut();
    if let Some((local, sub)) = matches.subcommand().filter(|(name, _)| LOCAL_COMMANDS.contains(name))
        && let Some(flag) = given_connection_flag(sub)
    {
        cmd.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!("--{flag} applies to the commands that talk to an event center, not to `{local}`"),
        )
        .exit();
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

fn given_connection_flag(m: &ArgMatches) -> Option<&'static str> {
    let own = CONNECTION_FLAGS.into_iter().find(|f| m.value_source(f) == Some(clap::parser::ValueSource::CommandLine));
    own.or_else(|| m.subcommand().and_then(|(_, sub)| given_connection_flag(sub)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    /// Protobuf's canonical JSON mapping, one object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Fleet rollouts of node components: waves, bake, gates, pause, abort, rollback. The safe way
    /// to change many nodes.
    #[command(subcommand)]
    Rollouts(RolloutsCmd),
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
        /// Why, for the people who find the freeze (shown by `permits list`).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Grant permits again after a freeze.
    Unfreeze {
        /// The cluster to unfreeze; default: lift the freeze of every cluster.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// The circuit breaker of a cluster.
    #[command(subcommand)]
    Breaker(BreakerCmd),
    /// Storage access lists kept by nodekeeper-storage (their changes: `events list --type
    /// StorageAclEntryAdded --type StorageAclEntryRemoved --type StorageAclGuardHeld`).
    #[command(subcommand)]
    Storage(StorageCmd),
    /// A small CA for development and small fleets.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// The fleet dashboard in a browser: live pages of clusters, nodes, faults, rollouts and
    /// guards, served on loopback with your own credentials (what your identity may see and do,
    /// and nothing more). Ctrl-C stops it.
    Dashboard {
        /// Where to serve it: a loopback address (it acts with your credentials; share it behind an
        /// authenticating proxy, see the README).
        #[arg(long, default_value = "127.0.0.1:7480")]
        listen: std::net::SocketAddr,
    },
    /// Run the whole system on this machine for a first look: an event center, an agent for
    /// this machine, a detector and a remediator in dry run.
    Dev(DevArgs),
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Plaintext without certificates (otherwise a development CA in <data-dir>/pki is used).
    #[arg(long)]
    pub insecure: bool,
    /// Where the event center's store, the agent's state, the logs and the certificates live.
    #[arg(long, default_value = ".nodekeeper")]
    pub data_dir: std::path::PathBuf,
    /// The event center's address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: std::net::SocketAddr,
    /// The agent's status port.
    #[arg(long, default_value_t = 7444)]
    pub status_port: u16,
    /// Where the dashboard is served (loopback).
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub dashboard: std::net::SocketAddr,
}

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create a CA (ca.pem, ca-key.pem) in the folder.
    Init {
        /// The folder for the CA's files.
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
        /// The folder holding the CA; the certificate is written there.
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
pub enum NodesCmd {
    /// List nodes with their liveness and readiness gates, then how many nodes wait to onboard
    /// on which gate.
    List {
        /// Only nodes of this cluster (repeatable).
        #[arg(long)]
        cluster: Vec<String>,
        /// Decommissioned nodes too.
        #[arg(long)]
        decommissioned: bool,
    },
    /// One node: identity, liveness, Kubernetes state (onboarding), each readiness gate with
    /// whether it holds and why not, and its conditions.
    Show {
        #[command(flatten)]
        target: NodeRef,
    },
    /// Decommission a node that left the fleet (for nodes outside Kubernetes; the remediator does
    /// it for Nodes deleted from Kubernetes): its open faults close, its silence no longer
    /// alerts. Refused while its agent is connected; a later hello registers it again.
    Delete {
        #[command(flatten)]
        target: NodeRef,
        /// Why, recorded in the event and the closed faults.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct Filter {
    /// Only events of this node (repeatable).
    #[arg(long)]
    pub node: Vec<String>,
    /// Only events of this type, e.g. NodeHeartbeatLost (repeatable).
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Only events of this cluster (repeatable).
    #[arg(long)]
    pub cluster: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum EventsCmd {
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
        /// With -o json: also print the server's bookmarks ({"bookmark": {"cursor": ...}}, every
        /// few seconds while nothing matches), and print each event as {"event": ...}; a
        /// consumer that stores the last cursor it saw then resumes past events it filtered out.
        #[arg(long)]
        bookmarks: bool,
        #[command(flatten)]
        filter: Filter,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsumersCmd {
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
pub enum PermitsCmd {
    /// Active permits, and the freezes and breakers in force.
    List {
        /// Only permits of this cluster (repeatable).
        #[arg(long)]
        cluster: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BreakerCmd {
    /// Reset a tripped breaker: disruptive operations are granted again.
    Reset {
        /// The cluster whose breaker to reset.
        #[arg(long)]
        cluster: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum StorageCmd {
    /// Let a storage list's guard through once: the syncer's next pass removes every entry it
    /// held back (see the StorageAclGuardHeld event for how many, and why). Recorded with you as
    /// the issuer.
    Force {
        /// The cluster the list follows.
        #[arg(long)]
        cluster: String,
        /// The list's target name in the syncer's configuration.
        #[arg(long)]
        target: String,
        /// Why, recorded in the event.
        #[arg(long)]
        reason: String,
    },
}

/// One node of one cluster.
#[derive(Debug, Args)]
pub struct NodeRef {
    /// The node's cluster.
    #[arg(long)]
    pub cluster: String,
    /// The node's name.
    #[arg(long)]
    pub node: String,
}

#[derive(Debug, Subcommand)]
pub enum RolloutsCmd {
    /// Create a rollout from a TOML file (see packaging/rollout.toml): checked whole, planned in
    /// waves from the nodes its selector matches now; nothing is stored when anything is wrong.
    Create {
        /// The rollout file.
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
    },
    /// Rollouts with their phase, wave and how many nodes changed.
    List {
        /// Only rollouts of this cluster (repeatable).
        #[arg(long)]
        cluster: Vec<String>,
    },
    /// One rollout: its strategy, each node's wave and phase, and its timeline.
    Show {
        /// The rollout's name.
        name: String,
    },
    /// Pause a rollout: no new node starts until it is resumed.
    Pause(RolloutControlArgs),
    /// Resume a paused rollout.
    Resume(RolloutControlArgs),
    /// Stop a rollout for good; changed nodes stay as they are.
    Abort(RolloutControlArgs),
    /// Take every changed node back to the versions it had, in waves.
    Rollback(RolloutControlArgs),
}

/// A person's control of a rollout.
#[derive(Debug, Args)]
pub struct RolloutControlArgs {
    /// The rollout's name.
    pub name: String,
    /// Why, recorded in the rollout's timeline with who did it.
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ComponentsCmd {
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
    /// packaging/components.toml). The nodes converge to it, all at once: for one node or a
    /// one-off change; to change many nodes, a rollout (`nodekeeper rollouts create`) is the safe
    /// way (waves, bake, gates, fleet rollback).
    Set {
        /// The cluster of the nodes.
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
        #[command(flatten)]
        target: NodeRef,
        /// The component's name in the node's spec, e.g. kubelet.
        component: String,
    },
    /// Reinstall a component on a node at its desired version; the result is recorded as a
    /// CommandResult event.
    Reinstall {
        #[command(flatten)]
        target: NodeRef,
        /// The component's name in the node's spec, e.g. kubelet.
        component: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FaultsCmd {
    /// List faults, newest first.
    List {
        /// Only faults of this node (repeatable).
        #[arg(long)]
        node: Vec<String>,
        /// Only faults of this type, e.g. KernelDeadlock (repeatable).
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// At most this many faults (the newest).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One fault with its timeline of events: by id, or the newest fault of a type or node.
    Show {
        /// Fault id, as `faults list` shows it.
        #[arg(required_unless_present_any = ["types", "node"])]
        id: Option<u64>,
        /// The newest fault of this type, e.g. KernelDeadlock.
        #[arg(long = "type", value_name = "TYPE", conflicts_with = "id")]
        types: Option<String>,
        /// The newest fault of this node.
        #[arg(long, conflicts_with = "id")]
        node: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    /// Every flag and positional argument of every command says what it is for.
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "nodekeeper", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }
}

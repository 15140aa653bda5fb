//! The nodekeeper-eventcenter binary: flags, config, logging, exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekeeper_common::config::EXIT_FAILURE;
use nodekeeper_common::logging::{self, LogFormat};
use nodekeeper_common::service;
use nodekeeper_eventcenter::config::Config;
use nodekeeper_eventcenter::store::postgres::PgTls;

/// The nodekeeper event center: durable record of every fault, node liveness, subscriptions.
///
/// Exit codes: 0 stopped cleanly, 1 runtime failure, 2 bad flags, 78 bad configuration.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-eventcenter", version)]
struct Args {
    /// TOML configuration file (see packaging/eventcenter.toml); flags override it.
    #[arg(long, short = 'c', env = "NODEKEEPER_EVENTCENTER_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the gRPC listener.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Folder of the SQLite store.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long events are kept, e.g. "30days".
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<std::time::Duration>,
    /// Serve plaintext gRPC without client certificates (development and tests only).
    #[arg(long)]
    insecure: bool,
    /// Log format: text, json (one object per line) or journald (native journal fields).
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Copies the store to a file while the center runs (one consistent moment), e.g.
    /// `nodekeeper-eventcenter -c /etc/nodekeeper/eventcenter.toml backup --to /backup/ec-$(date +%F).db`.
    /// To restore, stop the center and put the copy in the data directory as eventcenter.db.
    Backup {
        /// The new file (refused if it exists).
        #[arg(long)]
        to: PathBuf,
    },
    /// Copies a SQLite store into an empty PostgreSQL database, cursors, faults and consumers'
    /// positions as they are, for moving a center to replicas on PostgreSQL; e.g.
    /// `nodekeeper-eventcenter migrate --from sqlite:/var/lib/nodekeeper --to postgres:postgres://nk@db/nodekeeper`.
    /// Stop the center first; one transaction (a copy cut off leaves the database empty).
    Migrate {
        /// `sqlite:` and the store's data directory.
        #[arg(long)]
        from: String,
        /// `postgres:` and a libpq-style URL of an empty database (its migrations are applied).
        #[arg(long)]
        to: String,
    },
}

/// `migrate`: exit 0 when everything was copied, 2 for malformed locations, 1 otherwise.
fn migrate(from: &str, to: &str, tls: &PgTls) -> ExitCode {
    let Some(dir) = from.strip_prefix("sqlite:") else {
        tracing::error!(from, "--from: expected sqlite:PATH (the data directory of a SQLite store)");
        return ExitCode::from(2);
    };
    let url = match to.strip_prefix("postgres:") {
        Some(rest) if !rest.starts_with("//") => rest,
        _ if to.starts_with("postgres://") || to.starts_with("postgresql://") => to,
        _ => {
            tracing::error!(to, "--to: expected postgres:URL (a libpq-style URL)");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    let started = std::time::Instant::now();
    let copied = runtime.block_on(nodekeeper_eventcenter::store::postgres::import::from_sqlite(
        std::path::Path::new(dir),
        url,
        tls,
        |table, rows| tracing::info!(table, rows, "copied"),
    ));
    match copied {
        Ok(tables) => {
            let rows: u64 = tables.iter().map(|(_, n)| n).sum();
            tracing::info!(
                rows,
                seconds = started.elapsed().as_secs_f64(),
                "migrated: start the centers on PostgreSQL"
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "migration failed; the target is left as it was");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let mut config = match &args.config {
        Some(path) => match nodekeeper_common::config::load::<Config>(path) {
            Ok(c) => c,
            Err(err) => return service::config_rejected(err),
        },
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if args.insecure {
        config.insecure = true;
    }
    if let Some(r) = args.retention {
        config.store.retention = r;
    }
    if let Some(Command::Migrate { from, to }) = &args.command {
        return migrate(from, to, &nodekeeper_eventcenter::postgres_options(&config.store).tls);
    }
    // A backup needs only the data directory.
    if let Some(Command::Backup { to }) = &args.command {
        let started = std::time::Instant::now();
        return match nodekeeper_eventcenter::store::backup(&config.data_dir, to) {
            Ok(bytes) => {
                tracing::info!(to = %to.display(), bytes, seconds = started.elapsed().as_secs_f64(), "backup written");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(to = %to.display(), error = %err, "backup failed");
                ExitCode::from(EXIT_FAILURE as u8)
            }
        };
    }
    if let Err(err) = config.validate() {
        return service::config_rejected(match &args.config {
            Some(path) => format!("invalid config file {}: {err}", path.display()),
            None => err,
        });
    }
    service::run(tokio::runtime::Builder::new_multi_thread(), "event center", async {
        let shutdown = nodekeeper_common::shutdown::signal();
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        nodekeeper_eventcenter::run(config, listener, shutdown).await?;
        anyhow::Ok(())
    })
}

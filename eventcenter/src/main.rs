//! The nodekeeper-eventcenter binary: flags, config, logging, exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nodekeeper_common::config::{EXIT_CONFIG, EXIT_FAILURE};
use nodekeeper_common::logging::{self, LogFormat};
use nodekeeper_eventcenter::config::Config;

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let mut config = match &args.config {
        Some(path) => match nodekeeper_common::config::load::<Config>(path) {
            Ok(c) => c,
            Err(err) => {
                tracing::error!(error = %err, "configuration rejected");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
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
        tracing::error!(error = %err, "configuration rejected");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = nodekeeper_common::shutdown::signal();
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        nodekeeper_eventcenter::run(config, listener, shutdown).await?;
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "event center failed");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}

//! nodekeeper-detector: the remote fault detector. Not built yet: this binary only exists so that the workspace has its final
//! shape; it refuses to run rather than pretend to work. The fault detector issue fills it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// nodekeeper: the remote fault detector (not implemented in this version).
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-detector", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let _args = Args::parse();
    nodekeeper_common::logging::init(nodekeeper_common::logging::LogFormat::Text);
    tracing::error!("nodekeeper-detector is not implemented in this version of nodekeeper");
    ExitCode::from(nodekeeper_common::config::EXIT_FAILURE as u8)
}

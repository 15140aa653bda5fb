//! The nodekeeper CLI binary.

use std::process::ExitCode;

use clap::Parser;

mod certs;
mod cmd;
mod dev;
mod output;

fn main() -> ExitCode {
    let args = cmd::Cli::parse();
    nodekeeper_common::logging::init(nodekeeper_common::logging::LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(cmd::EXIT_ERROR);
        }
    };
    match runtime.block_on(cmd::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = cmd::exit_code(&err);
            // The one place errors reach the operator: the whole chain, on stderr.
            let _ = output::eprintln(&format!("nodekeeper: {err:#}"));
            ExitCode::from(code)
        }
    }
}

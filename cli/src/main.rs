//! The nodekeeper CLI binary.

use std::process::ExitCode;

mod args;
mod certs;
mod cmd;
mod connect;
mod dev;
mod nodes;
mod output;
mod rollouts;

fn main() -> ExitCode {
    let args = args::parse();
    nodekeeper_common::logging::init(nodekeeper_common::logging::LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(connect::EXIT_ERROR);
        }
    };
    match runtime.block_on(cmd::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = connect::exit_code(&err);
            // The one place errors reach the operator: the whole chain, on stderr.
            let _ = output::eprintln(&format!("nodekeeper: {err:#}"));
            ExitCode::from(code)
        }
    }
}

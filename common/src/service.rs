//! The shape every service's `main` shares, so that its exit codes and last log lines mean the
//! same thing in every unit: a configuration rejected exits 78 (systemd does not restart it), a
//! runtime failure exits 1 with its whole error chain logged.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use crate::config::{EXIT_CONFIG, EXIT_FAILURE};

/// Logs why the configuration was rejected; the exit code for it.
pub fn config_rejected(err: impl Display) -> ExitCode {
    tracing::error!(error = %err, "configuration rejected");
    ExitCode::from(EXIT_CONFIG as u8)
}

/// Builds the runtime, runs `service` on it to its end and turns the outcome into the exit code;
/// a failure is logged as "`what` failed" with its error's alternate form (anyhow's chain).
pub fn run<E: Display>(
    mut runtime: tokio::runtime::Builder,
    what: &str,
    service: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    match runtime.block_on(service) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "{what} failed");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}

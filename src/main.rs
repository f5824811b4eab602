//! The `nudge` binary: flags → validated config → logs → bind → serve → drain → exit.

use std::process::ExitCode;

use clap::Parser;
use nudge::config::{Args, Config, EXIT_CONFIG};
use nudge::server::{Server, StartError};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG as u8);
        }
        // --help and --version
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("nudge: {message}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    nudge::logging::init(config.log_format);
    let open_files = nudge::server::raise_open_files_limit();
    tracing::debug!(?open_files, "open-files limit");

    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    runtime.block_on(async {
        // Signal handlers before the listeners: a SIGTERM sent as soon as the `listening`
        // lines appear must drain and exit 0, not kill the process.
        let shutdown = nudge::signal::shutdown();
        let server = match Server::bind(config).await {
            Ok(server) => server,
            Err(StartError::Config(message)) => {
                eprintln!("nudge: {message}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        match server.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

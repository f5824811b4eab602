//! The `nudge` binary: flags → validated config → logs → bind → serve → drain → exit.

use std::process::ExitCode;

use clap::Parser;
use nudge::config::{Args, Config, EXIT_CONFIG};
use nudge::pid_file::PidFile;
use nudge::server::{Server, StartError};

/// jemalloc returns freed pages to the OS (background threads purge them after a few
/// seconds), so resident memory comes back down after a burst of connections.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // Named for `top -H` and `ps -L`; blocking-pool threads get the same name.
    runtime.enable_all().thread_name("nudge-worker");
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.build().expect("the tokio runtime starts");
    runtime.block_on(async {
        // Signal handlers before the listeners: a SIGTERM sent as soon as the `listening`
        // lines appear must drain and exit 0, not kill the process.
        let shutdown = nudge::signal::shutdown();
        // Written before the `listening` lines, so a script that waits for them finds it.
        let _pid_file = match config.pid_file.as_deref().map(PidFile::write).transpose() {
            Ok(file) => file,
            Err(e) => {
                eprintln!("nudge: --pid-file: {e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        };
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

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
    // Before anything can change the working directory: the path an upgrade starts.
    nudge::upgrade::remember_start();
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
        let upgrades = nudge::signal::Upgrades::install();
        // Started by an upgrade in place: take over from the process named there instead of
        // binding (see `nudge::upgrade`).
        if let Some(from) = std::env::var_os(nudge::upgrade::UPGRADE_FROM_ENV) {
            return take_over(config, std::path::Path::new(&from), upgrades, shutdown).await;
        }
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
        match server.with_upgrades(upgrades).run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// The new process of an upgrade in place: receive everything, restore, rewrite the pid
/// file, say `restored`, and serve once the old process has committed. Any failure before
/// that exits 1 without having touched a client socket: the old process serves on.
async fn take_over(
    config: Config,
    from: &std::path::Path,
    upgrades: nudge::signal::Upgrades,
    shutdown: impl std::future::Future<Output = ()>,
) -> ExitCode {
    let failed = |why: String| {
        tracing::error!(reason = %why, "cannot take over; the old process goes on serving");
        ExitCode::FAILURE
    };
    let (received, socket) = match nudge::upgrade::inherit(from) {
        Ok(inherited) => inherited.split(),
        Err(why) => return failed(why),
    };
    let pid_path = config.pid_file.clone();
    let server = match Server::inherit(config, received).await {
        Ok(server) => server,
        Err(e) => return failed(e.to_string()),
    };
    let _pid_file = match pid_path.as_deref().map(PidFile::write).transpose() {
        Ok(file) => file,
        Err(e) => return failed(format!("--pid-file: {e}")),
    };
    if let Err(why) = tokio::task::spawn_blocking(move || nudge::upgrade::take_over(socket))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    {
        return failed(why);
    }
    tracing::info!(pid = std::process::id(), "taken over");
    match server.with_upgrades(upgrades).run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

//! The shutdown signal (SIGTERM or SIGINT, whichever comes first) and the upgrade signal
//! (SIGUSR2).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Installs the SIGTERM and SIGINT handlers now and returns a future that resolves at the
/// first of them. Call it before binding: a signal that arrives right after the
/// `listening` lines must start the drain, not kill the process (the default action).
/// Must be called within the tokio runtime.
pub fn shutdown() -> impl Future<Output = ()> {
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler can be installed");
    async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    }
}

/// `SIGUSR2`: an upgrade in place is asked for (`crate::upgrade`).
pub struct Upgrades(tokio::signal::unix::Signal);

impl Upgrades {
    /// Installs the `SIGUSR2` handler now (its default action would kill the process).
    /// Must be called within the tokio runtime, before binding.
    pub fn install() -> Upgrades {
        Upgrades(signal(SignalKind::user_defined2()).expect("a SIGUSR2 handler can be installed"))
    }

    /// Resolves at the next `SIGUSR2`.
    pub async fn requested(&mut self) {
        self.0.recv().await;
        tracing::info!(signal = "SIGUSR2", "upgrade in place requested");
    }
}

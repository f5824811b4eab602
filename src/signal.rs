//! The shutdown signal: SIGTERM or SIGINT, whichever comes first.

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

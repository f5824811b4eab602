//! The drain as one small type: a signal, and watchers that count what is still open (the
//! shape of linkerd's `drain` and hyper-util's `GracefulShutdown`). Each connection holds a
//! [`Watcher`]: it learns from it when to close, and its dropping is how the drain knows the
//! connection is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::IntGauge;
use tokio::sync::{Notify, watch};

/// One drain signal and the count of watchers still alive.
pub struct Drain {
    signal: watch::Sender<bool>,
    open: Arc<Open>,
}

struct Open {
    count: AtomicUsize,
    all_gone: Notify,
    /// Mirrors the count for operators (`nudge_open_connections`), when given.
    gauge: Option<IntGauge>,
}

/// Held by one connection (or accept loop) for as long as it lives.
pub struct Watcher {
    signal: watch::Receiver<bool>,
    _open: Counted,
}

struct Counted(Arc<Open>);

impl Drain {
    /// A drain not yet signalled; `gauge`, when given, mirrors the open watchers.
    pub fn new(gauge: Option<IntGauge>) -> Drain {
        Drain {
            signal: watch::channel(false).0,
            open: Arc::new(Open {
                count: AtomicUsize::new(0),
                all_gone: Notify::new(),
                gauge,
            }),
        }
    }

    /// A new watcher, counted until it is dropped.
    pub fn watcher(&self) -> Watcher {
        self.open.count.fetch_add(1, Ordering::AcqRel);
        if let Some(g) = &self.open.gauge {
            g.inc();
        }
        Watcher {
            signal: self.signal.subscribe(),
            _open: Counted(self.open.clone()),
        }
    }

    /// Tells every watcher, present and future, that the drain has begun.
    pub fn signal(&self) {
        self.signal.send_replace(true);
    }

    /// Watchers still alive.
    pub fn open(&self) -> usize {
        self.open.count.load(Ordering::Acquire)
    }

    /// Resolves once every watcher is dropped.
    pub async fn all_gone(&self) {
        loop {
            let notified = self.open.all_gone.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Watcher {
    /// Resolves once the drain has begun (at once if it already had).
    pub async fn signaled(&mut self) {
        // An error means the `Drain` is gone, which ends everything anyway.
        let _ = self.signal.wait_for(|begun| *begun).await;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(g) = &self.0.gauge {
            g.dec();
        }
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_gone.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_the_signal_and_the_drain_sees_them_go() {
        let drain = Drain::new(None);
        let mut a = drain.watcher();
        let b = drain.watcher();
        assert_eq!(drain.open(), 2);
        drain.signal();
        a.signaled().await;
        // A watcher made after the signal sees it at once.
        drain.watcher().signaled().await;
        drop(a);
        assert_eq!(drain.open(), 1);
        let gone = tokio::spawn(async move { drain.all_gone().await });
        tokio::task::yield_now().await;
        assert!(!gone.is_finished());
        drop(b);
        gone.await.unwrap();
    }
}

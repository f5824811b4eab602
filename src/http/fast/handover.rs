//! Moving fast-path connections to another process (the upgrade in place, `crate::upgrade`).
//!
//! A connection on the fast path is, between requests, nothing but a socket; parked, it is
//! a socket and a poll (channel, deadline) on the hub; with its request read but its poll
//! not started, a socket and a query. All three can be carried to another process and
//! served there from where they were: [`Moved`]. Everything else (a head half read, an
//! answer half written, a connection handed to hyper) stays and is drained.
//!
//! While [`Mover::begin`]'s collection is open, a connection that reaches one of those
//! three states sends itself to the collector and its task ends; the count of tasks still
//! on the fast path ([`Mover::all_reported`]) tells when every one has. The request bytes of
//! an idle connection are never read here: they wait in the socket for the new process.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::{FastPath, Framing};
use crate::http::subscribe::SubscribeQuery;

/// A fast-path connection on its way to another process.
pub struct Moved {
    /// The client's connection.
    pub stream: TcpStream,
    /// Where it was.
    pub state: MovedState,
}

/// Where a moved connection was, so that the new process carries on from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MovedState {
    /// Between requests: the next head is read by the new process.
    Idle,
    /// Its request was read and its poll not started (it arrived during the handover).
    Pending {
        /// The poll's query.
        query: SubscribeQuery,
        /// `Connection: close` asked for.
        close: bool,
        /// The `Origin` to echo.
        origin: Option<Vec<u8>>,
    },
    /// Parked on `channel` until `deadline`.
    Parked {
        /// The channel id, as text.
        channel: String,
        /// When its park time runs out.
        deadline: Instant,
        /// `Connection: close` asked for.
        close: bool,
        /// The `Origin` to echo.
        origin: Option<Vec<u8>>,
    },
}

impl MovedState {
    fn framing(self) -> Option<Framing> {
        match self {
            MovedState::Idle => None,
            MovedState::Pending { close, origin, .. }
            | MovedState::Parked { close, origin, .. } => Some(Framing {
                close_requested: close,
                origin: origin.map(Vec::into_boxed_slice),
            }),
        }
    }
}

/// The fast path's side of a handover: the signal, the collector, the count of tasks.
pub(super) struct Mover {
    moving: watch::Sender<bool>,
    collect: Mutex<Option<mpsc::UnboundedSender<Moved>>>,
    tasks: Arc<Tasks>,
}

/// Connections on the fast path (not handed to hyper), and a wake-up when none is left.
#[derive(Default)]
struct Tasks {
    count: AtomicUsize,
    none_left: Notify,
}

/// Held by a connection's task while it is on the fast path: 8 bytes per connection.
pub(super) struct FastTask(Arc<Tasks>);

impl Drop for FastTask {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

impl Mover {
    pub fn new() -> Mover {
        Mover {
            moving: watch::Sender::new(false),
            collect: Mutex::new(None),
            tasks: Arc::default(),
        }
    }

    pub fn enter(&self) -> FastTask {
        self.tasks.count.fetch_add(1, Ordering::AcqRel);
        FastTask(self.tasks.clone())
    }

    /// Whether idle connections should move now.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.moving.subscribe()
    }

    /// Hands `stream` to the collector; gives it back when no collection is open.
    pub fn try_move(
        &self,
        stream: TcpStream,
        state: MovedState,
    ) -> Result<(), (TcpStream, Option<Framing>)> {
        match &*self.collect.lock() {
            Some(tx) => tx.send(Moved { stream, state }).map_err(|e| {
                let Moved { stream, state } = e.0;
                (stream, state.framing())
            }),
            None => Err((stream, state.framing())),
        }
    }
}

impl FastPath {
    /// Starts collecting: from now on every connection on the fast path moves to the
    /// returned receiver as soon as it is idle, parked (once the hub detaches its poll), or
    /// has a poll the hub would not start ([`PollStart::Moving`](crate::hub::PollStart)).
    pub fn begin_moving(&self) -> mpsc::UnboundedReceiver<Moved> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.mover.collect.lock() = Some(tx);
        self.mover.moving.send_replace(true);
        rx
    }

    /// Resolves once no connection is left on the fast path: every one has moved, ended,
    /// or gone to hyper.
    pub async fn all_reported(&self) {
        loop {
            let none_left = self.mover.tasks.none_left.notified();
            tokio::pin!(none_left);
            none_left.as_mut().enable();
            if self.mover.tasks.count.load(Ordering::Acquire) == 0 {
                return;
            }
            none_left.await;
        }
    }

    /// Connections still on the fast path.
    pub fn connections(&self) -> usize {
        self.mover.tasks.count.load(Ordering::Acquire)
    }

    /// Ends the collection: connections stay where they are from now on (the signal first,
    /// so that no idle connection sees it and then finds the collector closed).
    pub fn end_moving(&self) {
        self.mover.moving.send_replace(false);
        *self.mover.collect.lock() = None;
    }

    /// Serves a connection moved here (by another process, or back from a handover that
    /// was abandoned) from where it was.
    pub fn adopt(self: &Arc<Self>, moved: Moved, close: crate::drain::Watcher) {
        let task = self.mover.enter();
        let hub = &self.state.hub;
        let first = match moved.state {
            MovedState::Idle => None,
            MovedState::Pending {
                query,
                close,
                origin,
            } => {
                let framing = Framing {
                    close_requested: close,
                    origin: origin.map(Vec::into_boxed_slice),
                };
                Some(Box::new((self.start_poll(&query), framing)))
            }
            MovedState::Parked {
                channel,
                deadline,
                close,
                origin,
            } => {
                let framing = Framing {
                    close_requested: close,
                    origin: origin.map(Vec::into_boxed_slice),
                };
                Some(Box::new((hub.repark(&channel, deadline), framing)))
            }
        };
        tokio::spawn(self.clone().serve_from(moved.stream, close, task, first));
    }
}

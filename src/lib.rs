//! nudge: a long-poll realtime server. Clients park `GET /subscribe?channel=…` polls; the
//! application's main API registers channels and publishes changes on the internal
//! listener; every parked poll of every channel on a published topic is answered
//! `{"message":"new_change"}`. SPEC.md is the behaviour; the README and docs/ explain it.
//!
//! A tour of the modules, top-down: each uses only those below it.
//! - [`server`]: the [`Server`]: builds everything, binds, serves, drains.
//! - [`listen`]: binding with a deep backlog, the accept loops and their backoff, the
//!   open-files limit; [`drain`]: the drain signal and the count of what is still open.
//! - [`http`]: hyper's connections ([`http::conn`]), the public route
//!   ([`http::subscribe`]) and its buffer-less fast path ([`http::fast`]), the client
//!   watch both use ([`http::watched`]), and the main API's routes ([`http::internal`]);
//!   [`tls`]: the public listener's certificates.
//! - [`config`]: flags with `NUDGE_*` twins, validated before anything is bound;
//!   [`logging`], [`signal`], [`pid_file`]: the process around it; [`upgrade`]: handing
//!   the listeners, the fast-path connections and the hub to a new binary (`SIGUSR2`).
//! - [`bus`]: the Redis stream that carries publishes and revocations between nodes, and
//!   replays what a node missed; [`state_dir`]: the node's state kept on disk for a restart.
//! - [`wire`]: the bodies a main API sends (publish, registration, revocation, durations),
//!   one parser for the HTTP routes, the bus and the fuzz targets; the state file's format.
//! - [`hub`]: channels, topics, parked polls, expiry: all the state, none of the I/O.
//! - [`metrics`]: Prometheus metrics in a registry that is passed in, not global; the hub
//!   writes them and never reads them back.
//! - [`answer`]: the four answers and their bodies; [`error`]: every error answer, one
//!   mapping to status and stable `code`; [`id`]: channel ids, 128 random bits that are
//!   never logged whole.

// `deny`, not `forbid`: `upgrade::fds` alone allows it (one `from_raw_fd` on a descriptor
// the kernel just passed us, with its SAFETY proof).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod answer;
pub mod bus;
pub mod config;
pub mod drain;
pub mod error;
pub mod http;
pub mod hub;
pub mod id;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod pid_file;
pub mod server;
pub mod signal;
pub mod state_dir;
pub mod tls;
pub mod upgrade;
pub mod wire;

pub use config::Config;
pub use server::Server;

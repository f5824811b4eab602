//! nudge: a long-poll realtime server. Clients park `GET /subscribe?channel=…` polls; the
//! application's main API registers channels and publishes changes on the internal
//! listener; every parked poll of every channel on a published topic is answered
//! `{"message":"new_change"}`. SPEC.md is the behaviour; the README and docs/ explain it.
//!
//! A tour of the modules:
//! - [`config`]: flags with `NUDGE_*` twins, validated before anything is bound.
//! - [`server`]: the two listeners, hyper `http1` connections, TLS, and the drain.
//! - [`http::subscribe`]: the public route; [`http::internal`]: the main API's routes.
//! - [`hub`]: channels, topics, parked polls, expiry: all the state, none of the I/O.
//! - [`bus`]: the Redis pub/sub bus that carries publishes and revocations between nodes.
//! - [`metrics`]: Prometheus metrics in a registry that is passed in, not global.
//! - [`error`]: every error answer, one mapping to status and stable `code`.
//! - [`id`]: channel ids, 128 random bits that are never logged whole.
//! - [`logging`], [`signal`]: the process around it.

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
pub mod server;
pub mod signal;
pub mod tls;
pub mod wire;

pub use config::Config;
pub use server::Server;

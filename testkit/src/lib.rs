//! One test kit for everything that drives nudge from outside: the integration tests
//! (`tests/it`), the churn soak (`examples/soak`) and the bench (`benches/longpoll`).
//!
//! - [`node`]: a real process that logs `listening public=…` and `listening internal=…`
//!   (nudge, or the bench's floor): started on free ports, signalled, measured, killed on drop.
//! - [`raw`]: HTTP/1.1 by hand, for what a polished client hides (exact answer times,
//!   keep-alive connections, bytes queued behind a poll, a poll cancelled mid-park).
//! - [`redis`]: a `redis-server` of the caller's own on a free loopback port.
//! - [`sentinel`]: a primary, a replica and three sentinels, for failovers.
//! - [`settings`]: the benches' `NUDGE_BENCH_*` settings from the environment.
//! - [`memory`]: a process's resident memory (RSS and PSS) from `/proc`.
//! - [`proxy`]: a TCP proxy to Redis that can be cut or stalled, as a network breaks.
//!
//! Every wait has a deadline; every process is named by the pid the kit itself started.

#![forbid(unsafe_code)]

pub mod memory;
pub mod node;
pub mod proxy;
pub mod raw;
pub mod redis;
pub mod sentinel;
pub mod settings;

pub use node::{Node, signal};

/// A loopback port that was free a moment ago, for a program that cannot take port 0.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

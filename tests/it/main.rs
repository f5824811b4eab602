//! nudge's integration tests: one binary, real sockets, real HTTP clients.

mod binary;
mod bus;
mod fast_path;
mod internal;
mod ops;
mod process;
mod public;
mod races;
mod raw;
mod semantics;
mod support;
mod tools;

//! nudge's integration tests: one binary, real sockets, real HTTP clients.

mod binary;
mod fast_path;
mod internal;
mod public;
mod races;
mod semantics;
mod support;

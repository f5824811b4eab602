//! nudge's integration tests: one binary, real sockets, real HTTP clients.

mod bad_input;
mod binary;
mod fuzz_corpus;
mod internal;
mod public;
mod races;
mod semantics;
mod support;

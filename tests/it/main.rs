//! nudge's integration tests: one binary, real sockets, real HTTP clients.

mod bad_input;
mod binary;
mod bounds;
mod bus;
mod channel_caps;
mod fast_clients;
mod fast_path;
mod fuzz_corpus;
mod head_grammar;
mod internal;
mod internal_guard;
mod internal_hardening;
mod ops;
mod park_deadlines;
mod process;
mod public;
mod queued;
mod races;
mod raw;
mod semantics;
mod state_dir;
mod support;
mod tools;
mod upgrade;
